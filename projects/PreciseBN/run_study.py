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
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIG = "configs/Toy/retinanet_R18_FPN_bn_head.yaml"

# name -> (label, opts); both runs see the same 640 images (16 x 40 = 64 x 10); the
# config's LR steps (220, 270) lie beyond MAX_ITER: constant LR after the warm-up
RUNS = {
    "batch16": ("batch 16 (8/worker)", [
        "SOLVER.IMS_PER_BATCH", "16", "SOLVER.MAX_ITER", "40", "SOLVER.WARMUP_ITERS", "20",
        "TEST.EVAL_PERIOD", "20",
    ]),
    "batch64": ("batch 64 (32/worker), LR x2", [
        "SOLVER.IMS_PER_BATCH", "64", "SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.BASE_LR", "0.04", "TEST.EVAL_PERIOD", "5",
    ]),
}
COMMON = ["TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.EVAL_EMA", "True",
          "TEST.PRECISE_BN.NUM_SAMPLES", "128", "TEST.PRECISE_BN.IMS_PER_BATCH", "16"]


def output_dir(base: str, name: str) -> str:
    return os.path.join(base, name)


def train(base: str, name: str) -> None:
    opts = RUNS[name][1] + COMMON + ["OUTPUT_DIR", output_dir(base, name)]
    cmd = [sys.executable, "tools/train_net.py", "--config-file", CONFIG, "--num-gpus", "2",
           "--dist-url", "auto", *opts]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def read_metrics(path: str):
    """{iteration: {"ema": AP, "precise": AP, "dist_var": ...}} from a metrics.json."""
    rows = defaultdict(dict)
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            it = d.get("iteration")
            if "ema/bbox/AP" in d:
                rows[it]["ema"] = d["ema/bbox/AP"]
            if "bbox/AP" in d:
                rows[it]["precise"] = d["bbox/AP"]
            if "precise_bn/ema_var_rel_dist" in d:
                rows[it]["dist_mean"] = d["precise_bn/ema_mean_rel_dist"]
                rows[it]["dist_var"] = d["precise_bn/ema_var_rel_dist"]
    return {it: r for it, r in sorted(rows.items()) if "ema" in r and "precise" in r}


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
        rows = read_metrics(path)
        series[label] = rows
        for it, r in rows.items():
            lines.append(
                f"| {label} | {it + 1} | {(it + 1) * batch} | {r['ema']:.2f} | {r['precise']:.2f} "
                f"| {r['precise'] - r['ema']:+.2f} | {r.get('dist_mean', float('nan')):.3f} / "
                f"{r.get('dist_var', float('nan')):.3f} |"
            )
    table = "\n".join(lines)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write("# Measured by `python projects/PreciseBN/run_study.py`\n\n" + table + "\n")
    _plot(series)
    return table


def _plot(series) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, rows), color in zip(series.items(), ("tab:blue", "tab:red")):
        batch = 16 if label.startswith("batch 16") else 64
        x = [(it + 1) * batch for it in rows]
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
