#!/usr/bin/env python
"""
BN monitor study: does the monitor's leakage / inconsistency gap tell the per-worker BN
head from the shuffle and SyncBN heads early in training, over seeds?

The setting of projects/LeakageStudy at 1 image per worker: the toy Mask R-CNN
(configs/Toy/mask_rcnn_R18_FPN_{bn,shuffle,syncbn}_head.yaml) on toy_coco_relative, 2 CPU
processes, batch 2 (1 image per worker), the first ``--iters`` iterations of the
LeakageStudy's 2000-iteration schedule (LR steps at 1466 and 1800, so no decay here), with
``BN.MONITOR.ENABLED True BN.MONITOR.PERIOD <period>`` and no evaluation. Each run's
metrics.json gives the monitor's scalars every period; the gap is
``bn_monitor/leakage_gap/<loss>`` = loss of the monitor's fixed batch with population
statistics minus with batch statistics (averaged over the 2 workers).

    python projects/BNMonitor/run_study.py                    # trains what is missing, reports
    python projects/BNMonitor/run_study.py --report           # only re-reads the runs
    python projects/BNMonitor/run_study.py --seeds 1,2,3 --iters 400 --period 25

Runs go to ``<output>/<head>_head/seed<S>`` (seeds outermost: an interrupted study has whole
seeds; a run whose metrics.json reaches the last iteration is reused). Writes results.md,
results.csv (one row per head, seed and monitored iteration), gap.png (gap vs iteration,
mean ± sd over seeds per head) and tensorboard.png (the monitor's scalars of one seed as the
TensorBoard event files hold them) into ``--results`` (default: next to this file).
"""
import argparse
import csv
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from d2_batchnorm.experiments import mean_sd, parse_seeds
from d2_batchnorm.tables import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEADS = ("bn", "shuffle", "syncbn")
DATA = ["DATASETS.TRAIN", '("toy_coco_relative_train",)', "DATASETS.TEST", "()"]
#: the LeakageStudy's 1-image schedule (2000 iterations), cut at --iters; each rank keeps its
#: own running statistics, as when the study was measured (averaging them at the last
#: iteration would zero the last point's rank divergence)
SCHEDULE = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "(1466,1800)", "TEST.EVAL_PERIOD", "0",
            "BN.EMA_ACROSS_WORKERS", "per_worker"]
GAP = "bn_monitor/leakage_gap/total_loss"
GAP_CLS = "bn_monitor/leakage_gap/loss_cls"
COLUMNS = (GAP, GAP_CLS, "bn_monitor/gap_batch_loss/total_loss",
           "bn_monitor/batch_mean_shift/roi_heads.box_head", "bn_monitor/batch_var_ratio/roi_heads.box_head",
           "bn_monitor/rank_divergence/roi_heads.box_head", "bn_monitor/rank_divergence/roi_heads.mask_head")


def _run_dir(out: str, head: str, seed: int) -> str:
    return os.path.join(out, f"{head}_head", f"seed{seed}")


def read_monitor(run: str) -> Dict[int, Dict[str, float]]:
    """``{iteration: {bn_monitor scalar: value}}`` from a run's metrics.json."""
    rows: Dict[int, Dict[str, float]] = {}
    path = os.path.join(run, "metrics.json")
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            values = {k: v for k, v in entry.items() if k.startswith("bn_monitor/")}
            if values:
                rows.setdefault(int(entry["iteration"]), {}).update(values)
    return rows


def train(out: str, head: str, seed: int, iters: int, period: int) -> None:
    run = _run_dir(out, head, seed)
    if max(read_monitor(run), default=-1) >= iters - 1:
        print(f"[monitor study] reusing {run}", flush=True)
        return
    os.makedirs(run, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--num-gpus", "2", "--dist-url", "auto",
           "--config-file", os.path.join(ROOT, "configs", "Toy", f"mask_rcnn_R18_FPN_{head}_head.yaml"),
           *DATA, *SCHEDULE, "SOLVER.MAX_ITER", str(iters), "SEED", str(seed),
           "BN.MONITOR.ENABLED", "True", "BN.MONITOR.PERIOD", str(period), "OUTPUT_DIR", run]
    print(f"[monitor study] {time.strftime('%H:%M:%S')} seed {seed}: {head}_head, {iters} iterations", flush=True)
    start = time.time()
    with open(os.path.join(run, "train_net.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    print(f"[monitor study] {'done' if rc == 0 else 'FAILED (see train_net.log)'} in {time.time() - start:.0f} s",
          flush=True)


def _stats(values: List[float]):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(out: str, seeds: List[int], results: str, iters: int, period: int) -> str:
    data = {(h, s): read_monitor(_run_dir(out, h, s)) for h in HEADS for s in seeds}
    data = {k: v for k, v in data.items() if v}
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["head", "seed", "iteration", *COLUMNS])
        for (h, s), rows in sorted(data.items()):
            for it, values in sorted(rows.items()):
                writer.writerow([h, s, it, *(values.get(c, "") for c in COLUMNS)])
    iterations = sorted({it for rows in data.values() for it in rows})
    runs = ", ".join(f"{h}: {sorted(s for hh, s in data if hh == h)}" for h in HEADS)
    md = [
        "# BN monitor study: the leakage / inconsistency gap early in training\n",
        f"Toy Mask R-CNN on toy_coco_relative, 1 image per worker, 2 CPU processes; the first {iters} "
        f"iterations of the LeakageStudy's 2000-iteration schedule; monitor period {period}. Gap = training "
        "loss of the monitor's fixed batch with population statistics minus with batch statistics (mean "
        "over the 2 workers), mean ± sd over seeds (n). Runs: " + runs + ".\n",
        "'separated': every bn-head seed's gap is above every shuffle and SyncBN seed's gap.\n",
    ]
    for key, title in ((GAP, "total loss"), (GAP_CLS, "loss_cls (the LeakageStudy probe's quantity)")):
        table, separated = [], []
        for it in iterations:
            cells, per_head = [str(it + 1)], {}
            for h in HEADS:
                per_head[h] = [rows[it][key] for (hh, _), rows in data.items() if hh == h and it in rows and key in rows[it]]
                cells.append(mean_sd(per_head[h], 3, signed=True, show_n=True))
            others = per_head["shuffle"] + per_head["syncbn"]
            sep = bool(per_head["bn"]) and bool(others) and min(per_head["bn"]) > max(others)
            separated.append((it, sep))
            table.append(cells + ["yes" if sep else "no"])
        first = next((it + 1 for it, sep in separated if sep and all(s for i, s in separated if i >= it)), None)
        late = {h: [statistics.mean(v[key] for it, v in rows.items() if it + 1 > iters // 2 and key in v)
                    for (hh, _), rows in sorted(data.items()) if hh == h
                    and any(it + 1 > iters // 2 and key in v for it, v in rows.items())] for h in HEADS}
        md += [
            f"\n## Gap in {title}\n",
            markdown_table(["iteration", "bn head", "shuffle head", "SyncBN head", "separated"], table),
            f"\nSeparated from iteration {first} on, at every later monitored iteration.\n" if first else
            f"\nNot separated: at {sum(s for _, s in separated)} of {len(separated)} monitored iterations the bn "
            "head's seeds are all above the others', and never from some iteration to the end.\n",
            f"\nMean gap over the monitored iterations after {iters // 2} (per seed, then mean ± sd over "
            "seeds): " + ", ".join(f"{h} {mean_sd(late[h], 3, signed=True, show_n=True)}" for h in HEADS) + ".\n",
        ]
    md.append("\nRegenerate: `python projects/BNMonitor/run_study.py` (see its docstring).\n")
    text = "\n".join(md)
    with open(os.path.join(results, "results.md"), "w") as f:
        f.write(text)
    _plot_gap(data, iterations, os.path.join(results, "gap.png"))
    seed = seeds[0] if seeds else None
    if seed is not None:
        _plot_tensorboard({h: _run_dir(out, h, seed) for h in HEADS}, os.path.join(results, "tensorboard.png"))
    return text


def _plot_gap(data, iterations, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], GAP, "total loss"), (axes[1], GAP_CLS, "loss_cls")):
        for h in HEADS:
            xs, means, sds = [], [], []
            for it in iterations:
                values = [rows[it][key] for (hh, _), rows in data.items() if hh == h and it in rows and key in rows[it]]
                if values:
                    m, sd = _stats(values)
                    xs.append(it + 1), means.append(m), sds.append(sd)
            if xs:
                ax.plot(xs, means, label=f"{h} head")
                ax.fill_between(xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)], alpha=0.2)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel("iteration")
        ax.set_ylabel("gap (population − batch)")
        ax.set_title(f"leakage gap, {title} (mean ± sd over seeds)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_tensorboard(runs: Dict[str, str], path: str) -> None:
    """The bn_monitor scalars of each run as its TensorBoard event file records them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: Dict[str, Dict[str, tuple]] = {}
    for head, run in runs.items():
        files = sorted(glob.glob(os.path.join(run, "events.out.tfevents.*")))
        if not files:
            continue
        acc = EventAccumulator(files[-1], size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("bn_monitor/") and "rpn" not in tag:
                events = acc.Scalars(tag)
                series.setdefault(tag, {})[head] = ([e.step for e in events], [e.value for e in events])
    if not series:
        return
    tags = sorted(series)
    cols = 4
    rows = (len(tags) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for head, (steps, values) in sorted(series[tag].items()):
            ax.plot(steps, values, label=head, lw=1)
        ax.set_title(tag.replace("bn_monitor/", ""), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("bn_monitor/* scalars from the TensorBoard event files (one seed per head)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "bn_monitor_study"))
    parser.add_argument("--results", default=HERE)
    parser.add_argument("--seeds", default="1,2,3", help="K (seeds 1..K) or S1,S2,...")
    parser.add_argument("--iters", type=int, default=250)
    parser.add_argument("--period", type=int, default=25)
    parser.add_argument("--report", action="store_true", help="only re-read the runs and write the report")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        parser.error(str(e))
    for name in ("iters", "period"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} = {getattr(args, name)} is not allowed; it must be >= 1")
    if not args.report:
        for seed in seeds:
            for head in HEADS:
                train(args.output, head, seed, args.iters, args.period)
            print(report(args.output, seeds, args.results, args.iters, args.period), flush=True)
    print(report(args.output, seeds, args.results, args.iters, args.period))
    return 0


if __name__ == "__main__":
    sys.exit(main())
