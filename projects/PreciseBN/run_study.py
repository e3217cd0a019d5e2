#!/usr/bin/env python
"""
PreciseBN study on the toy dataset: COCO box AP with the EMA statistics versus precise
population statistics at several points of short RetinaNet trainings (R18-FPN, BN in
backbone, FPN and head), at the config's batch and at a 4x larger effective batch.

    python projects/PreciseBN/run_study.py            # trains, then writes the table + plot
    python projects/PreciseBN/run_study.py --report   # only re-reads the runs' metrics.json

Each run is ``tools/train_net.py --num-gpus 2`` with ``TEST.PRECISE_BN.ENABLED True`` and
``TEST.PRECISE_BN.EVAL_EMA True``: at every evaluation the model is evaluated with its EMA
statistics ("ema/bbox/AP"), then PreciseBN recomputes the statistics from
``TEST.PRECISE_BN.NUM_SAMPLES`` training images over both workers and the model is
evaluated again ("bbox/AP"). Writes ``results.md`` (table) and ``ap_ema_vs_precise.png``
next to this file, from the runs' ``metrics.json``.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from compare import copypaste_blocks  # noqa: E402  (tools/compare.py)

CONFIG = "configs/Toy/retinanet_R18_FPN_bn_head.yaml"

# name -> (label, opts); both runs see the same 1280 training images (16 x 80 = 64 x 20)
RUNS = {
    "batch16": ("batch 16 (8/worker)", [
        "SOLVER.IMS_PER_BATCH", "16", "SOLVER.MAX_ITER", "80", "SOLVER.WARMUP_ITERS", "20",
        "SOLVER.STEPS", "(60,)", "TEST.EVAL_PERIOD", "20",
    ]),
    "batch64": ("batch 64 (32/worker), LR x2", [
        "SOLVER.IMS_PER_BATCH", "64", "SOLVER.MAX_ITER", "20", "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.BASE_LR", "0.04", "SOLVER.STEPS", "(15,)", "TEST.EVAL_PERIOD", "5",
    ]),
}
COMMON = ["TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.EVAL_EMA", "True",
          "TEST.PRECISE_BN.NUM_SAMPLES", "128", "TEST.PRECISE_BN.IMS_PER_BATCH", "16"]


def output_dir(base: str, name: str) -> str:
    return os.path.join(base, name)


def train(base: str, name: str) -> None:
    """Trains run ``name`` from scratch into a fresh ``<base>/<name>`` (log.txt appends)."""
    shutil.rmtree(output_dir(base, name), ignore_errors=True)
    opts = RUNS[name][1] + COMMON + ["OUTPUT_DIR", output_dir(base, name)]
    cmd = [sys.executable, "tools/train_net.py", "--config-file", CONFIG, "--num-gpus", "2",
           "--dist-url", "auto", *opts]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def read_metrics(path: str):
    """
    ``{completed iterations: {"ema": AP, "precise": AP, "dist_mean": .., "dist_var": ..}}``
    from a metrics.json. Scalars of a periodic evaluation are stored at iteration it
    (it + 1 completed); those of the final evaluation (after training) at MAX_ITER.
    """
    ema, precise, dist = {}, {}, {}
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    for d in lines:
        it = d.get("iteration")
        if "ema/bbox/AP" in d:
            ema[it + 1] = d["ema/bbox/AP"]
        if "precise_bn/ema_var_rel_dist" in d:
            dist[it + 1] = (d["precise_bn/ema_mean_rel_dist"], d["precise_bn/ema_var_rel_dist"])
    for d in lines:
        it = d.get("iteration")
        if "bbox/AP" in d:
            precise[it + 1 if it + 1 in ema else it] = d["bbox/AP"]
    rows = {}
    for done in sorted(set(ema) & set(precise)):
        mean, var = dist.get(done, (float("nan"), float("nan")))
        rows[done] = {"ema": ema[done], "precise": precise[done], "dist_mean": mean, "dist_var": var}
    return rows


def read_log_aps(path: str, period: int, max_iter: int):
    """
    ``{completed iterations: {"ema": AP, "precise": AP}}`` from a run's log.txt: detectron2
    prints every evaluation's box AP ("copypaste:" lines); with ``EVAL_EMA`` each
    evaluation point prints the EMA result, then the precise one. Needed because the
    JSON writer (period 20) keeps only the latest value of a metric per write.
    """
    aps = [block["bbox/AP"] for block in copypaste_blocks(path) if "bbox/AP" in block]
    points = list(range(period, max_iter, period)) + [max_iter] if period else [max_iter]
    return {done: {"ema": aps[2 * i], "precise": aps[2 * i + 1]}
            for i, done in enumerate(points) if 2 * i + 1 < len(aps)}


def report(base: str) -> str:
    lines = [
        "| run | iteration | images seen | AP (EMA stats) | AP (precise stats) | gain | "
        "EMA→precise rel. dist. mean / var |",
        "|---|---|---|---|---|---|---|",
    ]
    series = {}
    for name, (label, opts) in RUNS.items():
        path = os.path.join(output_dir(base, name), "metrics.json")
        if not os.path.exists(path):
            continue
        batch = int(opts[opts.index("SOLVER.IMS_PER_BATCH") + 1])
        period = int(opts[opts.index("TEST.EVAL_PERIOD") + 1])
        max_iter = int(opts[opts.index("SOLVER.MAX_ITER") + 1])
        rows = read_log_aps(os.path.join(output_dir(base, name), "log.txt"), period, max_iter)
        for done, r in read_metrics(path).items():
            if done in rows:
                assert abs(rows[done]["precise"] - r["precise"]) < 1e-3, (name, done)
            rows.setdefault(done, {}).update(r)
        for r in rows.values():
            r.setdefault("dist_mean", float("nan"))
            r.setdefault("dist_var", float("nan"))
        series[label] = rows
        for done, r in rows.items():
            lines.append(
                f"| {label} | {done} | {done * batch} | {r['ema']:.2f} | {r['precise']:.2f} "
                f"| {r['precise'] - r['ema']:+.2f} | {_fmt(r['dist_mean'])} / {_fmt(r['dist_var'])} |"
            )
    table = "\n".join(lines)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write("# Measured by `python projects/PreciseBN/run_study.py`\n\n" + table + "\n")
    _plot(series)
    return table


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.3f}"


def _plot(series) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, rows), color in zip(series.items(), ("tab:blue", "tab:red")):
        batch = 16 if label.startswith("batch 16") else 64
        x = [done * batch for done in rows]
        ax.plot(x, [r["ema"] for r in rows.values()], "--o", color=color, label=f"{label}: EMA")
        ax.plot(x, [r["precise"] for r in rows.values()], "-s", color=color, label=f"{label}: precise")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("COCO box AP (toy_coco_val)")
    ax.set_title("EMA vs precise BN statistics (toy RetinaNet R18-FPN, 2 workers)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "ap_ema_vs_precise.png"), dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(ROOT, "output", "precise_bn_study"))
    p.add_argument("--report", action="store_true", help="only rebuild table and plot")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args(argv)
    if not args.report:
        for name in args.runs:
            train(args.output, name)
    print(report(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
