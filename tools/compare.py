#!/usr/bin/env python
"""
Compares detection runs: a Markdown and a CSV table of bbox/segm AP and a PNG bar chart.

    python tools/compare.py [--num-gpus 2] [--out DIR] [--seeds K [--baseline LABEL]] \
        RUN [RUN ...] [-- KEY VALUE ... key=value ...]

Each RUN is ``[LABEL=]PATH``:

* a config file: a yacs ``.yaml`` is trained and evaluated by ``tools/train_net.py``, a
  LazyConfig ``.py`` by ``tools/lazyconfig_train_net.py``, with ``--num-gpus N`` into
  ``DIR/runs/<LABEL>``, then read like a directory. The options after ``--`` go to every
  such run: yacs ``KEY VALUE`` pairs (to a LazyConfig run as their ``train.*`` names, for
  the keys of ``d2_batchnorm.config.TRAIN_SETTINGS``, e.g. ``SOLVER.MAX_ITER`` is
  ``train.max_iter``) and LazyConfig ``key=value`` overrides (to LazyConfig runs only);
* a finished (or failed, or unfinished) output directory: read as it is.

From a directory it reads ``config.yaml`` (written by either tool) for what the run is —
the heads' leakage mitigation and which statistics inference used — and its results:
the last ``bbox/AP`` / ``segm/AP`` of ``metrics.json`` (with PreciseBN, the AP with
precise statistics, and ``ema/bbox/AP`` / ``ema/segm/AP``, the AP with the EMA statistics
before they were replaced), or, for ``--eval-only`` runs, which write no metrics.json, the
``copypaste`` lines of ``log.txt``. Every run is a row with a status — ``ok``, ``failed``
(non-zero exit, or a traceback in its log), ``unfinished`` (no AP yet), ``missing`` (no
such directory) or ``corrupt`` (a metrics.json or config.yaml that cannot be read: not
UTF-8, a line of metrics.json that is not a JSON object, a config that is not a YAML
mapping; the detail names the file and why) — never dropped.

Writes ``DIR/compare.md``, ``DIR/compare.csv`` and ``DIR/compare.png`` and prints the
Markdown table. Exits 0 when every run has its AP, 1 otherwise, 2 on bad arguments.

Seeds and spread. ``--seeds K`` (seeds 1..K) or ``--seeds S1,S2,...`` runs every config
once per seed (``SEED`` set explicitly) into ``DIR/runs/<LABEL>/seed<S>``; a directory
holding such ``seed<S>`` folders is read the same way. The table then has one row per
variant with mean ± sample standard deviation over its ok runs and the per-seed values,
the CSV one row per run (with its seed), the plot error bars and one dot per seed. All
variants of one seed start from the same seed, so with ``--baseline LABEL`` each variant
also gets its paired difference to LABEL (per seed, then mean ± sd): the spread that
matters for "is A better than B".

Resuming. A config run whose folder holds a finished run (status ok) of the same request
(config, options, seed, processes; recorded in ``compare_request.json``) is reused, and
said so; a missing, failed, unfinished, corrupt or differently requested run is deleted
and run again. Re-running an interrupted command therefore only runs what is left.
"""
import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from d2_batchnorm.checks import check_int
from d2_batchnorm.engine.cluster import CLUSTERS, SubmissionRefused

__all__ = [
    "RunResult", "CorruptFile", "box_ap", "copypaste_blocks", "read_run", "read_dir", "run_config",
    "run_all", "parse_seeds", "mean_sd", "paired_differences", "write_tables", "write_seed_tables",
    "plot", "main",
]

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


def _copypaste_values(log_txt: str) -> Dict[str, float]:
    """AP values of ``log_txt``'s copypaste blocks; the last evaluation of each task wins."""
    values: Dict[str, float] = {}
    for block in copypaste_blocks(log_txt):
        values.update(block)
    return values


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
    run = _lazy_config_facts(cfg) if "model" in cfg else _yacs_config_facts(cfg)
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


def _yacs_config_facts(cfg: dict) -> dict:
    """What :func:`_describe` reports, from a yacs run's config.yaml."""
    model, test = cfg.get("MODEL", {}), cfg.get("TEST", {})
    box, mask = model.get("ROI_BOX_HEAD", {}), model.get("ROI_MASK_HEAD", {})
    return {
        "arch": model.get("META_ARCHITECTURE", "GeneralizedRCNN"),
        "norm": box.get("NORM", ""),
        "mitigation": box.get("LEAKAGE_MITIGATION", "none"),
        "mask_mitigation": mask.get("LEAKAGE_MITIGATION", "none") if model.get("MASK_ON") else None,
        "bn_stats": test.get("BN_STATS"),
        "test_batch": test.get("IMS_PER_BATCH"),
        "precise_bn": test.get("PRECISE_BN", {}).get("ENABLED"),
    }


def _lazy_config_facts(cfg: dict) -> dict:
    """What :func:`_describe` reports, from a LazyConfig run's config.yaml (lowercase sections)."""
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    roi_heads = model.get("roi_heads") or {}
    box, mask = roi_heads.get("box_head") or {}, roi_heads.get("mask_head")
    test = (cfg.get("dataloader") or {}).get("test") or {}
    return {
        "arch": str(model.get("_target_", "")).rsplit(".", 1)[-1],
        "norm": box.get("conv_norm", ""),
        "mitigation": box.get("leakage_mitigation", "none"),
        "mask_mitigation": mask.get("leakage_mitigation", "none") if isinstance(mask, dict) else None,
        "bn_stats": train.get("bn_stats"),
        "test_batch": test.get("batch_size", 1),
        "precise_bn": (train.get("precise_bn") or {}).get("enabled"),
    }


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
        values.update(_copypaste_values(log_txt))
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


TRAIN_NET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_net.py")
LAZY_TRAIN_NET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lazyconfig_train_net.py")
CONFIG_SUFFIXES = (".yaml", ".yml", ".py")


def split_opts(opts: List[str]) -> Tuple[List[str], List[str]]:
    """
    The options after ``--``: (yacs ``KEY VALUE`` pairs, LazyConfig ``key=value`` overrides);
    a token with "=" where a KEY is expected is an override. ``ValueError`` for a KEY
    without its VALUE.
    """
    pairs, overrides, i = [], [], 0
    while i < len(opts):
        if "=" in opts[i]:
            overrides.append(opts[i])
            i += 1
            continue
        if i + 1 >= len(opts):
            raise ValueError(f"the options after -- must be KEY VALUE pairs or key=value overrides; "
                             f"{opts[i]!r} has no value")
        pairs += opts[i:i + 2]
        i += 2
    return pairs, overrides


def train_command(config: str, output_dir: str, opts: List[str]) -> Tuple[str, List[str]]:
    """
    (script, arguments) that train and evaluate ``config`` into ``output_dir``: a ``.yaml``
    with tools/train_net.py and the yacs pairs of ``opts``; a LazyConfig ``.py`` with
    tools/lazyconfig_train_net.py, the overrides of ``opts`` and its yacs pairs under their
    LazyConfig names (``SEED`` is ``train.seed``: d2_batchnorm.config.TRAIN_SETTINGS).
    ``ValueError`` for a yacs key a LazyConfig does not have.
    """
    from d2_batchnorm.engine.defaults import is_lazy_config_file

    pairs, overrides = split_opts(opts)
    if not is_lazy_config_file(config):
        return TRAIN_NET, ["--config-file", config, *pairs, "OUTPUT_DIR", output_dir]
    from d2_batchnorm.config import TRAIN_SETTINGS

    paths = {key: path for key, path, _, _ in TRAIN_SETTINGS}
    for key, value in zip(pairs[::2], pairs[1::2]):
        if key not in paths:
            raise ValueError(f"{key} has no LazyConfig name for {config}; allowed yacs keys: "
                             f"{sorted(paths)}, or give key=value overrides")
        overrides.append(f"train.{paths[key]}={value}")
    return LAZY_TRAIN_NET, ["--config-file", config, *overrides, f"train.output_dir={output_dir}"]


def run_config(config: str, output_dir: str, num_gpus: int, opts: List[str], timeout: float) -> int:
    """Trains and evaluates ``config`` (:func:`train_command`); returns its exit status."""
    os.makedirs(output_dir, exist_ok=True)
    script, args = train_command(config, output_dir, opts)
    cmd = [sys.executable, script, "--num-gpus", str(num_gpus), "--dist-url", "auto", *args]
    with open(os.path.join(output_dir, "train_net.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\ncompare.py: killed after the --timeout of {timeout:.0f} s\n")
            return 124


REQUEST_FILE = "compare_request.json"


class LocalLauncher:
    """Runs each config now, one after the other, with tools/train_net.py --num-gpus N."""

    def __init__(self, num_gpus: int, timeout: float):
        self.num_gpus, self.timeout = num_gpus, timeout
        self.workers = num_gpus

    def start(self, config: str, output_dir: str, opts: List[str]):
        return run_config(config, output_dir, self.num_gpus, opts, self.timeout)

    def attach(self, output_dir: str, request: dict, name: str) -> None:
        """Nothing outlives this process: a run of an earlier call is never waited for."""

    def submit(self) -> None:
        """Nothing to submit: each run ran in :meth:`start`."""

    def finish(self, returncode: int) -> Tuple[int, str]:
        """(exit status, detail for a failed run)."""
        return returncode, ""


class SubmititLauncher:
    """
    Runs the configs as submitit jobs (:mod:`d2_batchnorm.engine.cluster`): ``start``
    prepares one :class:`~d2_batchnorm.engine.cluster.TrainNetJob` per run (nodes ×
    tasks-per-node processes of tools/train_net.py), ``submit`` sends them all at once —
    on SLURM as one job array, at most ``max_parallel`` running at a time — and ``finish``
    waits for each within bounded time of its end, whether it completed, failed, was
    cancelled or timed out. The job's id, state and log paths go to
    ``<run>/submitit_job.json``; submitit's files to ``<folder>/<job id>/``.
    """

    def __init__(self, cluster: str, folder: str, **resources):
        self.cluster, self.folder, self.resources = cluster, folder, resources
        self.workers = resources["nodes"] * resources["tasks_per_node"]
        self._pending: List[Tuple[str, object]] = []  # (run folder, TrainNetJob) to submit
        self._jobs: Dict[str, object] = {}  # run folder -> submitit job

    def start(self, config: str, output_dir: str, opts: List[str]) -> str:
        from d2_batchnorm.engine.cluster import TrainNetJob

        os.makedirs(output_dir, exist_ok=True)
        script, args = train_command(config, os.path.abspath(output_dir), opts)
        self._pending.append((output_dir, TrainNetJob(script, args)))
        return output_dir

    def attach(self, output_dir: str, request: dict, name: str) -> Optional[str]:
        """
        The handle of the SLURM job an earlier call submitted for ``output_dir`` with the
        same ``request`` if SLURM still has it queued or running (that call was stopped
        before it finished): waited for like a new one instead of submitted again. None
        otherwise.
        """
        from d2_batchnorm.engine.cluster import FINAL_STATES, slurm_job, slurm_job_states

        try:
            with open(os.path.join(output_dir, "submitit_job.json")) as f:
                record = json.load(f)
            with open(os.path.join(output_dir, REQUEST_FILE)) as f:
                done = json.load(f)
        except (OSError, ValueError):
            return None
        if self.cluster != "slurm" or record.get("cluster") != "slurm" or done != {"request": request}:
            return None
        state = slurm_job_states([record["job_id"]]).get(record["job_id"])
        if state is None or state in FINAL_STATES:
            return None
        job = slurm_job(record["folder"], record["job_id"], record["tasks"])
        self._jobs[output_dir] = job
        print(f"[compare] {name}: waiting for job {job.job_id} ({state}), submitted by an earlier call",
              flush=True)
        return output_dir

    def submit(self) -> None:
        """
        Submits every started run (one job array on SLURM). Raises
        :class:`~d2_batchnorm.engine.cluster.SubmissionRefused` if the scheduler refuses it.
        """
        from d2_batchnorm.engine.cluster import make_executor, submit_jobs

        if not self._pending:
            return
        executor = make_executor(os.path.join(self.folder, "%j"), self.cluster, **self.resources)
        jobs = submit_jobs(executor, [fn for _, fn in self._pending])
        for (output_dir, _), job in zip(self._pending, jobs):
            self._jobs[output_dir] = job
            self._record(output_dir, job, "SUBMITTED")
            print(f"[compare] submitted job {job.job_id} ({self.cluster}) for {output_dir}", flush=True)
        self._pending = []

    def finish(self, output_dir: str) -> Tuple[int, str]:
        """Waits for the run's job; (exit status, detail naming job, state and log when it failed)."""
        from d2_batchnorm.engine.cluster import describe_job_error, wait_job

        job = self._jobs[output_dir]
        state, error = wait_job(job, self.cluster)
        self._record(output_dir, job, state)
        if error is None:
            return 0, ""
        return 1, (f"job {job.job_id} {state}: {describe_job_error(error)}; "
                   f"log {job.task(0).paths.stderr} (stdout {job.task(0).paths.stdout})")

    def _record(self, output_dir: str, job, state: str) -> None:
        tasks = [job.task(k).paths for k in range(job.num_tasks)]
        path = os.path.join(output_dir, "submitit_job.json")
        with open(path + ".tmp", "w") as f:  # replaced whole: a reader never sees half of it
            json.dump({"job_id": job.job_id, "cluster": self.cluster, "state": state,
                       "resources": self.resources, "folder": os.path.join(self.folder, "%j"),
                       "tasks": job.num_tasks, "stdout": str(tasks[0].stdout),
                       "stderr": str(tasks[0].stderr), "task_logs": [str(t.stdout) for t in tasks]},
                      f, indent=1)
        os.replace(path + ".tmp", path)


def reusable_run(label: str, output_dir: str, request: dict, name: str) -> Optional[RunResult]:
    """
    The finished run (status ok) in ``output_dir`` if the same ``request`` made it (its
    ``REQUEST_FILE``); otherwise None, after deleting whatever is there (a missing, failed,
    unfinished, corrupt or differently requested run: detectron2 would append to it).
    """
    if not os.path.isdir(output_dir):
        return None
    request_path = os.path.join(output_dir, REQUEST_FILE)
    done = {}
    if os.path.isfile(request_path):
        with open(request_path) as f:
            done = json.load(f)
    run = read_run(output_dir, label)
    if run.status == "ok" and done.get("request") == request:
        run.seconds = done.get("seconds")
        print(f"[compare] {name}: reusing the finished run in {output_dir}", flush=True)
        return run
    found = _status_text(run) if done.get("request") == request else "made by another request"
    print(f"[compare] {name}: {output_dir} is {found}; running it again", flush=True)
    shutil.rmtree(output_dir)
    return None


def run_all(tasks: List[Tuple[str, str, str, Optional[int]]], launcher, opts: List[str]) -> List[RunResult]:
    """
    Runs (label, config, output_dir, seed) ``tasks`` with ``launcher``, reusing finished
    runs of the same request (config, options with SEED, workers) and waiting for the jobs
    of the same request that an earlier call left queued or running (``launcher.attach``):
    every run is started first (for a cluster: all jobs are queued at once), then finished
    in order.
    """
    started = []
    for label, config, output_dir, seed in tasks:
        name = label if seed is None else f"{label} seed {seed}"
        run_opts = list(opts) + ([] if seed is None else ["SEED", str(seed)])
        request = {"config": os.path.abspath(config), "opts": run_opts, "workers": launcher.workers}
        run, handle, start = None, launcher.attach(output_dir, request, name), time.perf_counter()
        if handle is None:
            run = reusable_run(label, output_dir, request, name)
        if run is None and handle is None:
            print(f"[compare] running {name}: {config} -> {output_dir}", flush=True)
            handle = launcher.start(config, output_dir, run_opts)  # the local launcher runs it now
            with open(os.path.join(output_dir, REQUEST_FILE), "w") as f:  # what attach() compares
                json.dump({"request": request}, f)
        started.append((label, output_dir, seed, name, request, run, handle, start))
    launcher.submit()  # a cluster's jobs all at once (one array); nothing for the local launcher
    runs = []
    for label, output_dir, seed, name, request, run, handle, start in started:
        if run is None:
            rc, detail = launcher.finish(handle)
            run = read_run(output_dir, label, rc)
            if detail:  # the launcher's reason replaces read_run's bare exit status
                generic = run.detail == f"train_net exited with {rc}"
                run.detail = detail if generic else f"{detail}; {run.detail}".rstrip("; ")
            run.seconds = time.perf_counter() - start
            with open(os.path.join(output_dir, REQUEST_FILE), "w") as f:
                json.dump({"request": request, "seconds": run.seconds, "returncode": rc}, f)
            print(f"[compare] {name}: {_status_text(run)} ({run.seconds:.0f} s)", flush=True)
        run.seed = seed
        runs.append(run)
    return runs


def _fmt(value: Optional[float]) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.1f}"


def _status_text(run: RunResult) -> str:
    return run.status if not run.detail else f"{run.status}: {run.detail}"


def write_tables(runs: List[RunResult], out_dir: str) -> str:
    """Writes compare.md and compare.csv into ``out_dir``; returns the Markdown text."""
    columns = [(k, name) for k, name in COLUMNS if any(k in r.metrics for r in runs)] or list(COLUMNS[:2])
    header = ["run", "head leakage mitigation", "inference statistics"] + [n for _, n in columns]
    header += ["status", "time (s)"]
    rows = []
    for r in runs:
        rows.append(
            [r.label, r.mitigation, r.statistics]
            + [_fmt(r.metrics.get(k)) if r.status == "ok" else "—" for k, _ in columns]
            + [_status_text(r).replace("|", "/"), "" if r.seconds is None else f"{r.seconds:.0f}"]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(markdown)
    _write_csv(runs, out_dir)
    return markdown


def _write_csv(runs: List[RunResult], out_dir: str) -> None:
    """compare.csv: one row per run (with its seed when compare.py set one)."""
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


def plot(runs: List[RunResult], path: str, title: str = "") -> None:
    """
    Grouped bar chart of the AP columns per variant (label): the mean over its ok runs,
    with the standard deviation as an error bar and every seed as a dot when it has
    several; a variant without any ok run is marked with its status.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(_by_label(runs).items())
    columns = [(k, n) for k, n in COLUMNS if any(k in r.metrics for r in runs)] or list(COLUMNS[:2])
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.2))
    for j, (key, name) in enumerate(columns):
        values = [_values(group, key) for _, group in groups]
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


def _values(group: List[RunResult], key: str) -> List[float]:
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


def _by_label(runs: List[RunResult]) -> Dict[str, List[RunResult]]:
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
    groups = _by_label(runs)
    base = {r.seed: v for r in groups.get(baseline, []) for v in _values([r], key)}
    return {
        label: [v - base[r.seed] for r in group if r.seed in base for v in _values([r], key)]
        for label, group in groups.items() if label != baseline
    }


def write_seed_tables(runs: List[RunResult], out_dir: str, baseline: Optional[str] = None) -> str:
    """
    Writes compare.md (one row per variant: mean ± sd over its seeds, the per-seed values,
    and, with ``baseline``, the paired difference to it) and compare.csv (one row per run);
    returns the Markdown text.
    """
    columns = [(k, name) for k, name in COLUMNS if any(k in r.metrics for r in runs)] or list(COLUMNS[:2])
    header = ["variant", "head leakage mitigation", "inference statistics", "seeds ok"]
    header += [f"{name} (mean ± sd)" for _, name in columns] + [f"{columns[0][1]} per seed"]
    diffs = paired_differences(runs, baseline, columns[0][0]) if baseline else {}
    if baseline:
        header.append(f"Δ {columns[0][1]} vs {baseline} (paired, mean ± sd)")
    header.append("not ok")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for label, group in _by_label(runs).items():
        ok = [r for r in group if r.status == "ok"]
        first = next((r for r in group if r.mitigation or r.statistics), group[0])
        row = [label, first.mitigation, first.statistics, f"{len(ok)}/{len(group)}"]
        row += [mean_sd(_values(group, k)) for k, _ in columns]
        row.append(", ".join(f"{r.seed}: {_fmt(r.metrics.get(columns[0][0]))}" for r in ok))
        if baseline:
            row.append("(baseline)" if label == baseline else mean_sd(diffs.get(label, [])))
        row.append("; ".join(f"seed {r.seed} {_status_text(r)}" for r in group if r.status != "ok"))
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    markdown = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(markdown)
    _write_csv(runs, out_dir)
    return markdown


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
    runs = []
    for seed in seeds:
        run = read_run(os.path.join(path, f"seed{seed}"), label)
        run.seed = seed
        runs.append(run)
    return runs


def _parse_run(spec: str) -> Tuple[str, str]:
    label, sep, path = spec.partition("=")
    if sep and label and not os.path.exists(spec):
        return label, path
    path = spec
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return stem, path


def submitit_resources(args) -> dict:
    """
    What each job of ``--launcher submitit`` asks for, from the command line: nodes, tasks
    per node, GPUs per node (by default one per task on a SLURM partition with GPU GRES, none
    on a CPU partition or without GRES; locally, where CUDA is), time limit, partition, CPUs
    per task, array cap and requeues. ``ValueError`` naming the flag for what cannot work.
    """
    gpus = args.gpus_per_node
    if gpus is None and args.cluster == "slurm":
        from d2_batchnorm.engine.cluster import partition_gpus

        gpus = args.num_gpus if partition_gpus(args.partition or None) > 0 else 0
    elif gpus is None:
        import torch

        gpus = args.num_gpus if torch.cuda.is_available() else 0
    tasks = args.tasks_per_node or gpus or args.num_gpus
    if args.cluster == "local" and args.nodes != 1:
        raise ValueError(f"--nodes = {args.nodes} is not allowed with --cluster local; it must be 1")
    return dict(nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=gpus,
                timeout_min=args.timeout_min or max(1, math.ceil(args.timeout / 60)),
                partition=args.partition or None, cpus_per_task=args.cpus_per_task or None,
                max_parallel=args.max_parallel or None, max_requeues=args.max_requeues)


def _describe_resources(r: dict) -> str:
    text = (f"{r['nodes']} node(s) x {r['tasks_per_node']} task(s), {r['gpus_per_node']} GPU(s) per node, "
            f"{r['timeout_min']} min")
    extras = [f"{k}={r[k]}" for k in ("partition", "cpus_per_task", "max_parallel") if r[k]]
    return ", ".join([text] + extras) + f", requeued up to {r['max_requeues']} time(s)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, opts = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="config .yaml to run, or output directory to read")
    parser.add_argument("--out", default="output/compare", help="folder for compare.{md,csv,png} and for the runs of configs")
    parser.add_argument("--num-gpus", type=int, default=2, help="processes per run of a config (CPU processes without CUDA)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each run of a config")
    parser.add_argument("--title", default="", help="title of the chart")
    parser.add_argument("--seeds", default="", metavar="K | S1,S2,...",
                        help="run every config with these SEEDs (K: seeds 1..K); the table gives "
                             "mean ± sd per variant, the CSV one row per run")
    parser.add_argument("--baseline", default="", metavar="LABEL",
                        help="with seeds: also report each variant's paired difference to LABEL")
    parser.add_argument("--launcher", choices=("local", "submitit"), default="local",
                        help="local: train_net.py processes here, one run after the other; submitit: "
                             "one job per run (and seed) on --cluster, all submitted at once (a SLURM job array)")
    cluster = parser.add_argument_group("submitit launcher")
    cluster.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                         help="slurm (sbatch), local (processes on this machine) or debug")
    cluster.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    cluster.add_argument("--nodes", type=int, default=1, help="nodes per job")
    cluster.add_argument("--tasks-per-node", type=int, default=0,
                         help="training processes per node; default: --gpus-per-node when GPUs are asked, "
                              "else --num-gpus")
    cluster.add_argument("--gpus-per-node", type=int, default=None,
                         help="GPUs asked per node; 0 for CPU partitions; default: --num-gpus on a partition "
                              "with GPU GRES (one task per GPU), else 0")
    cluster.add_argument("--timeout-min", type=int, default=0, help="job time limit; default --timeout")
    cluster.add_argument("--cpus-per-task", type=int, default=0, help="SLURM --cpus-per-task")
    cluster.add_argument("--max-parallel", type=int, default=0,
                         help="at most this many jobs of the array run at once (default: no cap)")
    cluster.add_argument("--max-requeues", type=int, default=3,
                         help="times a preempted or timed-out job is requeued to resume (submitit's max_num_timeout)")
    args = parser.parse_args(argv)
    try:
        for flag, value, minimum in (("--num-gpus", args.num_gpus, 1), ("--nodes", args.nodes, 1),
                                     ("--tasks-per-node", args.tasks_per_node, 0),
                                     ("--gpus-per-node", 0 if args.gpus_per_node is None else args.gpus_per_node, 0),
                                     ("--timeout-min", args.timeout_min, 0),
                                     ("--cpus-per-task", args.cpus_per_task, 0),
                                     ("--max-parallel", args.max_parallel, 0),
                                     ("--max-requeues", args.max_requeues, 0)):
            check_int(flag, value, minimum)
        seeds = parse_seeds(args.seeds)
        split_opts(opts)
        for _, path in [_parse_run(spec) for spec in args.runs]:
            if path.endswith(CONFIG_SUFFIXES):  # options a run cannot take, before any run
                train_command(path, args.out, opts + (["SEED", "1"] if seeds else []))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.launcher == "submitit" and args.cluster == "slurm" and not shutil.which("srun"):
        print("error: --cluster slurm needs SLURM (srun, sbatch) on this machine's PATH; they were not "
              "found (--cluster local runs the jobs as processes here)", file=sys.stderr)
        return 2
    specs = [_parse_run(s) for s in args.runs]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        print(f"error: run labels must be unique; got {labels} (name them LABEL=PATH)", file=sys.stderr)
        return 2
    for label, path in specs:
        if path.endswith(CONFIG_SUFFIXES) and not os.path.isfile(path):
            print(f"error: config file {path!r} (run {label!r}) does not exist", file=sys.stderr)
            return 2
    if args.baseline and args.baseline not in labels:
        print(f"error: --baseline = {args.baseline!r} is not allowed; it must be one of the run labels "
              f"{labels}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)

    if args.launcher == "submitit":
        try:
            resources = submitit_resources(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        launcher = SubmititLauncher(args.cluster, os.path.join(args.out, "submitit"), **resources)
        print(f"[compare] each job ({args.cluster}): {_describe_resources(resources)}", flush=True)
    else:
        launcher = LocalLauncher(args.num_gpus, args.timeout)
    tasks = []
    for label, path in specs:
        if path.endswith(CONFIG_SUFFIXES):
            runs_dir = os.path.join(args.out, "runs", label)
            tasks += ([(label, path, runs_dir, None)] if not seeds else
                      [(label, path, os.path.join(runs_dir, f"seed{s}"), s) for s in seeds])
    try:
        by_dir = {t[2]: r for t, r in zip(tasks, run_all(tasks, launcher, opts))}
    except SubmissionRefused as e:
        print(f"error: {args.cluster} refused the jobs: {e}", file=sys.stderr)
        return 2
    runs = []
    for label, path in specs:
        if not path.endswith(CONFIG_SUFFIXES):
            runs += read_dir(path, label)
        else:
            runs += [by_dir[t[2]] for t in tasks if t[0] == label]

    if any(r.seed is not None for r in runs):  # --seeds, or directories of seed<S> runs
        markdown = write_seed_tables(runs, args.out, args.baseline or None)
    else:
        markdown = write_tables(runs, args.out)
    plot(runs, os.path.join(args.out, "compare.png"), args.title)
    print(markdown)
    print(f"[compare] wrote {os.path.join(args.out, 'compare.md')}, compare.csv, compare.png")
    return 0 if all(r.status == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
