#!/usr/bin/env python
"""
The hidden cost of PreciseBN inside a training: wall time of a short toy training with the
``PreciseBN`` hook on, relative to the same training with it off, timed interleaved in one
run (one CPU process, 1 thread; BNTrainer with the config unchanged except the keys
below):

* ``off``: ``TEST.PRECISE_BN.ENABLED False``;
* ``on, as shipped``: ``ENABLED True`` with ``PERIOD 0`` and ``TEST.EVAL_PERIOD 0`` as in
  the shipped configs (configs/COCO-InstanceSegmentation/Base-Mask-RCNN-BN-Head.yaml), i.e.
  one run after the last iteration, of ``--num-iter`` batches;
* ``on, periodic``: ``PERIOD = --max-iter / --runs`` (several runs; from the second on,
  the early-exit plan learned by the first is reused).

Everything else is the toy config's (``--config-file``, default the Mask R-CNN R18-FPN
with BN in its box and mask heads); ``DATASETS.TEST`` is emptied so no evaluation runs,
checkpoints are not written. Training time is ``trainer.train()`` (data loading included,
model building excluded). The measured ratio of a toy training of ``--max-iter``
iterations exaggerates the share of a fixed number of PreciseBN batches; the table also
extrapolates the measured per-batch cost to the shipped COCO schedule (``--shipped-iters``
PreciseBN batches after ``--shipped-max-iter`` training iterations, at the toy's
per-iteration and per-batch cost ratio).

    python tools/bench_training.py [--max-iter 60] [--num-iter 20] [--runs 3] [--repeats 2]

tools/bench_precise_bn.py runs it too (options prefixed ``--training-``) and quotes its table
in docs/benchmarks.md with its own output.
"""
import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from bench_report import machine_description  # tools/bench_report.py


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "Toy", "mask_rcnn_R18_FPN_bn_head.yaml")
VARIANTS = ("off", "on, as shipped", "on, periodic")


def toy_trainer(config_file: str, max_iter: int, ims: int, out_dir: str, opts: List[str]):
    """
    A BNTrainer of ``config_file`` (one process) for ``max_iter`` iterations of ``ims``
    images, no LR steps, no evaluation, no checkpoints, with ``opts`` on top; weights loaded.
    """
    from d2_batchnorm.data import prepare_datasets
    from d2_batchnorm.engine import BNTrainer, load_config

    opts = [
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", str(min(10, max_iter)),
        "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", str(ims),
        "SOLVER.CHECKPOINT_PERIOD", "100000", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
        *opts, "OUTPUT_DIR", out_dir,
    ]
    cfg = load_config(config_file, opts, 1)
    prepare_datasets(list(cfg.DATASETS.TRAIN))
    trainer = BNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def timed_train(trainer) -> float:
    """Wall time of ``trainer.train()``."""
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def train_seconds(config_file: str, variant: str, args, out_dir: str) -> float:
    """Wall time of ``trainer.train()`` of one variant (module docstring)."""
    opts = [
        "TEST.PRECISE_BN.ENABLED", str(variant != "off"), "TEST.PRECISE_BN.NUM_ITER", str(args.num_iter),
        "TEST.PRECISE_BN.PERIOD", str(args.max_iter // args.runs if variant == "on, periodic" else 0),
    ]
    return timed_train(toy_trainer(config_file, args.max_iter, args.ims, out_dir, opts))


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """This benchmark's options (``prefix`` "training-" when another benchmark embeds it)."""
    p.add_argument(f"--{prefix}config-file", default=DEFAULT_CONFIG)
    p.add_argument(f"--{prefix}max-iter", type=int, default=60, help="training iterations")
    p.add_argument(f"--{prefix}num-iter", type=int, default=20, help="PreciseBN batches per run")
    p.add_argument(f"--{prefix}runs", type=int, default=3, help="PreciseBN runs of the periodic variant")
    p.add_argument(f"--{prefix}ims", type=int, default=2, help="images per batch (one process)")
    p.add_argument(f"--{prefix}repeats", type=int, default=2, help="interleaved repeats (minimum taken)")
    p.add_argument(f"--{prefix}shipped-iters", type=int, default=200, help="PreciseBN batches of the shipped configs")
    p.add_argument(f"--{prefix}shipped-max-iter", type=int, default=90000,
                   help="training iterations of the shipped configs")


def options(args, prefix: str = "") -> argparse.Namespace:
    """The options of :func:`add_arguments` without their prefix; ValueError if one is bad."""
    key = prefix.replace("-", "_")
    names = ("config_file", "max_iter", "num_iter", "runs", "ims", "repeats", "shipped_iters", "shipped_max_iter")
    opts = argparse.Namespace(**{n: getattr(args, key + n) for n in names})
    for name in names[1:]:
        if getattr(opts, name) < 1:
            raise ValueError(f"--{prefix}{name.replace('_', '-')} = {getattr(opts, name)} is not allowed; it must be >= 1")
    if opts.max_iter // opts.runs < 1:
        raise ValueError(f"--{prefix}runs = {opts.runs} is not allowed; it must be <= --{prefix}max-iter ({opts.max_iter})")
    return opts


def interleaved(variants: Sequence[str], repeats: int, run: Callable[[str, str], Any]) -> Dict[str, List[Any]]:
    """
    ``run(variant, out_dir)`` of every variant, ``repeats`` times, the order reversed every
    other repeat (so a drift of the machine's load hits all variants alike), in one process
    with 1 torch thread and quiet loggers; ``{variant: [result of each repeat]}``.
    """
    torch.set_num_threads(1)
    for name in ("detectron2", "d2", "fvcore", "d2_batchnorm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    results: Dict[str, List[Any]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for variant in variants if rep % 2 == 0 else tuple(reversed(variants)):
                results[variant].append(run(variant, os.path.join(tmp, f"{rep}-{variants.index(variant)}")))
    return results


def training_table(args: argparse.Namespace) -> List[str]:
    """Times the variants interleaved and returns the Markdown lines (module docstring)."""

    def run(variant, out):
        seconds = train_seconds(args.config_file, variant, args, out)
        print(f"  training, PreciseBN {variant}: {seconds:.1f} s", flush=True)
        return seconds

    t = {v: min(ts) for v, ts in interleaved(VARIANTS, args.repeats, run).items()}
    runs = {"off": 0, "on, as shipped": 1, "on, periodic": args.runs}
    lines = [
        f"Hidden cost in training (tools/bench_training.py): toy training "
        f"({os.path.relpath(args.config_file, REPO)}) of {args.max_iter} iterations of {args.ims} "
        f"images, 1 process; PreciseBN {args.num_iter} batches per run; min of {args.repeats} "
        "interleaved repeats.",
        "",
        "| PreciseBN hook | PreciseBN runs | training wall s | vs off | PreciseBN s per batch | "
        "per batch / training iteration |",
        "|---|---|---|---|---|---|",
    ]
    per_iter = t["off"] / args.max_iter
    per_batch = {}
    for v in VARIANTS:
        per_batch[v] = (t[v] - t["off"]) / (runs[v] * args.num_iter) if runs[v] else 0.0
        lines.append(
            f"| {v} | {runs[v]} | {t[v]:.1f} | {t[v] / t['off']:.3f}x | "
            + (f"{per_batch[v]:.3f} | {per_batch[v] / per_iter:.2f} |" if runs[v] else "  |  |")
        )
    shipped = args.shipped_iters * per_batch["on, as shipped"] / (args.shipped_max_iter * per_iter)
    lines += [
        "",
        f"Extrapolated to the shipped schedule ({args.shipped_iters} PreciseBN batches once after "
        f"{args.shipped_max_iter} iterations) at these per-batch costs: +{100 * shipped:.3f}% of the "
        "training's wall time.",
    ]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    try:
        args = options(p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))
    print(f"Machine: {machine_description('1 process, torch threads 1')}\n")
    print("\n".join(training_table(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
