#!/usr/bin/env python
"""
PreciseBN study on the toy dataset: COCO box AP with EMA statistics versus precise
population statistics at several points of a short RetinaNet training (R18-FPN, BN in
backbone, FPN and head), for several EMA momenta, over seeds.

    python projects/PreciseBN/run_study.py                # trains what is missing, then
                                                          # writes results.{md,csv} + plot
    python projects/PreciseBN/run_study.py --report       # only re-reads the runs
    python projects/PreciseBN/run_study.py --seeds 1,2,3

Every run is ``tools/train_net.py --num-gpus 2`` (2 CPU processes over gloo) with the same
schedule (batch 16, 80 iterations, LR step at 60) and an evaluation every 20 iterations;
per seed:

* the precise run: PreciseBN (128 training images over both workers) right before every
  evaluation, so it evaluates with precise statistics of the current weights;
* one EMA run per momentum m (``BN.MOMENTUM``; an average over roughly the last 1/m
  iterations), PreciseBN off: it evaluates with the EMA statistics.

The EMA must come from runs without PreciseBN: PreciseBN replaces the running statistics,
so in its own run the EMA restarts from precise statistics at every evaluation. Training
itself depends neither on PreciseBN (the hooks do not perturb it) nor on the momentum
(training normalizes with batch statistics), so all runs of a seed have the same weights at
every evaluation and differ only in their BN statistics. The report checks that: the
final weights of every EMA run equal those of the precise run of its seed.

Then, on each seed's final checkpoint of the precise run, the train/test consistency
tools: evaluation with mini-batch statistics (``TEST.BN_STATS mini_batch``, 4 images per
worker, ``tools/train_net.py --eval-only``) and, on another domain
(``toy_coco_shifted_val``), AP before and after recomputing only the BN statistics on 256
images of ``toy_coco_shifted_train`` (``tools/precise_bn_checkpoint.py``).

Runs go to ``<output>/<run>/seed<S>`` (the consistency tools to ``<output>/consistency``);
finished runs of the same request are reused (``tools/compare.py``'s ``run_all``), so an
interrupted study resumes where it stopped. Writes ``results.md``, ``results.csv`` (one row
per momentum, seed and evaluation point) and ``ap_ema_vs_precise.png`` next to this file.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from d2_batchnorm.experiments import LocalLauncher, box_ap, copypaste_blocks, mean_sd, parse_seeds, run_all
from d2_batchnorm.experiments import read_run as read_compare_run
from d2_batchnorm.tables import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

CONFIG = os.path.join(ROOT, "configs/Toy/retinanet_R18_FPN_bn_head.yaml")
BATCH, MAX_ITER, EVAL_PERIOD = 16, 80, 20
SCHEDULE = [
    "SOLVER.IMS_PER_BATCH", str(BATCH), "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "20",
    "SOLVER.STEPS", "(60,)", "TEST.EVAL_PERIOD", str(EVAL_PERIOD),
]
# the precise run: PreciseBN before every evaluation (its statistics replace the EMA ones)
PRECISE_RUN = "precise"
PRECISE = ["TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.EVAL_EMA", "False",
           "TEST.PRECISE_BN.NUM_SAMPLES", "128", "TEST.PRECISE_BN.IMS_PER_BATCH", "16"]
# EMA runs, PreciseBN off: run name -> EMA momentum (0.1 is torch's and detectron2's default);
# each rank evaluates with its own EMA statistics, as detectron2 does and as when the study
# was measured (BN.EMA_ACROSS_WORKERS average would evaluate their mean)
MOMENTA = {"ema_m0.3": 0.3, "ema_m0.1": 0.1, "ema_m0.01": 0.01}
RUNS = {PRECISE_RUN: PRECISE, **{name: ["BN.MOMENTUM", str(m), "BN.EMA_ACROSS_WORKERS", "per_worker"]
                                 for name, m in MOMENTA.items()}}
DEFAULT_SEEDS = "1,2,3,4,5"
# the train/test consistency tools run on the final checkpoints of the precise run
MINI_BATCH = ["TEST.BN_STATS", "mini_batch", "TEST.IMS_PER_BATCH", "4"]
NEW_DOMAIN = ["DATASETS.TEST", "('toy_coco_shifted_val',)",
              "TEST.PRECISE_BN.DATASETS", "('toy_coco_shifted_train',)",
              "TEST.PRECISE_BN.NUM_SAMPLES", "256", "TEST.PRECISE_BN.IMS_PER_BATCH", "16"]


def run_dir(base: str, name: str, seed: int) -> str:
    return os.path.join(base, name, f"seed{seed}")


def train(base: str, seeds: List[int], timeout: float) -> None:
    """Trains every (run, seed) that has no finished run of the same request in ``base``."""
    launcher = LocalLauncher(num_gpus=2, timeout=timeout)
    for seed in seeds:  # seeds outermost: an interrupted study holds whole seeds
        for name, opts in RUNS.items():
            run_all([(name, CONFIG, run_dir(base, name, seed), seed)], launcher, SCHEDULE + opts)


def consistency_dirs(base: str, seed: int) -> Dict[str, str]:
    return {what: os.path.join(base, "consistency", what, f"seed{seed}") for what in ("mini_batch", "new_domain")}


def run_consistency_tools(base: str, seeds: List[int]) -> None:
    """
    On every seed's final checkpoint of the precise run: an ``--eval-only`` run with
    mini-batch statistics, and ``precise_bn_checkpoint.py`` on the new domain; each skipped
    when its result is already there.
    """
    for seed in seeds:
        weights = os.path.join(run_dir(base, PRECISE_RUN, seed), "model_final.pth")
        if not os.path.isfile(weights):
            print(f"[study] no {weights}: consistency tools skipped for seed {seed}", flush=True)
            continue
        dirs = consistency_dirs(base, seed)
        jobs = (
            ("mini_batch", "tools/train_net.py", ["--eval-only"] + MINI_BATCH, read_mini_batch_ap),
            ("new_domain", "tools/precise_bn_checkpoint.py", NEW_DOMAIN, read_new_domain),
        )
        for what, tool, opts, done in jobs:
            if done(dirs[what]) is not None:
                print(f"[study] {what} seed {seed}: reusing {dirs[what]}", flush=True)
                continue
            os.makedirs(dirs[what], exist_ok=True)
            cmd = [sys.executable, os.path.join(ROOT, tool), "--num-gpus", "2", "--dist-url", "auto",
                   "--config-file", CONFIG, *opts, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", dirs[what]]
            print(f"[study] {what} seed {seed}: {' '.join(cmd)}", flush=True)
            with open(os.path.join(dirs[what], "tool.log"), "w") as log:
                subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)


def read_mini_batch_ap(path: str) -> Optional[float]:
    run = read_compare_run(path)
    return run.metrics.get("bbox/AP") if run.status == "ok" else None


def read_new_domain(path: str) -> Optional[Dict[str, float]]:
    """``{"before": AP, "after": AP}`` from precise_bn_checkpoint.py's JSON summary, or None."""
    summary = os.path.join(path, "model_precise_bn.json")
    if not os.path.isfile(summary):
        return None
    with open(summary) as f:
        data = json.load(f)
    return {"before": box_ap(data["before"]), "after": box_ap(data["after"])}


def evaluation_points() -> List[int]:
    """Completed iterations at which the runs evaluate (the periodic ones and the last)."""
    return sorted(set(range(EVAL_PERIOD, MAX_ITER, EVAL_PERIOD)) | {MAX_ITER})


def read_aps(path: str) -> Dict[int, float]:
    """
    ``{completed iterations: box AP}`` of one run, from the "copypaste:" lines detectron2
    prints at every evaluation in log.txt (the JSON writer keeps only the latest value of a
    metric per write). Points a run has not reached are absent.
    """
    log = os.path.join(path, "log.txt")
    if not os.path.isfile(log):
        return {}
    aps = [block["bbox/AP"] for block in copypaste_blocks(log) if "bbox/AP" in block]
    return dict(zip(evaluation_points(), aps))


def collect(base: str, seeds: List[int]) -> Dict[str, Dict[int, Dict[int, float]]]:
    """``{run: {seed: {completed iterations: box AP}}}`` over the runs present."""
    return {name: {seed: read_aps(run_dir(base, name, seed)) for seed in seeds} for name in RUNS}


def weight_difference(base: str, seed: int) -> Optional[float]:
    """
    Largest |difference| between the final weights (parameters and every buffer but the BN
    statistics) of the precise run of ``seed`` and each of its EMA runs; None if a run has
    no final checkpoint. Must be 0: the runs of a seed train identically.
    """
    paths = [os.path.join(run_dir(base, name, seed), "model_final.pth") for name in RUNS]
    if not all(os.path.isfile(p) for p in paths):
        return None
    states = [torch.load(p, map_location="cpu", weights_only=False)["model"] for p in paths]
    keep = [k for k in states[0] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    return max(float((states[0][k].double() - s[k].double()).abs().max()) for s in states[1:] for k in keep)


def report(runs, weight_differences: Dict[int, Optional[float]]) -> str:
    header = ["EMA momentum", "iteration", "images seen", "seeds", "AP (EMA stats)", "AP (precise stats)",
              "gain precise − EMA (paired)", "seeds with gain > 0"]
    rows = []
    precise = runs[PRECISE_RUN]
    for name, momentum in MOMENTA.items():
        for done in evaluation_points():
            pairs = [(aps[done], precise[seed][done]) for seed, aps in runs[name].items()
                     if done in aps and done in precise.get(seed, {})]
            if not pairs:
                continue
            gains = [p - e for e, p in pairs]
            rows.append([
                f"{momentum:g}", done, done * BATCH, len(pairs),
                mean_sd([e for e, _ in pairs], digits=2), mean_sd([p for _, p in pairs], digits=2),
                mean_sd(gains, digits=2, signed=True), f"{sum(g > 0 for g in gains)}/{len(gains)}",
            ])
    checked = {s: d for s, d in weight_differences.items() if d is not None}
    worst = max(checked.values(), default=float("nan"))
    return markdown_table(header, rows) + (
        f"\nFinal weights of the EMA runs vs the precise run of the same seed (seeds "
        f"{sorted(checked)}): largest |difference| {worst:.3g} (the runs train identically: 0 expected).\n"
    )


def consistency_report(base: str, runs, seeds: List[int]) -> str:
    """Mean ± sd over seeds of the consistency tools' APs, paired differences per seed."""
    pop, mini, before, after = [], [], [], []
    for seed in seeds:
        final = runs[PRECISE_RUN].get(seed, {}).get(MAX_ITER)
        dirs = consistency_dirs(base, seed)
        m, d = read_mini_batch_ap(dirs["mini_batch"]), read_new_domain(dirs["new_domain"])
        if final is not None and m is not None:
            pop.append(final)
            mini.append(m)
        if d is not None:
            before.append(d["before"])
            after.append(d["after"])
    if not pop and not before:
        return ""
    gap = [b - a for a, b in zip(pop, mini)]
    gain = [b - a for a, b in zip(before, after)]
    return markdown_table(["evaluation of the final checkpoint of the precise run", "box AP", "paired difference"], [
        ["toy_coco_val, precise population statistics", mean_sd(pop, digits=2, show_n=True), ""],
        ["toy_coco_val, mini-batch statistics (4 images per worker)", mean_sd(mini, digits=2, show_n=True),
         mean_sd(gap, digits=2, signed=True)],
        ["toy_coco_shifted_val, statistics of toy_coco_train", mean_sd(before, digits=2, show_n=True), ""],
        ["toy_coco_shifted_val, statistics recomputed on 256 toy_coco_shifted_train images",
         mean_sd(after, digits=2, show_n=True), mean_sd(gain, digits=2, signed=True)],
    ])


def write_csv(runs, path: str) -> None:
    precise = runs[PRECISE_RUN]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ema_momentum", "seed", "iteration", "images_seen", "ap_ema", "ap_precise", "gain"])
        for name, momentum in MOMENTA.items():
            for seed, aps in sorted(runs[name].items()):
                for done, ema in sorted(aps.items()):
                    p = precise.get(seed, {}).get(done)
                    w.writerow([momentum, seed, done, done * BATCH, ema, "" if p is None else p,
                                "" if p is None else round(p - ema, 4)])


def plot(runs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = [(PRECISE_RUN, "precise statistics", "-s", "black")]
    series += [(name, f"EMA, m = {m:g}", "--o", color)
               for (name, m), color in zip(MOMENTA.items(), ("tab:green", "tab:blue", "tab:red"))]
    for i, (name, label, style, color) in enumerate(series):
        x, mean, sd = [], [], []
        for done in evaluation_points():
            values = [aps[done] for aps in runs[name].values() if done in aps]
            if values:
                x.append(done * BATCH + (i - 1.5) * 6)  # small offsets keep error bars apart
                mean.append(statistics.mean(values))
                sd.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        if x:
            ax.errorbar(x, mean, yerr=sd, fmt=style, color=color, capsize=3, label=label)
    ax.set_xlabel("training images seen (LR step at 960)")
    ax.set_ylabel("COCO box AP (toy_coco_val), mean ± sd over seeds")
    ax.set_title("EMA vs precise BN statistics (toy RetinaNet R18-FPN, 2 workers)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(ROOT, "output", "precise_bn_study"))
    p.add_argument("--report", action="store_true", help="only rebuild table, CSV and plot")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="K (seeds 1..K) or S1,S2,... (default %(default)s)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    args = p.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    if not args.report:
        train(args.output, seeds, args.timeout)
        run_consistency_tools(args.output, seeds)
    runs = collect(args.output, seeds)
    table = report(runs, {seed: weight_difference(args.output, seed) for seed in seeds})
    table += "\n" + consistency_report(args.output, runs, seeds)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(f"# Measured by `python projects/PreciseBN/run_study.py --seeds {args.seeds}`\n\n"
                f"Box AP, mean ± sample sd over seeds (n); differences paired per seed.\n\n{table}")
    write_csv(runs, os.path.join(HERE, "results.csv"))
    plot(runs, os.path.join(HERE, "ap_ema_vs_precise.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
