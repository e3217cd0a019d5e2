"""
Checks d2_batchnorm on this machine's GPU in one process, in a few minutes:

    d2bn check-gpu [--output check_gpu.json] [--no-train] [--device cuda:0]
    python tools/check_gpu.py ...        (the same)

Every norm (SyncBatchNorm on one GPU and through a 1-process NCCL group, LevelBatchNorm
with per-level and shared statistics, GhostBatchNorm), PreciseBN and the RoI shuffle round
trip against torch's references (nn.BatchNorm2d, nn.SyncBatchNorm's kernels, fvcore) in
float32 and float16/bfloat16 autocast, contiguous and channels_last; then 3 iterations of
``d2bn train --num-gpus 1`` with ``SOLVER.AMP.ENABLED True`` on a RetinaNet with
shared level statistics and on a Mask R-CNN with SyncBN heads and PreciseBN
(d2_batchnorm.gpu_check). Prints a table (check, max error, tolerance, PASS/FAIL, our time
against the reference's) and writes it as JSON. Exit status: 0 when every check passes,
1 when one fails, 2 for bad arguments or a machine without CUDA (one line says so).
"""
import argparse
import json
import platform
import sys

import torch

from d2_batchnorm import gpu_check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="check_gpu.json", help="JSON file of the results (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="CUDA device to check (default: %(default)s)")
    parser.add_argument("--no-train", action="store_true", help="skip the train_net runs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA: torch {torch.__version__} sees no GPU on this machine; nothing was checked "
              "(run this on a machine with an NVIDIA GPU)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"error: --device = {args.device!r} is not allowed; it must be a CUDA device (cuda, cuda:N)", file=sys.stderr)
        return 2
    torch.cuda.set_device(device)

    results = gpu_check.run_all(device, train=not args.no_train)
    machine = (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
               f"Python {platform.python_version()}")
    print(machine)
    print(gpu_check.format_table(results))
    failed = [r.name for r in results if not r.passed]
    with open(args.output, "w") as f:
        json.dump({"machine": machine, "results": [r.as_dict() for r in results]}, f, indent=1)
    print(f"{len(results) - len(failed)} of {len(results)} checks passed; results in {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
