#!/usr/bin/env python
"""
Leakage probe: how much a trained R-CNN relies on the statistics of its training batches.

Runs the model's training forward pass (RoI sampling and losses exactly as in training,
no parameter update) on batches built like training batches, each batch twice:

* "batch": the heads' BN layers normalize with the statistics of the batch (as in
  training: per worker, synchronized, or after the RoI shuffle, whatever the config says);
* "population": the same batch, BN layers in eval mode (population statistics).

The same RoIs are sampled in both passes (same RNG seed) and BN buffers are restored
after each pass: both passes are the BN monitor's :func:`d2_batchnorm.engine.bn_monitor.leakage_losses`,
the one home of this measurement (the monitor computes the same gap during training). A head that learned to read per-image information from per-worker batch
statistics classifies the training-style batch much better with batch statistics than
with population statistics: its ``loss_cls`` gap (population − batch) is large.

    python projects/LeakageStudy/leakage_probe.py --num-gpus 2 --config-file CFG \
        --batches 20 --out RUN_DIR/leakage_probe.json MODEL.WEIGHTS RUN_DIR/model_final.pth [KEY VALUE ...]

Batches come from ``DATASETS.TEST`` (held-out images) with the training mapper.
"""
import argparse
import json
import os
import sys

import torch


SCALARS = ("loss_cls", "loss_box_reg", "loss_mask", "fast_rcnn/cls_accuracy", "fast_rcnn/fg_cls_accuracy")


def _probe(args):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_train_loader
    from detectron2.utils import comm

    import d2_batchnorm  # noqa: F401
    from d2_batchnorm.engine import load_config
    from d2_batchnorm.engine.bn_monitor import leakage_losses
    from d2_batchnorm.modeling import build_model

    torch.set_num_threads(1)
    cfg = load_config(args.config_file, args.opts, comm.get_world_size())
    cfg.defrost()
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST
    cfg.freeze()
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.train()
    loader = iter(build_detection_train_loader(cfg))
    sums = {mode: {k: 0.0 for k in SCALARS} for mode in ("batch", "population")}
    counts = {mode: {k: 0 for k in SCALARS} for mode in ("batch", "population")}
    for i in range(args.batches):
        losses = leakage_losses(model, next(loader), seed=1000 * comm.get_rank() + i)
        for mode, values in losses.items():
            for key in SCALARS:
                if key in values:
                    sums[mode][key] += values[key]
                    counts[mode][key] += 1
    gathered = comm.all_gather((sums, counts))
    if not comm.is_main_process():
        return None
    result = {}
    for mode in ("batch", "population"):
        result[mode] = {}
        for key in SCALARS:
            n = sum(c[mode][key] for _, c in gathered)
            if n:
                result[mode][key] = sum(s[mode][key] for s, _ in gathered) / n
    result["batches_per_worker"] = args.batches
    result["workers"] = comm.get_world_size()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num-gpus", type=int, default=2, help="processes (CPU processes without CUDA)")
    parser.add_argument("--batches", type=int, default=20, help="batches per worker")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches = {args.batches} is not allowed; it must be >= 1")
    from d2_batchnorm.engine import launch

    launch(_probe, args.num_gpus, dist_url="auto", args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
