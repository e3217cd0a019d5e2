"""d2_batchnorm.engine.launch: CPU workers get their share of the host's cores, and end with their launcher."""
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import sys

    import torch
    from detectron2.utils import comm

    from d2_batchnorm.engine import launch


    def report(out):
        with open(f"{out}.rank{comm.get_rank()}", "w") as f:
            f.write(str(torch.get_num_threads()))


    if __name__ == "__main__":
        machine_rank, url, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        launch(report, 1, num_machines=2, machine_rank=machine_rank, dist_url=url, args=(out,))
    """
)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: every share is one thread")
def test_machines_simulated_on_one_host_share_its_cores(tmp_path):
    """Two launchers (--num-gpus 1 --num-machines 2) on one host: each worker gets half."""
    from detectron2.engine.launch import _find_free_port

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    url = f"tcp://127.0.0.1:{_find_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONWARNINGS"] = "ignore"
    out = str(tmp_path / "threads")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), url, out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    threads = [int(open(f"{out}.rank{r}").read()) for r in range(2)]
    assert threads == [os.cpu_count() // 2] * 2


SLEEPER = textwrap.dedent(
    """
    import os
    import signal
    import sys
    import time

    from detectron2.utils import comm

    from d2_batchnorm.engine import launch


    def work(folder):
        # torch's spawn already asks for SIGINT when the launcher dies, but Python turns that
        # into a KeyboardInterrupt, which a worker may catch or, here, ignore
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with open(os.path.join(folder, f"worker{comm.get_rank()}.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)


    if __name__ == "__main__":
        launch(work, 2, args=(sys.argv[1],))
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_when_their_launcher_is_killed(tmp_path):
    """A launcher killed from outside (a timeout, kill -9) must not leave its workers running."""
    import signal
    import time

    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                                env={**os.environ, "PYTHONWARNINGS": "ignore"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_files = [tmp_path / f"worker{r}.pid" for r in range(2)]
    deadline = time.time() + 120
    while not all(p.exists() and p.read_text() for p in pid_files) and time.time() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in pid_files]
    assert all(_alive(pid) for pid in pids)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "workers outlived their launcher"


def _rank_1_dies():
    from d2_batchnorm import distributed as d

    if d.group_rank() == 1:
        os._exit(3)  # killed, as by the OOM killer: no traceback, nothing reported
    return "rank 0 done"


def test_local_workers_report_a_worker_that_died_instead_of_waiting_forever():
    from d2_batchnorm.engine import run_on_local_workers

    with pytest.raises(RuntimeError, match="rank 1 of 2 failed:\n.*exited with code 3"):
        run_on_local_workers(_rank_1_dies, 2, timeout=30)
