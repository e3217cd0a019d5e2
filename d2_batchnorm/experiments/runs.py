"""
Reading detection runs: what a run is (from its ``config.yaml``) and what it measured
(the last AP of ``metrics.json``, or the ``copypaste`` lines of ``log.txt``), into one
:class:`RunResult` per run, with a status that is never dropped: ``ok``, ``failed``,
``unfinished``, ``missing`` or ``corrupt``.
"""
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from ..config_kinds import describe_dump

__all__ = ["RunResult", "CorruptFile", "METRICS", "COLUMNS", "box_ap", "copypaste_blocks", "read_run",
           "read_dir", "status_text", "training_progress"]

METRICS = ("bbox/AP", "segm/AP")
COLUMNS = (
    ("bbox/AP", "bbox AP"),
    ("segm/AP", "segm AP"),
    ("ema/bbox/AP", "bbox AP (EMA stats)"),
    ("ema/segm/AP", "segm AP (EMA stats)"),
)


@dataclass
class RunResult:
    """One row of the comparison."""

    label: str
    path: str
    status: str = "missing"  # "ok" | "failed" | "unfinished" | "missing" | "corrupt"
    detail: str = ""
    mitigation: str = ""
    statistics: str = ""
    metrics: Dict[str, float] = field(default_factory=dict)
    seconds: Optional[float] = None
    seed: Optional[int] = None  # SEED of the run when compare.py ran it with --seeds


class CorruptFile(Exception):
    """A run's output file that cannot be read; its text is ``<file>: <reason>``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")


def _last_values(metrics_json: str) -> Dict[str, float]:
    """
    Last value of every key over the JSON lines of detectron2's metrics.json. Raises
    :class:`CorruptFile` on bytes that are not UTF-8 and on a line that is not a JSON
    object, except a last line without its newline (cut short by a killed run: skipped).
    """
    values: Dict[str, float] = {}
    with open(metrics_json, "rb") as f:
        lines = f.read().split(b"\n")  # the last item is b"" when the file ends with a newline
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CorruptFile(metrics_json, f"line {number} is not valid UTF-8") from None
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):  # no newline after it: a line cut short by a killed run
                break
            raise CorruptFile(metrics_json, f"line {number} is not a JSON object")
        for key, value in record.items():
            if isinstance(value, (int, float)):
                values[key] = float(value)
    return values


def box_ap(results: Dict) -> float:
    """
    The bbox AP of a detectron2 results dict (``{"bbox": {"AP": ...}, ...}``; nested by
    dataset when there are several: the first dataset's).
    """
    if "bbox" in results:
        return float(results["bbox"]["AP"])
    return box_ap(next(iter(results.values())))


def copypaste_blocks(log_txt: str) -> List[Dict[str, float]]:
    """
    Every evaluation result detectron2 printed in ``log_txt``, in order: one
    ``{"<task>/<metric>": value}`` dict per ``copypaste: Task: <task>`` /
    ``copypaste: AP,AP50,...`` / ``copypaste: 12.3,...`` block (values that are not
    numbers are left out).
    """
    blocks: List[Dict[str, float]] = []
    task, names = None, None
    with open(log_txt, errors="replace") as f:
        for line in f:
            if "copypaste:" not in line:
                continue
            text = line.split("copypaste:", 1)[1].strip()
            if text.startswith("Task:"):
                task, names = text.split(":", 1)[1].strip(), None
            elif task and names is None:
                names = [n.strip() for n in text.split(",")]
            elif task and names:
                block = {}
                for name, number in zip(names, text.split(",")):
                    try:
                        block[f"{task}/{name}"] = float(number)
                    except ValueError:  # e.g. a truncated line
                        continue
                blocks.append(block)
                task, names = None, None
    return blocks


def _failure_in_log(log_path: str) -> str:
    """The last line of the last traceback in ``log_path`` ('' if none)."""
    if not os.path.isfile(log_path):
        return ""
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return ""
    for line in reversed(lines[starts[-1]:]):
        if line.strip() and not line.startswith(" "):
            return line.strip()
    return "traceback in log"


def _describe(config_yaml: str) -> Tuple[str, str]:
    """
    (leakage mitigation of the box/mask heads, statistics used at inference). Raises
    :class:`CorruptFile` when ``config_yaml`` is not a UTF-8 YAML mapping.
    """
    import yaml

    try:
        with open(config_yaml, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except UnicodeDecodeError:
        raise CorruptFile(config_yaml, "not valid UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        reason = f"line {mark.line + 1} is not valid YAML" if mark else "not valid YAML"
        raise CorruptFile(config_yaml, reason) from None
    if not isinstance(cfg, dict):
        raise CorruptFile(config_yaml, "not a YAML mapping")
    run = describe_dump(cfg)
    mitigation, mask_mitigation = run["mitigation"], run["mask_mitigation"] or run["mitigation"]
    mitigation = mitigation if mask_mitigation == mitigation else f"{mitigation}/{mask_mitigation}"
    arch = run["arch"]
    if "RCNN" not in arch:
        mitigation = f"n/a ({arch}: no R-CNN heads)"
    elif mitigation == "none":
        mitigation = f"none ({run['norm'] or 'no norm'} head)"
    if run["bn_stats"] == "mini_batch":
        statistics = f"mini-batch ({run['test_batch']} img/worker)"
    elif run["precise_bn"]:
        statistics = "population (precise)"
    else:
        statistics = "population (EMA)"
    return mitigation, statistics


def training_progress(path: str) -> Optional[Tuple[int, str]]:
    """
    (iterations done, detectron2's ETA such as "0:03:21") of a training writing into
    ``path``, from the last ``eta: ... iter: N`` line of its ``log.txt``; None before the
    first.
    """
    log_txt = os.path.join(path, "log.txt")
    if not os.path.isfile(log_txt):
        return None
    with open(log_txt, "rb") as f:
        f.seek(max(os.path.getsize(log_txt) - 20000, 0))
        tail = f.read().decode("utf-8", errors="replace")
    found = re.findall(r"eta: (\S+)\s+iter: (\d+)", tail)
    return (int(found[-1][1]) + 1, found[-1][0]) if found else None


def read_run(path: str, label: Optional[str] = None, returncode: Optional[int] = None) -> RunResult:
    """
    Reads one output directory into a :class:`RunResult`. ``returncode`` is train_net's
    exit status when this tool ran it (non-zero: failed). A config.yaml or metrics.json
    that cannot be read makes the run ``corrupt``.
    """
    run = RunResult(label=label or os.path.basename(os.path.normpath(path)), path=path)
    if not os.path.isdir(path):
        run.status, run.detail = "missing", "no such output directory"
        return run
    config_yaml = os.path.join(path, "config.yaml")
    metrics_json = os.path.join(path, "metrics.json")
    try:
        if os.path.isfile(config_yaml):
            run.mitigation, run.statistics = _describe(config_yaml)
        values = _last_values(metrics_json) if os.path.isfile(metrics_json) else {}
    except CorruptFile as e:
        run.status, run.detail = "corrupt", str(e)
        return run
    log_txt = os.path.join(path, "log.txt")
    if not any(m in values for m in METRICS) and os.path.isfile(log_txt):
        for block in copypaste_blocks(log_txt):  # the last evaluation of each task wins
            values.update(block)
    run.metrics = {key: values[key] for key, _ in COLUMNS if key in values}
    failure = _failure_in_log(log_txt) or _failure_in_log(os.path.join(path, "train_net.log"))
    if returncode not in (None, 0):
        run.status, run.detail = "failed", failure or f"train_net exited with {returncode}"
    elif failure and not run.metrics:
        run.status, run.detail = "failed", failure
    elif not any(m in run.metrics for m in METRICS):
        run.status, run.detail = "unfinished", "no AP in metrics.json or log.txt"
    else:
        run.status = "ok"
    return run


def status_text(run: RunResult) -> str:
    return run.status if not run.detail else f"{run.status}: {run.detail}"


def read_dir(path: str, label: str) -> List[RunResult]:
    """
    The runs of an output directory: one per ``seed<N>`` subdirectory (as compare.py
    --seeds writes them), else the directory itself as one run.
    """
    seeds = sorted(
        int(name[4:]) for name in (os.listdir(path) if os.path.isdir(path) else [])
        if name.startswith("seed") and name[4:].isdigit() and os.path.isdir(os.path.join(path, name))
    )
    if not seeds:
        return [read_run(path, label)]
    return [replace(read_run(os.path.join(path, f"seed{seed}"), label), seed=seed) for seed in seeds]
