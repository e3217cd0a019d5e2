#!/usr/bin/env python
"""
PreciseBN study on the toy dataset: COCO box AP with EMA statistics versus precise
population statistics at several points of a short RetinaNet training (R18-FPN, BN in
backbone, FPN and head), for several EMA momenta, over seeds.

    python projects/PreciseBN/run_study.py                # trains what is missing, then
                                                          # writes results.{md,csv} + plot
    python projects/PreciseBN/run_study.py --report       # only re-reads the runs
    python projects/PreciseBN/run_study.py --seeds 1,2,3 --runs m0.1 m0.01

Every run is ``tools/train_net.py --num-gpus 2`` (2 CPU processes over gloo) with
``TEST.PRECISE_BN.ENABLED True`` and ``TEST.PRECISE_BN.EVAL_EMA True``: at every evaluation
the model is evaluated with its EMA statistics ("ema/bbox/AP"), then PreciseBN recomputes
the statistics from ``TEST.PRECISE_BN.NUM_SAMPLES`` training images over both workers and
the model is evaluated again ("bbox/AP"). Runs differ only in ``BN.MOMENTUM`` (the EMA
momentum m: an average over roughly the last 1/m iterations) and ``SEED``. Training does
not depend on m (training normalizes with batch statistics, and the hooks do not perturb
it), so within a seed all runs have the same weights at every evaluation: their precise
APs must be equal, and only the EMA statistics differ. The report checks that.

Then, on each seed's final checkpoint of the default momentum (0.1), the train/test
consistency tools: evaluation with mini-batch statistics (``TEST.BN_STATS mini_batch``, 4
images per worker, ``tools/train_net.py --eval-only``) and, on another domain
(``toy_coco_shifted_val``), AP before and after recomputing only the BN statistics on 256
images of ``toy_coco_shifted_train`` (``tools/precise_bn_checkpoint.py``).

Runs go to ``<output>/<run>/seed<S>`` (the consistency tools to ``<output>/consistency``);
finished runs of the same request are reused (``tools/compare.py``'s ``run_all``), so an
interrupted study resumes where it stopped. Writes ``results.md``, ``results.csv`` (one row
per run, seed and evaluation point) and ``ap_ema_vs_precise.png`` next to this file.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from compare import LocalLauncher, box_ap, copypaste_blocks, mean_sd, parse_seeds, read_run as read_compare_run  # noqa: E402
from compare import run_all  # noqa: E402

CONFIG = os.path.join(ROOT, "configs/Toy/retinanet_R18_FPN_bn_head.yaml")
BATCH, MAX_ITER, EVAL_PERIOD = 16, 80, 20
SCHEDULE = [
    "SOLVER.IMS_PER_BATCH", str(BATCH), "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "20",
    "SOLVER.STEPS", "(60,)", "TEST.EVAL_PERIOD", str(EVAL_PERIOD),
    "TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.EVAL_EMA", "True",
    "TEST.PRECISE_BN.NUM_SAMPLES", "128", "TEST.PRECISE_BN.IMS_PER_BATCH", "16",
]
# run name -> EMA momentum; 0.1 is torch's and detectron2's default
MOMENTA = {"m0.3": 0.3, "m0.1": 0.1, "m0.01": 0.01}
DEFAULT_SEEDS = "1,2,3,4,5"
# the train/test consistency tools run on the final checkpoints of this run
CONSISTENCY_RUN = "m0.1"
MINI_BATCH = ["TEST.BN_STATS", "mini_batch", "TEST.IMS_PER_BATCH", "4"]
NEW_DOMAIN = ["DATASETS.TEST", "('toy_coco_shifted_val',)",
              "TEST.PRECISE_BN.DATASETS", "('toy_coco_shifted_train',)",
              "TEST.PRECISE_BN.NUM_SAMPLES", "256", "TEST.PRECISE_BN.IMS_PER_BATCH", "16"]


def run_dir(base: str, name: str, seed: int) -> str:
    return os.path.join(base, name, f"seed{seed}")


def train(base: str, names: List[str], seeds: List[int], timeout: float) -> None:
    """Trains every (run, seed) that has no finished run of the same request in ``base``."""
    launcher = LocalLauncher(num_gpus=2, timeout=timeout)
    for seed in seeds:  # seeds outermost: an interrupted study holds whole seeds
        for name in names:
            opts = SCHEDULE + ["BN.MOMENTUM", str(MOMENTA[name])]
            run_all([(name, CONFIG, run_dir(base, name, seed), seed)], launcher, opts)


def consistency_dirs(base: str, seed: int) -> Dict[str, str]:
    return {what: os.path.join(base, "consistency", what, f"seed{seed}") for what in ("mini_batch", "new_domain")}


def run_consistency_tools(base: str, seeds: List[int]) -> None:
    """
    On every seed's final checkpoint of :data:`CONSISTENCY_RUN`: an ``--eval-only`` run with
    mini-batch statistics, and ``precise_bn_checkpoint.py`` on the new domain; each skipped
    when its result is already there.
    """
    for seed in seeds:
        weights = os.path.join(run_dir(base, CONSISTENCY_RUN, seed), "model_final.pth")
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


def consistency_report(base: str, runs, seeds: List[int]) -> str:
    """Mean ± sd over seeds of the consistency tools' APs, paired differences per seed."""
    pop, mini, before, after = [], [], [], []
    for seed in seeds:
        final = runs.get(CONSISTENCY_RUN, {}).get(seed, {}).get(MAX_ITER)
        dirs = consistency_dirs(base, seed)
        m, d = read_mini_batch_ap(dirs["mini_batch"]), read_new_domain(dirs["new_domain"])
        if final is not None and m is not None:
            pop.append(final["precise"])
            mini.append(m)
        if d is not None:
            before.append(d["before"])
            after.append(d["after"])
    if not pop and not before:
        return ""
    gap = [b - a for a, b in zip(pop, mini)]
    gain = [b - a for a, b in zip(before, after)]
    return "\n".join([
        f"| evaluation of the final checkpoint (EMA momentum {MOMENTA[CONSISTENCY_RUN]}) | box AP | "
        "paired difference |",
        "|---|---|---|",
        f"| toy_coco_val, precise population statistics | {mean_sd(pop, digits=2, show_n=True)} | |",
        f"| toy_coco_val, mini-batch statistics (4 images per worker) | {mean_sd(mini, digits=2, show_n=True)} "
        f"| {mean_sd(gap, digits=2, signed=True)} |",
        f"| toy_coco_shifted_val, statistics of toy_coco_train | {mean_sd(before, digits=2, show_n=True)} | |",
        f"| toy_coco_shifted_val, statistics recomputed on 256 toy_coco_shifted_train images "
        f"| {mean_sd(after, digits=2, show_n=True)} | {mean_sd(gain, digits=2, signed=True)} |",
    ]) + "\n"


def evaluation_points() -> List[int]:
    """Completed iterations at which the runs evaluate (the periodic ones and the last)."""
    return sorted(set(range(EVAL_PERIOD, MAX_ITER, EVAL_PERIOD)) | {MAX_ITER})


def read_run(path: str) -> Dict[int, Dict[str, float]]:
    """
    ``{completed iterations: {"ema": AP, "precise": AP, "dist_mean": .., "dist_var": ..}}``
    of one run. The APs come from log.txt: detectron2 prints every evaluation's box AP
    ("copypaste:" lines), and with ``EVAL_EMA`` each evaluation point prints the EMA result,
    then the precise one (the JSON writer keeps only the latest value of a metric per
    write). The EMA→precise distances come from metrics.json, stored at the iteration of
    the evaluation (completed − 1). Points a run has not reached are absent.
    """
    log, metrics = os.path.join(path, "log.txt"), os.path.join(path, "metrics.json")
    if not os.path.isfile(log):
        return {}
    aps = [block["bbox/AP"] for block in copypaste_blocks(log) if "bbox/AP" in block]
    rows = {done: {"ema": aps[2 * i], "precise": aps[2 * i + 1]}
            for i, done in enumerate(evaluation_points()) if 2 * i + 1 < len(aps)}
    if os.path.isfile(metrics):
        with open(metrics) as f:
            for line in f:
                d = json.loads(line)
                done = d.get("iteration", -2) + 1
                if done in rows and "precise_bn/ema_mean_rel_dist" in d:
                    rows[done]["dist_mean"] = d["precise_bn/ema_mean_rel_dist"]
                    rows[done]["dist_var"] = d["precise_bn/ema_var_rel_dist"]
    return rows


def collect(base: str, names: List[str], seeds: List[int]):
    """``{run: {seed: read_run(...)}}`` over the runs present."""
    return {name: {seed: read_run(run_dir(base, name, seed)) for seed in seeds} for name in names}


def precise_ap_spread_within_seeds(runs) -> float:
    """
    Largest difference of the precise AP between runs of the same seed and evaluation
    point. Training does not depend on the EMA momentum, so it must be 0 (up to the
    printed 4 decimals).
    """
    worst = 0.0
    seeds = {s for per_seed in runs.values() for s in per_seed}
    for seed in seeds:
        for done in evaluation_points():
            values = [runs[n][seed][done]["precise"] for n in runs if done in runs[n].get(seed, {})]
            if len(values) > 1:
                worst = max(worst, max(values) - min(values))
    return worst


def report(runs) -> str:
    header = ["EMA momentum", "iteration", "images seen", "seeds", "AP (EMA stats)", "AP (precise stats)",
              "gain precise − EMA (paired)", "gain > 0", "EMA→precise rel. dist. mean / var"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, per_seed in runs.items():
        for done in evaluation_points():
            rows = [r[done] for r in per_seed.values() if done in r]
            if not rows:
                continue
            gains = [r["precise"] - r["ema"] for r in rows]
            dist = [mean_sd([r.get("dist_mean") for r in rows], digits=3, empty="–"),
                    mean_sd([r.get("dist_var") for r in rows], digits=3, empty="–")]
            lines.append("| " + " | ".join([
                f"{MOMENTA[name]}", str(done), str(done * BATCH), str(len(rows)),
                mean_sd([r["ema"] for r in rows], digits=2), mean_sd([r["precise"] for r in rows], digits=2),
                mean_sd(gains, digits=2, signed=True), f"{sum(g > 0 for g in gains)}/{len(gains)}",
                " / ".join(dist),
            ]) + " |")
    spread = precise_ap_spread_within_seeds(runs)
    return "\n".join(lines) + (
        f"\n\nLargest difference of the precise AP between momenta within a seed and point: "
        f"{spread:.4f} (training does not depend on the momentum: 0 expected).\n"
    )


def write_csv(runs, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "ema_momentum", "seed", "iteration", "images_seen", "ap_ema", "ap_precise",
                    "gain", "ema_mean_rel_dist", "ema_var_rel_dist"])
        for name, per_seed in runs.items():
            for seed, rows in sorted(per_seed.items()):
                for done, r in sorted(rows.items()):
                    w.writerow([name, MOMENTA[name], seed, done, done * BATCH, r["ema"], r["precise"],
                                round(r["precise"] - r["ema"], 4), r.get("dist_mean", ""), r.get("dist_var", "")])


def plot(runs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = ("tab:green", "tab:blue", "tab:red", "tab:purple", "tab:orange")
    for i, (name, per_seed) in enumerate(runs.items()):
        for key, style, what in (("ema", "--o", "EMA"), ("precise", "-s", "precise")):
            x, mean, sd = [], [], []
            for done in evaluation_points():
                values = [r[done][key] for r in per_seed.values() if done in r]
                if values:
                    x.append(done * BATCH + (i - 1) * 8)  # small offsets keep error bars apart
                    mean.append(statistics.mean(values))
                    sd.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            if x:
                ax.errorbar(x, mean, yerr=sd, fmt=style, color=colors[i % len(colors)], capsize=3,
                            alpha=1.0 if key == "ema" else 0.6, label=f"m = {MOMENTA[name]}: {what}")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("COCO box AP (toy_coco_val), mean ± sd over seeds")
    ax.set_title("EMA vs precise BN statistics (toy RetinaNet R18-FPN, 2 workers)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(ROOT, "output", "precise_bn_study"))
    p.add_argument("--report", action="store_true", help="only rebuild table, CSV and plot")
    p.add_argument("--runs", nargs="+", default=list(MOMENTA), choices=list(MOMENTA))
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="K (seeds 1..K) or S1,S2,... (default %(default)s)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    args = p.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    if not args.report:
        train(args.output, args.runs, seeds, args.timeout)
        if CONSISTENCY_RUN in args.runs:
            run_consistency_tools(args.output, seeds)
    runs = collect(args.output, args.runs, seeds)
    table = report(runs) + "\n" + consistency_report(args.output, runs, seeds)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(f"# Measured by `python projects/PreciseBN/run_study.py --seeds {args.seeds}`\n\n"
                f"Box AP, mean ± sample sd over seeds (n); differences paired per seed.\n\n{table}")
    write_csv(runs, os.path.join(HERE, "results.csv"))
    plot(runs, os.path.join(HERE, "ap_ema_vs_precise.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
