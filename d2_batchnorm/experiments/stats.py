"""
Statistics over seeds: ``mean ± sd`` of a variant's runs, and the paired differences of
runs that saw the same seed — the spread that matters for "is A better than B".
"""
import math
import statistics
from typing import Dict, List

from .runs import RunResult

__all__ = ["ok_values", "mean_sd", "by_label", "paired_differences", "beyond_spread", "parse_seeds"]


def ok_values(group: List[RunResult], key: str) -> List[float]:
    """``key``'s values in the ok runs of ``group`` (NaN, COCO's "no detection", left out)."""
    return [r.metrics[key] for r in group
            if r.status == "ok" and key in r.metrics and not math.isnan(r.metrics[key])]


def mean_sd(values, digits: int = 1, signed: bool = False, show_n: bool = False, empty: str = "") -> str:
    """
    ``mean ± sd`` over ``values`` (sample standard deviation; the value alone for one),
    None and NaN left out; ``empty`` for none. ``signed``: the mean with its sign (a
    difference); ``show_n``: followed by the number of values, "(n)". The one formatter of
    spread over seeds, for this tool and the studies.
    """
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return empty
    mean = f"{statistics.mean(values):{'+' if signed else ''}.{digits}f}"
    text = mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{digits}f}"
    return f"{text} ({len(values)})" if show_n else text


def by_label(runs: List[RunResult]) -> Dict[str, List[RunResult]]:
    groups: Dict[str, List[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    return groups


def paired_differences(runs: List[RunResult], baseline: str, key: str) -> Dict[str, List[float]]:
    """
    Per label, ``metric(label, seed) - metric(baseline, seed)`` over the seeds where both
    runs are ok and have ``key``: differences of runs that saw the same seed (data order,
    initialization), whose spread is the spread that matters for the comparison.
    """
    groups = by_label(runs)
    base = {r.seed: v for r in groups.get(baseline, []) for v in ok_values([r], key)}
    return {
        label: [v - base[r.seed] for r in group if r.seed in base for v in ok_values([r], key)]
        for label, group in groups.items() if label != baseline
    }


def beyond_spread(differences: List[float]) -> str:
    """
    How a list of paired differences reads: "beyond its spread" when there are at least 2,
    all with the sign of their mean, and ``|mean| > sd``; "within its spread" otherwise;
    "one seed, no spread" for one value. The one rule for "A differs from B" in reports.
    """
    if len(differences) < 2:
        return "one seed, no spread" if differences else "no paired seeds"
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    same_sign = all(d * mean > 0 for d in differences)
    return "beyond its spread" if same_sign and abs(mean) > sd else "within its spread"


def parse_seeds(text: str) -> List[int]:
    """``--seeds``: "" → [] (the configs' own SEED), "K" → [1, ..., K], "S1,S2,..." → that list."""
    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"--seeds = {text!r} is not allowed; give a count K >= 1 or distinct seeds >= 0 "
                         "separated by commas")
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise ValueError(f"--seeds = {text!r} is not allowed; a count must be >= 1")
        return list(range(1, values[0] + 1))
    return values
