"""
tools/compare.py --launcher submitit --cluster slurm against a real SLURM scheduler (the
single-node cluster of tools/local_slurm.sh, which `bash tools/test.sh` starts when it
can; without one these tests skip): the job array gives the local launcher's table for the
same seeds, a re-run reuses finished runs and resubmits only the missing one, a refused
submission is one error line, cancelled and timed-out jobs become rows within bounded
time while the others finish, and a preempted job requeues and resumes to the final
metrics of an uninterrupted run.

Every run is a toy RetinaNet trained for 3 iterations in 2 gloo processes (one job of 2
tasks) and evaluated with a score threshold of 0, so its AP is a number (about 0.01-0.1),
not NaN: equal numbers mean equal trainings.
"""
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from scripts import REPO

pytestmark = pytest.mark.slurm

COMPARE = os.path.join(REPO, "tools", "compare.py")
TOY = os.path.join(REPO, "configs", "Toy", "retinanet_R18_FPN_bn_head.yaml")
TOY_SYNC = os.path.join(REPO, "configs", "Toy", "retinanet_R18_FPN_syncbn_head_naive.yaml")
TRAINING = ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
            "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
# the per-worker BN statistics are averaged over the workers before the final checkpoint
# (BN.EMA_ACROSS_WORKERS average, the default), so a run resumed from model_final.pth
# evaluates the model the uninterrupted run evaluated
SHORT = ["SOLVER.MAX_ITER", "3"] + TRAINING
VARIANTS = [f"a={TOY}", f"b={TOY_SYNC}"]

def _slurm(num_gpus=2, timeout_min=10):
    """compare.py's flags for jobs of ``num_gpus`` CPU tasks on the local cluster (no GRES)."""
    return ["--launcher", "submitit", "--cluster", "slurm", "--num-gpus", str(num_gpus), "--tasks-per-node",
            str(num_gpus), "--gpus-per-node", "0", "--timeout-min", str(timeout_min)]


METRIC_COLUMNS = ("bbox/AP", "segm/AP", "ema/bbox/AP", "ema/segm/AP", "status")


ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}  # torch's FutureWarnings are not compare.py's output


def _compare(args, timeout=900):
    """Runs tools/compare.py; (exit status, stdout, stderr). Fails the test if it outlives ``timeout``."""
    out = subprocess.run([sys.executable, COMPARE, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    return out.returncode, out.stdout, out.stderr


def _rows(out_dir):
    with open(os.path.join(out_dir, "compare.csv")) as f:
        return {(r["run"], r["seed"]): r for r in csv.DictReader(f)}


def _job(run_dir):
    with open(os.path.join(run_dir, "submitit_job.json")) as f:
        return json.load(f)


def _state(job_id):
    """SLURM's state of a job ("" once squeue no longer lists it)."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _squeue_count():
    return len(subprocess.run(["squeue", "-h", "--states=all", "-o", "%i"], capture_output=True, text=True,
                              check=True).stdout.split())


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    """The local launcher's comparison of a and b, seed 1 (the reference)."""
    out = str(tmp_path_factory.mktemp("local"))
    rc, stdout, stderr = _compare(["--num-gpus", "2", "--seeds", "1", "--baseline", "a", "--out", out,
                                   *VARIANTS, "--", *SHORT])
    assert rc == 0, stdout + stderr
    return out


def test_job_array_gives_the_local_launchers_table_and_reruns_only_what_is_missing(local_table, tmp_path):
    out = str(tmp_path / "slurm")
    args = [*_slurm(), "--max-parallel", "1", "--seeds", "1", "--baseline", "a", "--out", out, *VARIANTS, "--", *SHORT]
    rc, stdout, stderr = _compare(args)
    assert rc == 0, stdout + stderr
    jobs = {label: _job(os.path.join(out, "runs", label, "seed1")) for label in "ab"}
    array_id = jobs["a"]["job_id"].split("_")[0]
    assert sorted(job["job_id"] for job in jobs.values()) == [f"{array_id}_{i}" for i in range(2)], \
        f"the runs are one job array: {jobs}"
    for job in jobs.values():
        assert job["state"] == "COMPLETED" and os.path.isfile(job["stdout"]) and len(job["task_logs"]) == 2
    submission = glob.glob(os.path.join(out, "submitit", "*", "*_submission.sh"))[0]
    with open(submission) as f:
        script = f.read()
    assert "#SBATCH --array=0-1%1\n" in script and "#SBATCH --ntasks-per-node=2\n" in script
    assert "gpus-per-node" not in script and "gres" not in script

    # the same numbers as the local launcher: every metric of every run, and the table
    local, slurm = _rows(local_table), _rows(out)
    assert local.keys() == slurm.keys() and len(local) == 2
    for key in local:
        assert {c: local[key][c] for c in METRIC_COLUMNS} == {c: slurm[key][c] for c in METRIC_COLUMNS}, key
        assert slurm[key]["bbox/AP"] not in ("", "nan"), "an AP that is a number"
    with open(os.path.join(local_table, "compare.md")) as f, open(os.path.join(out, "compare.md")) as g:
        assert f.read() == g.read()

    # a re-run reuses the finished runs and submits only the one that is gone
    shutil.rmtree(os.path.join(out, "runs", "b", "seed1"))
    rc, stdout, stderr = _compare(args)
    assert rc == 0, stdout + stderr
    assert stdout.count("reusing the finished run") == 1 and stdout.count("[compare] submitted job") == 1
    resubmitted = _job(os.path.join(out, "runs", "b", "seed1"))
    assert resubmitted["state"] == "COMPLETED" and resubmitted["job_id"] != jobs["b"]["job_id"]
    rerun = _rows(out)
    assert {k: [r[c] for c in METRIC_COLUMNS] for k, r in rerun.items()} == \
        {k: [r[c] for c in METRIC_COLUMNS] for k, r in slurm.items()}


def test_a_refused_submission_is_one_error_line_and_submits_nothing(tmp_path):
    before = _squeue_count()
    for flags, quoted in ((["--gpus-per-node", "1"], "Invalid generic resource (gres) specification"),
                          (["--partition", "nope"], "sbatch: error: invalid partition specified: nope")):
        rc, stdout, stderr = _compare([*_slurm(), *flags, "--seeds", "2", "--out", str(tmp_path / "x"), *VARIANTS,
                                       "--", *SHORT], timeout=120)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and quoted in lines[0], stderr
        assert "Traceback" not in stderr + stdout
    assert _squeue_count() == before


def _variant(tmp_path, name, max_iter):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f'_BASE_: "{TOY}"\nSOLVER:\n  MAX_ITER: {max_iter}\n')
    return f"{name}={path}"


def test_cancelled_and_timed_out_jobs_become_rows_while_the_others_finish(tmp_path):
    """One-task jobs, two at a time on 2 CPUs, submitted by a compare.py that is then
    killed; the same command again waits for them. 'cancelled' is scancel-ed once it runs,
    'ok' finishes, 'timeout' trains past its time limit; compare.py ends soon after.
    (The jobs are submitted with a 5-minute limit: SLURM signals USR2 30 s before the limit,
    and up to 60 s earlier still, which leaves 'ok' 3.5 minutes to finish before it could be
    signalled — with three test suites sharing 2 cores it took 3 min 13 s. Once 'ok' is done,
    the test lowers the limit of 'timeout' to one minute, as a user may with scontrol, so
    SLURM ends it for its time limit without the test waiting out the five.)"""
    out = tmp_path / "cmp"
    args = [*_slurm(num_gpus=1, timeout_min=5), "--max-requeues", "0", "--seeds", "1", "--out", str(out),
            _variant(tmp_path, "cancelled", 100000), _variant(tmp_path, "timeout", 100000),
            _variant(tmp_path, "ok", 3), "--", *TRAINING]
    start = time.monotonic()
    first = subprocess.Popen([sys.executable, COMPARE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=ENV)
    record = out / "runs" / "cancelled" / "seed1" / "submitit_job.json"
    try:
        while not (out / "runs" / "ok" / "seed1" / "submitit_job.json").is_file():  # the last one recorded
            assert first.poll() is None and time.monotonic() - start < 120, "the jobs were not submitted"
            time.sleep(0.5)
    finally:
        first.kill()  # compare.py stopped while its jobs are queued or running
        first.wait()
    # the same command again waits for those jobs instead of submitting them again
    proc = subprocess.Popen([sys.executable, COMPARE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    try:
        attached = []  # its first lines: every job found still queued or running
        while sum("submitted by an earlier call" in line for line in attached) < 3:
            line = proc.stdout.readline()
            assert line and "[compare] running" not in line, "".join(attached + [line])
            attached.append(line)
        job_id = _job(record.parent)["job_id"]
        while _state(job_id) != "RUNNING":
            assert time.monotonic() - start < 240, "the job to cancel never ran"
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], check=True)
        ok_id = _job(out / "runs" / "ok" / "seed1")["job_id"]
        while _state(ok_id) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            assert time.monotonic() - start < 300, "'ok' never finished"
            time.sleep(0.5)
        timeout_id = _job(out / "runs" / "timeout" / "seed1")["job_id"]
        assert _state(timeout_id) == "RUNNING", "'timeout' is still training"
        subprocess.run(["scontrol", "update", f"JobId={timeout_id}", "TimeLimit=1"], check=True)
        stdout, _ = proc.communicate(timeout=420)  # bounded: the time limit plus polling
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(attached) + stdout
    assert "[compare] submitted job" not in stdout, stdout
    assert proc.returncode == 1, stdout
    rows = _rows(str(out))
    assert rows[("ok", "1")]["status"] == "ok", stdout
    cancelled, timeout = rows[("cancelled", "1")], rows[("timeout", "1")]
    assert cancelled["status"] == "failed" and f"job {job_id} CANCELLED" in cancelled["detail"]
    assert timeout["status"] == "failed" and ("timed-out" in timeout["detail"] or "TIMEOUT" in timeout["detail"])
    assert _job(record.parent)["state"] == "CANCELLED"
    with open(out / "compare.md") as f:
        table = f.read()
    assert "CANCELLED" in table and "seeds ok" in table


def test_preempted_job_requeues_and_resumes_to_the_same_final_metrics(local_table, tmp_path):
    """USR2 (SLURM's preemption signal) once the run has written its final checkpoint and is
    evaluating: submitit checkpoints, requeues; the job resumes with --resume from that
    checkpoint and ends with the uninterrupted run's metrics (seed 1 of the local table)."""
    out = tmp_path / "cmp"
    args = [*_slurm(), "--seeds", "1", "--out", str(out), VARIANTS[0], "--", *SHORT]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, COMPARE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    run_dir = out / "runs" / "a" / "seed1"
    try:
        last = run_dir / "last_checkpoint"  # written once model_final.pth is whole
        while not last.is_file() or last.read_text().strip() != "model_final.pth":
            assert proc.poll() is None and time.monotonic() - start < 300, "no final checkpoint"
            time.sleep(0.1)
        job_id = _job(run_dir)["job_id"]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        stdout, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    with open(_job(run_dir)["stdout"]) as f:
        assert f"Requeued job {job_id}" in f.read(), "the job was preempted and requeued"
    assert _job(run_dir)["state"] == "COMPLETED"
    with open(run_dir / "log.txt") as f:
        log = f.read()
    assert log.count("Starting training from iteration 0") == 1, "trained once"
    assert log.count("Starting training from iteration 3") == 1, "the requeued job resumed from model_final.pth"
    resumed, reference = _rows(str(out))[("a", "1")], _rows(local_table)[("a", "1")]
    assert {c: resumed[c] for c in METRIC_COLUMNS} == {c: reference[c] for c in METRIC_COLUMNS}
