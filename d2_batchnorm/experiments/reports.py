"""
Reports of a comparison: ``compare.md`` (a Markdown table: one row per run, or one per
variant with its spread over seeds), ``compare.csv`` (one row per run) and
``compare.png`` (a bar chart with error bars and one dot per seed).
"""
import csv
import math
import os
import statistics
from typing import List, Optional

from ..tables import markdown_table
from .runs import COLUMNS, RunResult, status_text
from .stats import beyond_spread, by_label, mean_sd, ok_values, paired_differences

__all__ = ["write_tables", "write_seed_tables", "paired_summary", "plot"]


def _fmt(value: Optional[float]) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.1f}"


def _columns(runs: List[RunResult]):
    """The (key, name) of :data:`~.runs.COLUMNS` that some run has (the first two if none)."""
    return [(k, name) for k, name in COLUMNS if any(k in r.metrics for r in runs)] or list(COLUMNS[:2])


def _write(markdown: str, runs: List[RunResult], out_dir: str) -> str:
    """
    Writes ``markdown`` into compare.md and ``runs`` into compare.csv (one row per run,
    with its seed when compare.py set one); returns ``markdown``.
    """
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, "compare.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "seed", "path", "mitigation", "statistics"] + [k for k, _ in COLUMNS]
                        + ["status", "detail", "seconds"])
        for r in runs:
            writer.writerow(
                [r.label, "" if r.seed is None else r.seed, r.path, r.mitigation, r.statistics]
                + [r.metrics.get(k, "") for k, _ in COLUMNS]
                + [r.status, r.detail, "" if r.seconds is None else round(r.seconds, 1)]
            )
    return markdown


def write_tables(runs: List[RunResult], out_dir: str) -> str:
    """Writes compare.md and compare.csv into ``out_dir``; returns the Markdown text."""
    columns = _columns(runs)
    header = ["run", "head leakage mitigation", "inference statistics"] + [n for _, n in columns]
    header += ["status", "time (s)"]
    rows = [
        [r.label, r.mitigation, r.statistics]
        + [_fmt(r.metrics.get(k)) if r.status == "ok" else "—" for k, _ in columns]
        + [status_text(r), "" if r.seconds is None else f"{r.seconds:.0f}"]
        for r in runs
    ]
    return _write(markdown_table(header, rows), runs, out_dir)


def plot(runs: List[RunResult], path: str, title: str = "") -> None:
    """
    Grouped bar chart of the AP columns per variant (label): the mean over its ok runs,
    with the standard deviation as an error bar and every seed as a dot when it has
    several; a variant without any ok run is marked with its status.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(by_label(runs).items())
    columns = _columns(runs)
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.2))
    for j, (key, name) in enumerate(columns):
        values = [ok_values(group, key) for _, group in groups]
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(groups))]
        means = [statistics.mean(v) if v else 0.0 for v in values]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        bars = ax.bar(xs, means, width, yerr=sds if any(sds) else None, capsize=3, label=name)
        for x, bar, mean, sd, v in zip(xs, bars, means, sds, values):
            if len(v) > 1:
                ax.plot([x] * len(v), v, "k.", markersize=3)
            if v:  # above the error bar
                ax.annotate(f"{mean:.1f}", (bar.get_x() + bar.get_width() / 2, mean + sd), ha="center",
                            va="bottom", fontsize=7)
    top = max([v for r in runs for v in r.metrics.values() if not math.isnan(v)] + [1.0])
    for i, (_, group) in enumerate(groups):
        if all(r.status != "ok" for r in group):
            ax.text(i, top * 0.05, group[0].status.upper(), ha="center", va="bottom", color="red",
                    fontsize=9, rotation=90)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label for label, _ in groups], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("COCO AP" + (" (mean ± sd over seeds)" if any(len(g) > 1 for _, g in groups) else ""))
    ax.set_ylim(0, top * 1.15)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_seed_tables(runs: List[RunResult], out_dir: str, baseline: Optional[str] = None) -> str:
    """
    Writes compare.md (one row per variant: mean ± sd over its seeds, the per-seed values,
    and, with ``baseline``, the paired difference to it) and compare.csv (one row per run);
    returns the Markdown text.
    """
    columns = _columns(runs)
    header = ["variant", "head leakage mitigation", "inference statistics", "seeds ok"]
    header += [f"{name} (mean ± sd)" for _, name in columns] + [f"{columns[0][1]} per seed"]
    diffs = paired_differences(runs, baseline, columns[0][0]) if baseline else {}
    if baseline:
        header.append(f"Δ {columns[0][1]} vs {baseline} (paired, mean ± sd)")
    header.append("not ok")
    rows = []
    for label, group in by_label(runs).items():
        ok = [r for r in group if r.status == "ok"]
        first = next((r for r in group if r.mitigation or r.statistics), group[0])
        row = [label, first.mitigation, first.statistics, f"{len(ok)}/{len(group)}"]
        row += [mean_sd(ok_values(group, k)) for k, _ in columns]
        row.append(", ".join(f"{r.seed}: {_fmt(r.metrics.get(columns[0][0]))}" for r in ok))
        if baseline:
            row.append("(baseline)" if label == baseline else mean_sd(diffs.get(label, [])))
        row.append("; ".join(f"seed {r.seed} {status_text(r)}" for r in group if r.status != "ok"))
        rows.append(row)
    return _write(markdown_table(header, rows), runs, out_dir)


def paired_summary(runs: List[RunResult], baseline: str) -> str:
    """
    One line reading the table's paired-difference column: each variant's difference to
    ``baseline`` in the first metric (mean ± sd over the seeds where both are ok, their
    number) and whether it is beyond its spread (:func:`~.stats.beyond_spread`).
    """
    key, name = _columns(runs)[0]
    parts = [f"{label} {mean_sd(d, signed=True, empty='n/a')} ({len(d)} seeds, {beyond_spread(d)})"
             for label, d in paired_differences(runs, baseline, key).items()]
    return f"Δ {name} vs {baseline}, paired per seed: " + "; ".join(parts)
