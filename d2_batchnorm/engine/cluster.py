"""
Training on a cluster through submitit: one job runs ``tools/train_net.py`` unchanged in
every task (one task per GPU, on every node), initialised from the job's environment.

In each task, :class:`TrainNetJob` exports torch.distributed's env:// variables from the
job (``submitit.helpers.TorchDistributedEnvironment``: MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, read from SLURM's variables or from submitit's
local executor) and runs the script with ``--resume``; the script then initialises its
process group exactly as under ``torchrun`` (:func:`d2_batchnorm.engine.launch`). A job
that SLURM preempts or times out is requeued through submitit's ``checkpoint`` protocol
(:meth:`TrainNetJob.checkpoint`) and resumes from the run's last checkpoint.

:func:`make_executor` builds the executor for ``cluster`` "slurm" (sbatch), "local" (real
processes on this machine: what the tests run) or "debug" (in this process).
"""
import os
import subprocess
import sys
from typing import List, Optional

__all__ = ["TrainNetJob", "make_executor", "CLUSTERS"]

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
    """
    env = _submitit().helpers.TorchDistributedEnvironment().export(
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
    """

    def __init__(self, script: str, args: List[str]):
        self.script = os.path.abspath(script)
        self.args = list(args)

    def __call__(self) -> int:
        env = export_distributed_env()
        cmd = [sys.executable, self.script, "--resume", *self.args]
        print(f"[TrainNetJob] rank {env['RANK']} of {env['WORLD_SIZE']}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            raise RuntimeError(f"{self.script} exited with {rc} on rank {env['RANK']}")
        return rc

    def checkpoint(self):
        """On preemption or timeout: requeue the same command (it resumes)."""
        return _submitit().helpers.DelayedSubmission(TrainNetJob(self.script, self.args))


def make_executor(folder: str, cluster: str, *, nodes: int = 1, gpus_per_node: int = 1,
                  timeout_min: int = 60, partition: Optional[str] = None,
                  cpus_per_task: Optional[int] = None, gpus: Optional[bool] = None):
    """
    A submitit executor writing its logs under ``folder``, for jobs of ``nodes`` nodes ×
    ``gpus_per_node`` tasks (one process per GPU; CPU processes where there is no GPU).

    Args:
        cluster: one of :data:`CLUSTERS`.
        partition: SLURM partition (``--partition``).
        cpus_per_task: SLURM ``--cpus-per-task`` (default: submitit's).
        gpus: request ``gpus_per_node`` GPUs (default: for "slurm", or where CUDA is present).
    """
    from ..checks import check_choice, check_int

    check_choice("cluster", cluster, CLUSTERS)
    check_int("nodes", nodes, 1)
    check_int("gpus_per_node", gpus_per_node, 1)
    check_int("timeout_min", timeout_min, 1)
    if gpus is None:
        import torch

        gpus = cluster == "slurm" or torch.cuda.is_available()
    executor = _submitit().AutoExecutor(folder=folder, cluster=cluster)
    params = dict(nodes=nodes, tasks_per_node=gpus_per_node, timeout_min=timeout_min,
                  gpus_per_node=gpus_per_node if gpus else 0, name="d2bn")
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor
