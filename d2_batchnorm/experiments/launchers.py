"""
Launching the runs of a comparison: the training command of a config (yacs ``.yaml`` or
LazyConfig ``.py``), a local launcher (one run after the other, here) and a submitit
launcher (all runs as one SLURM job array, or jobs of submitit's local executor), and
:func:`run_all`, which reuses the finished runs of the same request and waits for the jobs an
earlier call left running.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from ..config_kinds import LazyConfig, YacsConfig, config_kind
from .runs import RunResult, read_run, status_text, training_progress

__all__ = ["CONFIG_SUFFIXES", "REQUEST_FILE", "split_opts", "train_command", "run_config", "LocalLauncher",
           "SubmititLauncher", "reusable_run", "run_all"]

_CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli")
#: the script that trains each kind of config (``ConfigKind.kind``)
TRAIN_SCRIPTS = {"train": os.path.join(_CLI, "train_net.py"), "lazy-train": os.path.join(_CLI, "lazyconfig_train_net.py")}
#: the config files a comparison trains (the others are finished runs to read)
CONFIG_SUFFIXES = YacsConfig.suffixes + LazyConfig.suffixes


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
    with ``d2bn train`` and the yacs pairs of ``opts``; a LazyConfig ``.py`` with
    ``d2bn lazy-train``, the overrides of ``opts`` and its yacs pairs under their LazyConfig
    names (``SEED`` is ``train.seed``: :data:`d2_batchnorm.config.SETTINGS`).
    ``ValueError`` for a yacs key a LazyConfig does not have.
    """
    kind = config_kind(config)
    pairs, overrides = split_opts(opts)
    try:
        args = kind.command_opts(pairs, overrides) + kind.opts("OUTPUT_DIR", output_dir)
    except ValueError as e:
        raise ValueError(f"{config}: {e}") from None
    return TRAIN_SCRIPTS[kind.kind], ["--config-file", config, *args]


#: seconds between two progress lines of a run that trains here
PROGRESS_SECONDS = 30.0


def run_config(config: str, output_dir: str, num_gpus: int, opts: List[str], timeout: float,
               progress: str = "") -> int:
    """
    Trains and evaluates ``config`` (:func:`train_command`); returns its exit status. With
    ``progress`` (e.g. "run 2 of 6, shuffle seed 1"), prints the run's iteration and ETA
    every :data:`PROGRESS_SECONDS` while it trains (:func:`~.runs.training_progress`).
    """
    os.makedirs(output_dir, exist_ok=True)
    script, args = train_command(config, output_dir, opts)
    cmd = [sys.executable, script, "--num-gpus", str(num_gpus), "--dist-url", "auto", *args]
    deadline, shown = time.monotonic() + timeout, None
    with open(os.path.join(output_dir, "train_net.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                return proc.wait(timeout=min(PROGRESS_SECONDS, max(deadline - time.monotonic(), 0.0)))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    proc.kill()
                    proc.wait()
                    log.write(f"\ncompare.py: killed after the --timeout of {timeout:.0f} s\n")
                    return 124
            now = training_progress(output_dir)
            if progress and now is not None and now != shown:
                shown = now
                print(f"[compare] {progress}: iteration {now[0]}, ETA {now[1]}", flush=True)


REQUEST_FILE = "compare_request.json"


class LocalLauncher:
    """Runs each config now, one after the other, with tools/train_net.py --num-gpus N."""

    #: ``start`` returns once the run has ended (its seconds are its own)
    runs_in_start = True

    def __init__(self, num_gpus: int, timeout: float):
        self.num_gpus, self.timeout = num_gpus, timeout
        self.workers = num_gpus

    def start(self, config: str, output_dir: str, opts: List[str], name: str = ""):
        return run_config(config, output_dir, self.num_gpus, opts, self.timeout, progress=name)

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

    #: ``start`` queues a job: a run's seconds go from its submission until it is seen ended
    runs_in_start = False

    def __init__(self, cluster: str, folder: str, **resources):
        self.cluster, self.folder, self.resources = cluster, folder, resources
        self.workers = resources["nodes"] * resources["tasks_per_node"]
        self._pending: List[Tuple[str, object]] = []  # (run folder, TrainNetJob) to submit
        self._jobs: Dict[str, object] = {}  # run folder -> submitit job

    def start(self, config: str, output_dir: str, opts: List[str], name: str = "") -> str:
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
    found = status_text(run) if done.get("request") == request else "made by another request"
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
    for k, (label, config, output_dir, seed) in enumerate(tasks, 1):
        name = label if seed is None else f"{label} seed {seed}"
        run_opts = list(opts) + ([] if seed is None else ["SEED", str(seed)])
        request = {"config": os.path.abspath(config), "opts": run_opts, "workers": launcher.workers}
        run, handle, start, ran_for = None, launcher.attach(output_dir, request, name), time.perf_counter(), None
        if handle is None:
            run = reusable_run(label, output_dir, request, name)
        if run is None and handle is None:
            print(f"[compare] running {name}: {config} -> {output_dir}", flush=True)
            # the local launcher runs it now, printing its progress
            handle = launcher.start(config, output_dir, run_opts, name=f"run {k} of {len(tasks)}, {name}")
            if launcher.runs_in_start:  # its own duration, not the wait for the runs after it
                ran_for = time.perf_counter() - start
            with open(os.path.join(output_dir, REQUEST_FILE), "w") as f:  # what attach() compares
                json.dump({"request": request}, f)
        started.append((label, output_dir, seed, name, request, run, handle, start, ran_for))
    launcher.submit()  # a cluster's jobs all at once (one array); nothing for the local launcher
    runs = []
    for label, output_dir, seed, name, request, run, handle, start, ran_for in started:
        if run is None:
            rc, detail = launcher.finish(handle)
            run = read_run(output_dir, label, rc)
            if detail:  # the launcher's reason replaces read_run's bare exit status
                generic = run.detail == f"train_net exited with {rc}"
                run.detail = detail if generic else f"{detail}; {run.detail}".rstrip("; ")
            run.seconds = ran_for if ran_for is not None else time.perf_counter() - start
            with open(os.path.join(output_dir, REQUEST_FILE), "w") as f:
                json.dump({"request": request, "seconds": run.seconds, "returncode": rc}, f)
            print(f"[compare] {name}: {status_text(run)} ({run.seconds:.0f} s)", flush=True)
        run.seed = seed
        runs.append(run)
    return runs
