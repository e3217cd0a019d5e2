"""d2_batchnorm.engine.launch: CPU workers get their share of the host's cores."""
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
