#!/usr/bin/env python
"""
Summarizes the leakage study: for each head variant, AP evaluated with population
statistics (the training run ``RUN``) and with mini-batch statistics (``RUN_mini_batch``,
an ``--eval-only`` run), and the gap between the two.

    python projects/LeakageStudy/summarize.py --out projects/LeakageStudy/results \
        --dataset toy_coco_relative_val LABEL=RUN ...

A head whose training statistics leak per-image information does better when the test
batch supplies the same kind of statistics (mini-batch) than with population statistics:
a positive gap. Writes results.md, results.csv and results.png; a run that failed or is
unfinished is shown as such.
"""
import argparse
import csv
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from compare import read_run  # noqa: E402

TASKS = (("bbox/AP", "bbox AP"), ("segm/AP", "segm AP"))


def _value(run, key):
    return run.metrics.get(key) if run.status == "ok" else None


def _fmt(value, signed=False, digits=1):
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


PROBE = (("loss_cls", "loss_cls", 3), ("fast_rcnn/fg_cls_accuracy", "fg accuracy", 3))


def _probe(path):
    probe = os.path.join(path, "leakage_probe.json")
    if not os.path.isfile(probe):
        return None
    with open(probe) as f:
        return json.load(f)


def _probe_table(rows):
    header = ["head"]
    for _, name, _ in PROBE:
        header += [f"{name}, batch stats", f"{name}, population stats", f"{name} gap (pop − batch)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    records = []
    for label, pop, _ in rows:
        probe = _probe(pop.path)
        cells, record = [label], {"head": label}
        for key, name, digits in PROBE:
            a = probe["batch"].get(key) if probe else None
            b = probe["population"].get(key) if probe else None
            gap = None if a is None or b is None else b - a
            cells += [_fmt(a, digits=digits), _fmt(b, digits=digits), _fmt(gap, True, digits)]
            record.update({f"probe {key} batch": a, f"probe {key} population": b, f"probe {key} gap": gap})
        lines.append("| " + " | ".join(cells) + " |")
        records.append(record)
    return "\n".join(lines) + "\n", records


def summarize(specs, out_dir, dataset):
    rows = []
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            label, path = os.path.basename(os.path.normpath(spec)), spec
        population = read_run(path, label)
        mini = read_run(os.path.normpath(path) + "_mini_batch", label + " (mini-batch)")
        rows.append((label, population, mini))

    header = ["head", "mitigation"]
    for _, name in TASKS:
        header += [f"{name}, population stats", f"{name}, mini-batch stats", f"{name} gap (mini − pop)"]
    header += ["status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    records = []
    for label, pop, mini in rows:
        cells = [label, pop.mitigation]
        record = {"head": label, "mitigation": pop.mitigation}
        for key, name in TASKS:
            a, b = _value(pop, key), _value(mini, key)
            gap = None if a is None or b is None else b - a
            cells += [_fmt(a), _fmt(b), _fmt(gap, signed=True)]
            record.update({f"{key} population": a, f"{key} mini-batch": b, f"{key} gap": gap})
        status = "ok" if pop.status == mini.status == "ok" else (
            f"population: {pop.status} {pop.detail}".strip() + f"; mini-batch: {mini.status} {mini.detail}".strip()
        )
        cells.append(status.replace("|", "/"))
        record["status"] = status
        lines.append("| " + " | ".join(cells) + " |")
        records.append(record)
    probe_markdown, probe_records = _probe_table(rows)
    for record, extra in zip(records, probe_records):
        record.update({k: v for k, v in extra.items() if k != "head"})
    markdown = (
        f"COCO AP on {dataset}, evaluated with population and with mini-batch "
        "statistics (as many images per worker as in training):\n\n" + "\n".join(lines) + "\n\n"
        "Leakage probe: training-style batches of held-out images (RoIs sampled as in "
        "training, losses), the heads' BN with the batch's statistics vs. population "
        "statistics, mean over 2 workers x 20 batches:\n\n" + probe_markdown
    )

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0].keys()) if records else ["head"])
        writer.writeheader()
        writer.writerows(records)
    _plot(rows, os.path.join(out_dir, "results.png"), dataset)
    return markdown


def _plot(rows, path, dataset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.8), sharey=True)
    for ax, (key, name) in zip(axes, TASKS):
        for j, (which, offset) in enumerate((("population", -0.2), ("mini-batch", 0.2))):
            heights, xs = [], []
            for i, (label, pop, mini) in enumerate(rows):
                value = _value(pop if which == "population" else mini, key)
                xs.append(i + offset)
                heights.append(0.0 if value is None else value)
                if value is None:
                    ax.text(i + offset, 0.5, "n/a", ha="center", va="bottom", color="red", fontsize=8, rotation=90)
            bars = ax.bar(xs, heights, 0.4, label=f"{which} statistics")
            for bar, h in zip(bars, heights):
                if h:
                    ax.annotate(f"{h:.1f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([label for label, _, _ in rows], fontsize=7, rotation=25, ha="right")
        ax.set_title(f"{name} on {dataset}", fontsize=9)
    axes[0].set_ylabel("COCO AP")
    axes[0].legend(fontsize=7, loc="upper left")
    top = max([v for _, pop, mini in rows for r in (pop, mini) for v in r.metrics.values()] + [1.0])
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
