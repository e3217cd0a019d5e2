#!/usr/bin/env python
"""
Summarizes the leakage study: for each head variant, AP evaluated with population
statistics (the training runs ``RUN/seed<S>``, or ``RUN`` itself) and with mini-batch
statistics (``RUN_mini_batch/seed<S>``, ``--eval-only`` runs), the gap between the two
paired per seed, and the leakage probe; mean ± sd over the seeds.

    python projects/LeakageStudy/summarize.py --out projects/LeakageStudy/results \
        --dataset toy_coco_relative_val LABEL=RUN ...

A head whose training statistics leak per-image information does better when the test
batch supplies the same kind of statistics (mini-batch) than with population statistics:
a positive gap. Writes results.md, results.csv (one row per head and seed) and results.png;
a run that failed or is unfinished is shown as such.
"""
import argparse
import csv
import json
import os
import statistics
import sys

from d2_batchnorm.experiments import mean_sd, read_dir

HERE = os.path.dirname(os.path.abspath(__file__))

TASKS = (("bbox/AP", "bbox AP"), ("segm/AP", "segm AP"))


def _fmt(value, signed=False, digits=1):
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _mean_sd(values, signed=False, digits=1):
    """``mean ± sd (n)`` over seeds (sample sd); the value alone for one seed; — for none."""
    return mean_sd(values, digits=digits, signed=signed, show_n=True, empty="—")


PROBE = (("loss_cls", "loss_cls", 3), ("fast_rcnn/fg_cls_accuracy", "fg accuracy", 3))


def _probe(path):
    probe = os.path.join(path, "leakage_probe.json")
    if not os.path.isfile(probe):
        return None
    with open(probe) as f:
        return json.load(f)


def _seed_rows(label, path):
    """
    One record per seed of head ``label``: its training run(s) in ``path`` (seed<S>
    folders, or ``path`` itself) and the --eval-only runs with mini-batch statistics in
    ``path`` + "_mini_batch" (same layout), with the probe of each training run.
    """
    minis = {r.seed: r for r in read_dir(os.path.normpath(path) + "_mini_batch", label)}
    records = []
    for pop in read_dir(path, label):
        mini = minis.get(pop.seed)
        record = {"head": label, "seed": pop.seed, "mitigation": pop.mitigation, "path": pop.path}
        for key, _ in TASKS:
            a = pop.metrics.get(key) if pop.status == "ok" else None
            b = mini.metrics.get(key) if mini is not None and mini.status == "ok" else None
            record.update({f"{key} population": a, f"{key} mini-batch": b,
                           f"{key} gap": None if a is None or b is None else b - a})
        probe = _probe(pop.path)
        for key, _, _ in PROBE:
            a = probe["batch"].get(key) if probe else None
            b = probe["population"].get(key) if probe else None
            record.update({f"probe {key} batch": a, f"probe {key} population": b,
                           f"probe {key} gap": None if a is None or b is None else b - a})
        status = [f"{what}: {r.status} {r.detail}".strip() for what, r in (("population", pop), ("mini-batch", mini))
                  if r is not None and r.status != "ok"] + (["mini-batch: missing"] if mini is None else [])
        record["status"] = "; ".join(status) or "ok"
        records.append(record)
    return records


def summarize(specs, out_dir, dataset):
    heads = []
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            label, path = os.path.basename(os.path.normpath(spec)), spec
        heads.append((label, _seed_rows(label, path)))

    header = ["head", "mitigation", "seeds"]
    for _, name in TASKS:
        header += [f"{name}, population stats", f"{name}, mini-batch stats", f"{name} gap (mini − pop)"]
    header += [f"{TASKS[0][1]} gap per seed", "not ok"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for label, records in heads:
        cells = [label, records[0]["mitigation"] if records else "", ", ".join(str(r["seed"]) for r in records)]
        for key, _ in TASKS:
            cells += [_mean_sd([r[f"{key} population"] for r in records]),
                      _mean_sd([r[f"{key} mini-batch"] for r in records]),
                      _mean_sd([r[f"{key} gap"] for r in records], signed=True)]
        key = TASKS[0][0]
        cells.append(", ".join(f"{r['seed']}: {_fmt(r[f'{key} gap'], True)}" for r in records))
        cells.append("; ".join(f"seed {r['seed']} {r['status']}" for r in records if r["status"] != "ok"))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")

    probe_header = ["head"]
    for _, name, _ in PROBE:
        probe_header += [f"{name}, batch stats", f"{name}, population stats", f"{name} gap (pop − batch)"]
    probe_lines = ["| " + " | ".join(probe_header) + " |", "|" + "|".join("---" for _ in probe_header) + "|"]
    for label, records in heads:
        cells = [label]
        for key, _, digits in PROBE:
            cells += [_mean_sd([r[f"probe {key} {which}"] for r in records], signed=which == "gap", digits=digits)
                      for which in ("batch", "population", "gap")]
        probe_lines.append("| " + " | ".join(cells) + " |")

    markdown = (
        f"COCO AP on {dataset}, evaluated with population and with mini-batch statistics (as "
        "many images per worker as in training); mean ± sample sd over seeds (number of seeds), "
        "the gap paired per seed:\n\n" + "\n".join(lines) + "\n\n"
        "Leakage probe: training-style batches of held-out images (RoIs sampled as in "
        "training, losses), the heads' BN with the batch's statistics vs. population "
        "statistics, mean over 2 workers x 20 batches; mean ± sd over seeds:\n\n"
        + "\n".join(probe_lines) + "\n"
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown)
    rows = [r for _, records in heads for r in records]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["head"])
        writer.writeheader()
        writer.writerows(rows)
    _plot(heads, os.path.join(out_dir, "results.png"), dataset)
    return markdown


def _plot(heads, path, dataset):
    """Mean AP per head with population and with mini-batch statistics; sd bars, seed dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.8), sharey=True)
    top = 1.0
    for ax, (key, name) in zip(axes, TASKS):
        for which, offset in (("population", -0.2), ("mini-batch", 0.2)):
            for i, (label, records) in enumerate(heads):
                values = [r[f"{key} {which}"] for r in records if r[f"{key} {which}"] is not None]
                if not values:
                    ax.text(i + offset, 0.5, "n/a", ha="center", va="bottom", color="red", fontsize=8, rotation=90)
                    continue
                mean = statistics.mean(values)
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                ax.bar(i + offset, mean, 0.4, yerr=sd or None, capsize=3,
                       color="C0" if which == "population" else "C1",
                       label=f"{which} statistics" if i == 0 else None)
                ax.plot([i + offset] * len(values), values, "k.", markersize=3)
                ax.annotate(f"{mean:.1f}", (i + offset, mean + sd), ha="center", va="bottom", fontsize=7)
                top = max(top, max(values))
        ax.set_xticks(range(len(heads)))
        ax.set_xticklabels([label for label, _ in heads], fontsize=7, rotation=25, ha="right")
        ax.set_title(f"{name} on {dataset}", fontsize=9)
    axes[0].set_ylabel("COCO AP (mean ± sd over seeds)")
    axes[0].legend(fontsize=7, loc="upper left")
    axes[0].set_ylim(0, top * 1.25)
    fig.suptitle("BN heads: evaluation with population vs. mini-batch statistics", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--dataset", required=True, help="the test dataset the runs were evaluated on")
    args = parser.parse_args(argv)
    print(summarize(args.runs, args.out, args.dataset))
    print(f"[study] wrote {args.out}/results.md, results.csv, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
