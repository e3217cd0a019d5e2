"""
The submitit launcher (d2_batchnorm.engine.cluster, tools/compare.py --launcher submitit):
what is submitted to SLURM and what each task sees (without a cluster: tests/experiments/test_slurm.py
runs against a real one), and a toy comparison end to end through submitit's local
executor (real processes, gloo).
"""
import csv
import json
import os
import subprocess
import sys

import pytest

from d2_batchnorm import experiments
from d2_batchnorm.cli.compare import main as compare_main
from d2_batchnorm.cli.compare import submitit_resources

from scripts import REPO


TOY_RETINANET = os.path.join(REPO, "configs", "Toy", "retinanet_R18_FPN_bn_head.yaml")


def test_slurm_job_asks_for_nodes_times_gpus_tasks(tmp_path, monkeypatch):
    from d2_batchnorm.engine.cluster import make_executor

    fake_bin = tmp_path / "bin"  # submitit's SLURM executor looks for srun on the PATH
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    executor = make_executor(str(tmp_path / "logs"), "slurm", nodes=2, tasks_per_node=8, gpus_per_node=8,
                             timeout_min=120, partition="learnfair", cpus_per_task=10)
    sbatch = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=learnfair",
                 "--time=120", "--cpus-per-task=10"):
        assert f"#SBATCH {line}\n" in sbatch
    assert "srun --unbuffered" in sbatch


def test_cpu_jobs_ask_for_tasks_and_no_gpus_and_go_as_one_capped_array(tmp_path, monkeypatch):
    """--gpus-per-node 0 (a CPU partition, a cluster without GRES): tasks, no GPU request."""
    from d2_batchnorm.engine.cluster import make_executor

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    executor = make_executor(str(tmp_path / "logs"), "slurm", tasks_per_node=2, gpus_per_node=0, timeout_min=30,
                             max_parallel=2)
    executor._executor.parameters["map_count"] = 6  # what submit_array sets for an array of 6
    sbatch = executor._executor._make_submission_file_text("python -m job", "uid")
    assert "#SBATCH --ntasks-per-node=2\n" in sbatch and "gpu" not in sbatch and "gres" not in sbatch
    assert "#SBATCH --array=0-5%2\n" in sbatch and "#SBATCH --signal=USR2@90\n" in sbatch


def test_tasks_and_gpus_per_node_are_separate_choices():
    args = dict(cluster="local", num_gpus=2, nodes=1, tasks_per_node=0, gpus_per_node=None, timeout_min=0,
                timeout=3600.0, partition="", cpus_per_task=0, max_parallel=0, max_requeues=3)

    def resources(**changes):
        import argparse

        r = submitit_resources(argparse.Namespace(**{**args, **changes}))
        return r["nodes"], r["tasks_per_node"], r["gpus_per_node"]

    import torch

    gpus = 2 if torch.cuda.is_available() else 0
    assert resources() == (1, 2, gpus)  # --num-gpus processes, a GPU each where CUDA is
    assert resources(gpus_per_node=0) == (1, 2, 0)
    assert resources(gpus_per_node=4) == (1, 4, 4)  # one task per GPU
    assert resources(gpus_per_node=4, tasks_per_node=1) == (1, 1, 4)
    with pytest.raises(ValueError, match="--nodes = 2 is not allowed with --cluster local"):
        resources(nodes=2)


def test_a_failed_jobs_row_names_the_exception_that_ended_it():
    from d2_batchnorm.engine.cluster import describe_job_error

    from submitit.core.utils import FailedJobError, UncompletedJobError

    trace = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent "
             "call last):\n  File \"x.py\", line 1\n    f()\nRuntimeError: train_net.py exited with 1 on rank 0\n\n"
             "----------------------\nYou can check full logs with 'job.stderr(0)'")
    assert describe_job_error(FailedJobError(trace)) == "RuntimeError: train_net.py exited with 1 on rank 0"
    assert describe_job_error(UncompletedJobError("job 7_1 ended CANCELLED before ...\nmore")) == \
        "UncompletedJobError: job 7_1 ended CANCELLED before ..."


def test_each_slurm_task_gets_torch_distributed_env_variables():
    """Task 9 of a 2-node x 8-task job, as SLURM's variables describe it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="16",
               SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="node[007-008]",
               SLURM_PROCID="9", SLURM_LOCALID="1", PYTHONWARNINGS="ignore")
    code = ("import json, os; from d2_batchnorm.engine.cluster import export_distributed_env; "
            "export_distributed_env(); print(json.dumps({k: os.environ[k] for k in "
            "('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    exported = json.loads(out.stdout.strip().splitlines()[-1])
    assert exported["MASTER_ADDR"] == "node007" and 20000 <= int(exported["MASTER_PORT"]) <= 60000
    assert (exported["RANK"], exported["WORLD_SIZE"], exported["LOCAL_RANK"], exported["LOCAL_WORLD_SIZE"]) \
        == ("9", "16", "1", "8")


def test_compare_through_submitit_local_executor(tmp_path, capsys):
    """Two 2-task jobs: a toy RetinaNet that trains, evaluates and is read back, and a
    config train_net refuses, which becomes a failed row naming its job and log."""
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "%s"\nMODEL:\n  RETINANET:\n    NORM_STATS: "joint"\n' % TOY_RETINANET)
    out = tmp_path / "cmp"
    argv = ["--launcher", "submitit", "--cluster", "local", "--tasks-per-node", "2", "--timeout-min", "20",
            "--seeds", "1", "--out", str(out), f"toy={TOY_RETINANET}", f"bad={bad}", "--",
            "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.STEPS", "()", "TEST.DETECTIONS_PER_IMAGE", "10"]
    assert compare_main(argv) == 1  # the bad config's row
    printed = capsys.readouterr().out
    assert printed.count("[compare] submitted job") == 2
    with open(out / "compare.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    toy, failed = rows["toy"], rows["bad"]
    assert toy["status"] == "ok" and toy["seed"] == "1" and toy["bbox/AP"] != ""  # NaN: no detection yet
    run_dir = out / "runs" / "toy" / "seed1"
    job = json.loads((run_dir / "submitit_job.json").read_text())
    assert job["state"] == "FINISHED" and job["cluster"] == "local"
    assert (run_dir / "log.txt.rank1").is_file(), "the second task trained too"
    assert json.loads((run_dir / experiments.REQUEST_FILE).read_text())["request"]["opts"][-2:] == ["SEED", "1"]
    assert failed["status"] == "failed" and "job " in failed["detail"] and "_log.err" in failed["detail"]
    # a re-run reuses the finished job's run and submits the failed one again
    assert compare_main(argv) == 1
    printed = capsys.readouterr().out
    assert "toy seed 1: reusing the finished run" in printed and printed.count("[compare] submitted job") == 1
