#!/usr/bin/env python
"""
The cost of BN health in a training: the BN monitor (``BN.MONITOR.ENABLED``) and the
non-finite guard (``BN.GUARD_NONFINITE``), timed side by side in one run: a toy training
(one CPU process, 1 thread; BNTrainer, the config unchanged except the keys below), the
variants interleaved:

* ``off``: ``BN.GUARD_NONFINITE False``, monitor off;
* ``guard``: the guard on (the default), monitor off;
* ``guard + monitor``: both on, the monitor at ``--period`` (default: the shipped
  ``BN.MONITOR.PERIOD``).

Two measures of the same cost, because on a shared 2-core machine the wall-time difference
of whole trainings is noisier than 1%:

1. wall time of ``trainer.train()`` (data loading included, model building excluded), min
   over ``--repeats`` interleaved repeats, relative to ``off``;
2. the hooks' own host time inside the monitored run (``NonFiniteGuard.seconds``;
   ``BNMonitor.run_seconds``: its pre-hooks in the monitored step plus its measuring, the
   two gap forwards included; the first run also builds its loader), relative to the
   run's training wall time, and extrapolated to other periods (per-run cost / (period x
   time per iteration)).

``DATASETS.TEST`` is emptied so no evaluation runs; checkpoints are not written.

    python tools/bench_monitor.py [--max-iter 200] [--period 100] [--repeats 1] [--no-docs]

Writes its table into docs/benchmarks.md (block ``bench_monitor``) unless ``--no-docs``.
"""
import argparse
import os
import statistics
import sys
from typing import Dict, List

from bench_report import machine_description, write_section  # tools/bench_report.py
from bench_training import interleaved, timed_train, toy_trainer  # tools/bench_training.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "Toy", "mask_rcnn_R18_FPN_bn_head.yaml")
VARIANTS = ("off", "guard", "guard + monitor")


def train(config_file: str, variant: str, args, out_dir: str) -> Dict:
    """Wall time of ``trainer.train()`` of one variant and its hooks' own times."""
    from d2_batchnorm.engine import BNMonitor, NonFiniteGuard

    opts = ["BN.GUARD_NONFINITE", str(variant != "off"), "BN.MONITOR.ENABLED", str(variant == "guard + monitor"),
            "BN.MONITOR.PERIOD", str(args.period)]
    trainer = toy_trainer(config_file, args.max_iter, args.ims, out_dir, opts)
    seconds = timed_train(trainer)
    guard = next((h for h in trainer._hooks if isinstance(h, NonFiniteGuard)), None)
    monitor = next((h for h in trainer._hooks if isinstance(h, BNMonitor)), None)
    return {"seconds": seconds, "guard": guard.seconds if guard else 0.0,
            "monitor_runs": list(monitor.run_seconds) if monitor else []}


def table(args) -> List[str]:
    """Times the variants interleaved and returns the Markdown lines (module docstring)."""

    def run(variant, out):
        result = train(args.config_file, variant, args, out)
        print(f"  {variant}: {result['seconds']:.1f} s", flush=True)
        return result

    runs = interleaved(VARIANTS, args.repeats, run)
    best = {v: min(runs[v], key=lambda r: r["seconds"]) for v in VARIANTS}
    t = {v: best[v]["seconds"] for v in VARIANTS}
    mon = best["guard + monitor"]
    per_iter = t["guard + monitor"] / args.max_iter
    later = mon["monitor_runs"][1:] or mon["monitor_runs"]
    per_run = statistics.median(later) if later else float("nan")
    lines = [
        f"Toy training ({os.path.relpath(args.config_file, REPO)}) of {args.max_iter} iterations of "
        f"{args.ims} images, 1 process, 1 thread; min of {args.repeats} interleaved repeat(s).",
        "",
        "| variant | training wall s | vs off | hooks' own time in the run | share of the run |",
        "|---|---|---|---|---|",
        f"| off | {t['off']:.1f} | 1.000x |  |  |",
        f"| guard | {t['guard']:.1f} | {t['guard'] / t['off']:.3f}x | guard {best['guard']['guard']:.2f} s "
        f"({1000 * best['guard']['guard'] / args.max_iter:.2f} ms/step) | "
        f"{100 * best['guard']['guard'] / t['guard']:.2f}% |",
        f"| guard + monitor (period {args.period}) | {t['guard + monitor']:.1f} | "
        f"{t['guard + monitor'] / t['off']:.3f}x | monitor {sum(mon['monitor_runs']):.2f} s in "
        f"{len(mon['monitor_runs'])} runs | {100 * sum(mon['monitor_runs']) / t['guard + monitor']:.2f}% |",
        "",
        f"Monitor: {per_run:.3f} s per run (median of the runs after the first; the first, with its "
        f"loader built: {mon['monitor_runs'][0]:.3f} s), training {1000 * per_iter:.0f} ms per "
        "iteration. Extrapolated share of the training's wall time by period:",
        "",
        "| period | " + " | ".join(str(p) for p in (10, 25, 50, 100, 200)) + " |",
        "|---|" + "---|" * 5,
        "| monitor share | " + " | ".join(f"{100 * per_run / (p * per_iter):.2f}%" for p in (10, 25, 50, 100, 200))
        + " |",
    ]
    return lines


def main(argv=None) -> int:
    from d2_batchnorm.config import SETTINGS

    shipped = next(d for k, _, d, _ in SETTINGS if k == "BN.MONITOR.PERIOD")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--max-iter", type=int, default=200, help="training iterations")
    p.add_argument("--period", type=int, default=shipped, help="monitor period (default: the shipped one)")
    p.add_argument("--ims", type=int, default=2, help="images per batch (one process)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (minimum taken)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    for name in ("max_iter", "period", "ims", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is not allowed; it must be >= 1")
    if args.max_iter < args.period:
        p.error(f"--max-iter = {args.max_iter} is not allowed; it must be >= --period ({args.period})")
    text = "\n".join([f"Machine: {machine_description('1 process, torch threads 1')}", "", *table(args)])
    print(text)
    if not args.no_docs:
        write_section("bench_monitor", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
