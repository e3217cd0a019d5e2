"""
Training on a cluster through submitit: one job runs ``tools/train_net.py`` unchanged in
every task (on every node), with torch.distributed's env:// variables exported from the
job (``submitit.helpers.TorchDistributedEnvironment``: from SLURM's variables or from
submitit's local executor), so the script initialises its process group exactly as under
``torchrun`` (:func:`d2_batchnorm.engine.launch`). A preempted or timed-out job is requeued
and resumes from the run's last checkpoint (:class:`TrainNetJob`).

:func:`make_executor` builds the executor for ``cluster`` "slurm" (sbatch), "local" (real
processes on this machine) or "debug" (in this process); :func:`submit_jobs` submits many
runs as one SLURM job array; :func:`wait_job` waits for a job within bounded time of its
end, also without SLURM accounting, where submitit (which asks ``sacct`` alone) waits
forever for a job killed before it wrote its result.
"""
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "TrainNetJob", "make_executor", "CLUSTERS", "SubmissionRefused", "submit_jobs", "wait_job",
    "slurm_job_states", "slurm_job", "describe_job_error", "partition_gpus", "FINAL_STATES",
]

#: submitit executors a comparison can use
CLUSTERS = ("slurm", "local", "debug")


def _submitit():
    try:
        import submitit
    except ImportError:  # pragma: no cover - bootstrap installs it
        raise ImportError("the submitit launcher needs submitit: pip install submitit") from None
    return submitit


def export_distributed_env() -> dict:
    """
    Exports torch.distributed's env:// variables of this task (overwriting those of an
    outer job) and returns them. CUDA_VISIBLE_DEVICES is left as the job set it: the
    training selects the GPU ``LOCAL_RANK`` itself.

    MASTER_PORT is drawn from the job's id, as submitit does, but in [20000, 32767]: below
    Linux's ephemeral ports (32768-60999), which the client sockets of other jobs on the
    same node take at random (submitit's 20000-60000 met one: EADDRINUSE).
    """
    submitit = _submitit()
    job_id = submitit.JobEnvironment().job_id
    os.environ["MASTER_PORT"] = str(20000 + zlib.crc32(job_id.encode()) % 12768)
    env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    return {"MASTER_ADDR": env.master_addr, "MASTER_PORT": env.master_port, "RANK": env.rank,
            "WORLD_SIZE": env.world_size, "LOCAL_RANK": env.local_rank,
            "LOCAL_WORLD_SIZE": env.local_world_size}


class TrainNetJob:
    """
    The callable submitted per run: ``python <script> --resume <args>`` in every task of
    the job, with the task's env:// variables. Raises ``RuntimeError`` naming the rank and
    the exit status when the script fails (the job's state is then FAILED and its log
    holds the script's output). Picklable; requeued as is when preempted.

    The script ignores the preemption signal (USR2): submitit's handler in this process
    checkpoints and requeues the job, and SLURM then ends the script; the training
    resumes from its last checkpoint (``--resume``) when the job runs again.
    """

    def __init__(self, script: str, args: List[str]):
        self.script = os.path.abspath(script)
        self.args = list(args)

    def __call__(self) -> int:
        env = export_distributed_env()
        cmd = [sys.executable, self.script, "--resume", *self.args]
        print(f"[TrainNetJob] rank {env['RANK']} of {env['WORLD_SIZE']}: {' '.join(cmd)}", flush=True)
        preempt_signal = _submitit().JobEnvironment._usr_sig()
        rc = subprocess.run(cmd, preexec_fn=lambda: signal.signal(preempt_signal, signal.SIG_IGN)).returncode
        if rc != 0:
            raise RuntimeError(f"{self.script} exited with {rc} on rank {env['RANK']}")
        return rc

    def checkpoint(self):
        """On preemption or timeout: requeue the same command (it resumes)."""
        return _submitit().helpers.DelayedSubmission(TrainNetJob(self.script, self.args))


def make_executor(folder: str, cluster: str, *, nodes: int = 1, tasks_per_node: int = 1,
                  gpus_per_node: int = 0, timeout_min: int = 60, partition: Optional[str] = None,
                  cpus_per_task: Optional[int] = None, max_parallel: Optional[int] = None,
                  max_requeues: int = 3):
    """
    A submitit executor writing its logs under ``folder``, for jobs of ``nodes`` nodes ×
    ``tasks_per_node`` tasks (one training process each) with ``gpus_per_node`` GPUs per
    node (0: none asked, for CPU partitions and clusters without GRES).

    Args:
        cluster: one of :data:`CLUSTERS`.
        partition: SLURM partition (``--partition``).
        cpus_per_task: SLURM ``--cpus-per-task`` (default: submitit's).
        max_parallel: at most this many jobs of one array run at once (``--array=...%N``).
        max_requeues: a job preempted or timed out more often than this is not requeued
            again (submitit's ``max_num_timeout``).
    """
    from ..checks import check_choice, check_int

    check_choice("cluster", cluster, CLUSTERS)
    check_int("nodes", nodes, 1)
    check_int("tasks_per_node", tasks_per_node, 1)
    check_int("gpus_per_node", gpus_per_node, 0)
    check_int("timeout_min", timeout_min, 1)
    check_int("max_requeues", max_requeues, 0)
    if max_parallel is not None:
        check_int("max_parallel", max_parallel, 1)
    executor = _submitit().AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeues)
    # USR2 comes this long before the time limit (submitit's 90 s; 6 s per minute of a
    # shorter job), and SLURM may send it up to a minute earlier still
    params = dict(nodes=nodes, tasks_per_node=tasks_per_node, timeout_min=timeout_min, name="d2bn",
                  slurm_signal_delay_s=min(90, timeout_min * 6))
    optional = dict(gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, slurm_partition=partition,
                    slurm_array_parallelism=max_parallel)  # asked for only when given (non-zero)
    executor.update_parameters(**params, **{k: v for k, v in optional.items() if v})
    return executor


class SubmissionRefused(RuntimeError):
    """A submission the scheduler refused; the text is its own message (sbatch's error lines)."""


def submit_jobs(executor, fns: Sequence) -> list:
    """
    Submits the callables ``fns`` (e.g. :class:`TrainNetJob`) with ``executor``'s resources:
    on SLURM as one job array (ids ``<array>_<index>``, in the order of ``fns``), elsewhere
    one job each. Returns the submitit jobs. Raises :class:`SubmissionRefused` quoting
    sbatch's error when SLURM refuses the array (bad partition, GRES, time limit, ...):
    then no job of it was submitted.
    """
    submitit = _submitit()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error too
            return executor.submit_array(list(fns))
    except submitit.core.utils.FailedJobError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("sbatch: error:")] or lines[-1:]
        raise SubmissionRefused(" / ".join(errors) or "the submission failed") from None


#: SLURM job states after which a job runs no more (a requeued job is PENDING again)
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})


def _command_lines(cmd: List[str], timeout: float = 60.0) -> List[str]:
    """stdout lines of ``cmd``; [] when it fails, times out or is not installed."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.splitlines() if out.returncode == 0 else []


def slurm_job_states(job_ids: Sequence[str]) -> Dict[str, str]:
    """
    SLURM's state of each job id (``"123"`` or an array element ``"123_4"``), e.g.
    ``{"123_4": "RUNNING"}``: from ``squeue --states=all`` (finished jobs stay there for
    ``MinJobAge``), then ``sacct`` for the ones squeue no longer knows (clusters with
    accounting); an id neither knows is left out.
    """
    wanted = {str(j) for j in job_ids}
    bases = sorted({j.split("_")[0] for j in wanted})
    states: Dict[str, str] = {}
    if not bases:
        return states
    for line in _command_lines(["squeue", "-h", "--states=all", "-r", "-o", "%i|%T", "-j", ",".join(bases)]):
        job_id, _, state = line.strip().partition("|")
        states[job_id] = state.strip()
    missing = sorted({j.split("_")[0] for j in wanted - states.keys()})
    if missing:
        for line in _command_lines(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)]):
            job_id, _, state = line.strip().partition("|")
            states.setdefault(job_id, state.split(" ")[0])  # "CANCELLED by 0" -> CANCELLED
    return {j: states[j] for j in wanted if j in states}


def slurm_job(folder: str, job_id: str, tasks: int):
    """submitit's handle of an existing SLURM job ``job_id`` of ``tasks`` tasks, files under ``folder``."""
    return _submitit().SlurmJob(folder=folder, job_id=job_id, tasks=range(tasks))


def _result_files(job) -> List:
    return [job.task(k).paths.result_pickle for k in range(job.num_tasks)]


def wait_job(job, cluster: str, poll_s: float = 5.0, result_grace_s: float = 20.0,
             lost_after_s: float = 600.0) -> Tuple[str, Optional[BaseException]]:
    """
    Waits for ``job`` (a submitit job) to end; returns (its state, the error of its first
    failed task or None). On SLURM the state is polled every ``poll_s`` seconds
    (:func:`slurm_job_states`), so a job cancelled, timed out or killed before its tasks
    wrote their results ends the wait too: its error then says it ended in that state
    without a result. A job the scheduler no longer knows for ``lost_after_s`` seconds (no
    accounting, older than MinJobAge) ends it as state ``UNKNOWN``. Never waits longer than
    the job runs plus these bounds.
    """
    submitit = _submitit()
    if cluster != "slurm":  # submitit watches its own processes: the wait ends with them
        try:
            error = job.exception()
        except Exception as e:  # pragma: no cover - killed without a result
            error = e
        return job.state, error
    lost_since = None
    while True:
        state = slurm_job_states([job.job_id]).get(job.job_id)
        if state in FINAL_STATES:
            break
        if state is None:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > lost_after_s:
                state = "UNKNOWN"
                break
        else:
            lost_since = None
        time.sleep(poll_s)
    deadline = time.monotonic() + result_grace_s  # results are written just before the end
    while not all(p.exists() for p in _result_files(job)) and time.monotonic() < deadline:
        time.sleep(min(poll_s, 1.0))
    if not all(p.exists() for p in _result_files(job)):
        return state, submitit.core.utils.UncompletedJobError(
            f"job {job.job_id} ended {state} before its tasks wrote their results")
    error = job.exception()  # reads the results: does not wait
    if error is None and state != "COMPLETED":
        error = submitit.core.utils.UncompletedJobError(f"job {job.job_id} ended {state}")
    return state, error


def describe_job_error(error: BaseException) -> str:
    """
    One line saying why a job failed: for submitit's ``FailedJobError`` the exception line
    closing the task's traceback (``RuntimeError: ... exited with 1 on rank 0``), else the
    error's type and first line.
    """
    lines = [line.strip() for line in str(error).strip().splitlines()]
    ruler = "----------------------"
    if type(error).__name__ == "FailedJobError" and ruler in lines:  # the trace between two rulers
        start = lines.index(ruler) + 1
        end = lines.index(ruler, start) if ruler in lines[start:] else len(lines)
        trace = [line for line in lines[start:end] if line]
        if trace:
            return trace[-1]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def partition_gpus(partition: Optional[str] = None) -> int:
    """
    GPUs per node that SLURM's ``partition`` (default: the default partition) offers as
    GRES, from ``sinfo``: 0 for a CPU partition or a cluster without GRES. ``ValueError``
    naming the partition when sinfo does not know it.
    """
    lines = _command_lines(["sinfo", "-h", "-o", "%P|%G"])
    if not lines:
        raise ValueError("sinfo lists no partition: SLURM's controller does not answer here")
    for line in lines:
        name, _, gres = line.partition("|")
        if (partition is None and name.endswith("*")) or name.rstrip("*") == partition:
            counts = [int(n) for n in re.findall(r"gpu(?::[\w.-]+)?:(\d+)", gres)]
            return max(counts, default=0)
    known = [line.partition("|")[0].rstrip("*") for line in lines]
    raise ValueError(f"partition = {partition!r} is not allowed; SLURM's partitions (sinfo): {known}"
                     if partition else "SLURM has no default partition (sinfo); give --partition")
