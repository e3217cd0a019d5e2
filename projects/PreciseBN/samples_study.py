#!/usr/bin/env python
"""
How many samples does PreciseBN need? Standard errors of the population statistics and
COCO box AP against the number of images PreciseBN sees, on the toy RetinaNet of
``run_study.py`` (its final checkpoints of the precise run), over seeds and draws.

    python projects/PreciseBN/samples_study.py              # trains missing checkpoints, measures, reports
    python projects/PreciseBN/samples_study.py --report     # only rebuilds the tables and the plot
    python projects/PreciseBN/samples_study.py --seeds 1,2,3 --draws 2 --targets 0.05

The paper (Sec. 3) says 10^3-10^4 samples suffice for precise statistics. Per checkpoint
(one per training seed) and per draw (the images PreciseBN sees, from the hook's own random
stream; different draws see different images and augmentations), in one CPU process with
2 images per PreciseBN batch (so a sampling unit of the standard errors is 2 images):

* **samples needed**: adaptive PreciseBN (``target_rel_error``) with targets 5% and 1%,
  capped at ``--cap`` images: the images it used, and whether it met the target;
* **AP against samples**: fixed PreciseBN with N images for N in ``SAMPLES``, then the
  box AP on ``toy_coco_val`` and the largest / median relative standard error.

Writes ``samples.md``, ``samples.csv`` and ``samples_vs_error.png`` next to this file;
the measurements are cached in ``<output>/samples_study.json`` (a re-run measures only
what is missing).
"""
import argparse
import csv
import json
import os
import statistics
import sys
from typing import Dict, List

from d2_batchnorm.tables import markdown_table

import run_study  # noqa: E402  (this directory; the checkpoints and their training schedule)

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = (16, 32, 64, 128, 256, 512, 1024)
TARGETS = (0.05, 0.01)
IMS_PER_BATCH = 2
DEFAULT_SEEDS, DEFAULT_DRAWS, DEFAULT_CAP = "1,2,3", 1, 2048


def checkpoint(base: str, seed: int) -> str:
    return os.path.join(run_study.run_dir(base, run_study.PRECISE_RUN, seed), "model_final.pth")


def measure(weights: str, seed: int, draws: int, cap: int, targets, done: Dict[str, dict], save) -> None:
    """Fills ``done`` (key -> measurement) with what is missing for one checkpoint."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    from d2_batchnorm.config_kinds import adapt
    from d2_batchnorm.data import prepare_datasets
    from d2_batchnorm.engine import build_any_model, load_any_config, test_any
    from d2_batchnorm.experiments import box_ap
    from d2_batchnorm.precise_bn import summarize_errors, update_bn_stats
    from d2_batchnorm.rng import RandomStream, derive_seed

    torch.set_num_threads(1)  # more threads on a busy 2-core machine spin-wait (15x slower, measured)
    opts = run_study.SCHEDULE + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights, "SEED", str(seed)]
    cfg = load_any_config(run_study.CONFIG, opts, 1)
    kind = adapt(cfg)
    prepare_datasets(kind.dataset_names())
    model = build_any_model(cfg)
    DetectionCheckpointer(model).load(weights)

    def precise(draw: int, **kwargs):
        """PreciseBN in the draw's own random stream, on a fresh loader; returns its result."""
        # as the hook runs it: the draw's own stream, the forwards' training scalars discarded
        with EventStorage(), RandomStream(derive_seed("samples_study", seed, draw, json.dumps(kwargs, sort_keys=True))):
            loader = kind.train_loader(kind.train_datasets(), IMS_PER_BATCH, 1)
            model.train()
            return update_bn_stats(model, loader, num_samples=kwargs.pop("num_samples"), **kwargs)

    for draw in range(1, draws + 1):
        for target in targets:
            key = f"seed{seed}/draw{draw}/target{target}/cap{cap}"
            if key not in done:
                r = precise(draw, num_samples=cap, target_rel_error=target)
                done[key] = {"seed": seed, "draw": draw, "target": target, "cap": cap, "images": r.num_samples,
                             "reached": r.reached_target, "seconds": r.seconds,
                             **summarize_errors(r.errors, prefix="rel_error")}
                save()
                print(f"[samples] {key}: {r.num_samples} images, reached={r.reached_target}", flush=True)
        for n in SAMPLES:
            key = f"seed{seed}/draw{draw}/samples{n}"
            if key not in done:
                r = precise(draw, num_samples=n)
                model.eval()
                ap = box_ap(test_any(cfg, model))
                done[key] = {"seed": seed, "draw": draw, "samples": n, "images": r.num_samples, "ap": ap,
                             **summarize_errors(r.errors, prefix="rel_error")}
                save()
                print(f"[samples] {key}: AP {ap:.2f}, largest error {done[key]['rel_error/max']:.3g}", flush=True)


def _mean_sd(values: List[float], digits: int = 2) -> str:
    from d2_batchnorm.experiments import mean_sd

    return mean_sd(values, digits=digits)


def report(done: Dict[str, dict], seeds: List[int]) -> str:
    rows = [m for m in done.values() if m["seed"] in seeds]
    table = []
    for target in sorted({m["target"] for m in rows if "target" in m}, reverse=True):
        runs = sorted((m for m in rows if m.get("target") == target), key=lambda m: (m["seed"], m["draw"]))
        if not runs:
            continue
        met = [m for m in runs if m["reached"]]
        each = ", ".join(f"{m['images']}{'' if m['reached'] else ' (cap)'}" for m in runs)
        # a standard error falls as 1/sqrt(N): N (error / target)^2 images would meet the target
        needed = [m["images"] * (m["rel_error/max"] / target) ** 2 for m in runs]
        table.append([f"{target:.0%}", len(runs), f"{len(met)}/{len(runs)}",
                      _mean_sd([m["images"] for m in met], 0) or "—", each,
                      _mean_sd([m["rel_error/max"] for m in runs], 4), _mean_sd(needed, 0)])
    fixed = []
    final = {(m["seed"], m["draw"]): m["ap"] for m in rows if m.get("samples") == SAMPLES[-1]}
    for n in SAMPLES:
        runs = [m for m in rows if m.get("samples") == n]
        if not runs:
            continue
        diff = [m["ap"] - final[(m["seed"], m["draw"])] for m in runs if (m["seed"], m["draw"]) in final]
        fixed.append([
            n, len(runs), _mean_sd([m["ap"] for m in runs]), _mean_sd(diff),
            _mean_sd([m["rel_error/max"] for m in runs], 3),
            _mean_sd([m.get("rel_error_mean/backbone.bottom_up/median", float("nan")) for m in runs], 4),
            _mean_sd([m.get("rel_error_mean/head.cls_subnet/median", float("nan")) for m in runs], 4),
        ])
    return "\n".join([
        "Samples adaptive PreciseBN used (images over all workers, 2 per batch, capped at the `--cap`), per "
        "checkpoint seed and draw:", "",
        markdown_table(["target (largest relative standard error)", "runs", "met the target", "images used",
                        "images used, each run", "largest error at the end",
                        "images for the target at 1/√N (extrapolated)"], table),
        "Fixed PreciseBN with N images: box AP on toy_coco_val and the relative standard errors, mean ± sd over "
        "checkpoint seeds × draws (n); AP − AP(largest N) paired per seed and draw:", "",
        markdown_table(["images N", "n", "box AP", f"AP − AP(N={SAMPLES[-1]})", "largest relative error",
                        "median relative error (mean), backbone.bottom_up", "head.cls_subnet"], fixed),
    ])


def write_csv(done: Dict[str, dict], path: str) -> None:
    keys = sorted({k for m in done.values() for k in m})
    first = ["seed", "draw", "target", "samples", "images", "reached", "ap", "rel_error/max"]
    header = [k for k in first if k in keys] + [k for k in keys if k not in first]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="")
        w.writeheader()
        for key in sorted(done):
            w.writerow(done[key])


def plot(done: Dict[str, dict], seeds: List[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in done.values() if m["seed"] in seeds and "samples" in m]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for what, label, style in (("rel_error/max", "largest (all modules, channels)", "-o"),
                               ("rel_error_mean/backbone.bottom_up/median", "median, mean, backbone", "--s"),
                               ("rel_error_mean/head.cls_subnet/median", "median, mean, cls head", "--^")):
        xs = [n for n in SAMPLES if any(m["samples"] == n for m in rows)]
        ys = [statistics.mean(m[what] for m in rows if m["samples"] == n and what in m) for n in xs]
        left.plot(xs, ys, style, label=label)
    targets = sorted({m["target"] for m in done.values() if "target" in m})
    xs = [n for n in SAMPLES if any(m["samples"] == n for m in rows)]
    if xs:  # the 1/sqrt(N) slope through the first point
        first = statistics.mean(m["rel_error/max"] for m in rows if m["samples"] == xs[0])
        left.plot(xs, [first * (xs[0] / n) ** 0.5 for n in xs], color="gray", lw=0.8, label="∝ 1/√N")
    for target in targets:
        left.axhline(target, color="gray", lw=0.8, ls=":")
    for target in targets:
        used = [m["images"] for m in done.values() if m.get("target") == target and m["reached"] and m["seed"] in seeds]
        for u in used:
            left.axvline(u, color="tab:red" if target == 0.01 else "tab:green", lw=0.6, alpha=0.5)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("images PreciseBN saw (2 per batch)")
    left.set_ylabel("relative standard error (mean over runs)")
    left.set_title("standard error vs samples (vertical: adaptive stops at 5% / 1%)", fontsize=9)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    # AP against the largest N of the same checkpoint and draw (paired: the checkpoints' own
    # spread, several AP points, would hide what the number of samples does)
    final = {(m["seed"], m["draw"]): m["ap"] for m in rows if m["samples"] == SAMPLES[-1]}
    xs = [n for n in SAMPLES if any(m["samples"] == n for m in rows)]
    diffs = [[m["ap"] - final[(m["seed"], m["draw"])] for m in rows
              if m["samples"] == n and (m["seed"], m["draw"]) in final] for n in xs]
    xs, diffs = [x for x, d in zip(xs, diffs) if d], [d for d in diffs if d]
    right.errorbar(xs, [statistics.mean(d) for d in diffs],
                   yerr=[statistics.stdev(d) if len(d) > 1 else 0 for d in diffs], fmt="-o", capsize=3)
    right.axhline(0, color="gray", lw=0.8)
    right.set_xscale("log", base=2)
    right.set_xlabel("images PreciseBN saw")
    right.set_ylabel(f"box AP − AP with {SAMPLES[-1]} images (paired, mean ± sd)")
    right.set_title("AP vs PreciseBN samples (toy RetinaNet R18-FPN, toy_coco_val)", fontsize=9)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from d2_batchnorm.experiments import parse_seeds

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(run_study.ROOT, "output", "precise_bn_study"))
    p.add_argument("--report", action="store_true", help="only rebuild tables and plot from the cache")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="K (seeds 1..K) or S1,S2,... (default %(default)s)")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="draws of PreciseBN images per checkpoint")
    p.add_argument("--cap", type=int, default=DEFAULT_CAP, help="most images an adaptive run may use")
    p.add_argument("--targets", default=",".join(map(str, TARGETS)),
                   help="targets of the adaptive runs (default %(default)s); the report shows all measured")
    args = p.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        targets = [float(t) for t in args.targets.split(",")]
        if not all(0 < t <= 1 for t in targets):
            raise ValueError(f"--targets {args.targets}: each must be in (0, 1]")
    except ValueError as e:
        p.error(str(e))
    cache = os.path.join(args.output, "samples_study.json")
    done = json.load(open(cache)) if os.path.isfile(cache) else {}

    def save():
        os.makedirs(args.output, exist_ok=True)
        with open(cache + ".tmp", "w") as f:
            json.dump(done, f, indent=1)
        os.replace(cache + ".tmp", cache)

    if not args.report:
        missing = [s for s in seeds if not os.path.isfile(checkpoint(args.output, s))]
        if missing:  # run_study.py's precise runs (its EMA runs are not needed here)
            from d2_batchnorm.experiments import LocalLauncher, run_all

            tasks = [(run_study.PRECISE_RUN, run_study.CONFIG, run_study.run_dir(args.output, run_study.PRECISE_RUN, s), s)
                     for s in missing]
            run_all(tasks, LocalLauncher(num_gpus=2, timeout=3600.0), run_study.SCHEDULE + run_study.PRECISE)
        for seed in seeds:
            measure(checkpoint(args.output, seed), seed, args.draws, args.cap, targets, done, save)
    table = report(done, seeds)
    with open(os.path.join(HERE, "samples.md"), "w") as f:
        f.write(f"# Measured by `python projects/PreciseBN/samples_study.py` (cached runs; see README)\n\n"
                f"Report of `--seeds {args.seeds}`.\n\n{table}")
    write_csv({k: m for k, m in done.items() if m["seed"] in seeds}, os.path.join(HERE, "samples.csv"))
    plot(done, seeds, os.path.join(HERE, "samples_vs_error.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
