import atexit
import os
import shutil
import tempfile
import warnings

import pytest

# Toy datasets are generated once per test session into a temporary folder (or into
# $D2BN_TEST_DATASETS), set before any test module imports d2_batchnorm: the datasets are
# registered with their folder at import time.
if "D2BN_TEST_DATASETS" in os.environ:
    os.environ["DETECTRON2_DATASETS"] = os.environ["D2BN_TEST_DATASETS"]
else:
    _datasets = tempfile.mkdtemp(prefix="d2bn-test-datasets-")
    atexit.register(shutil.rmtree, _datasets, ignore_errors=True)
    os.environ["DETECTRON2_DATASETS"] = _datasets

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


SLURM_HOW_TO = ("tests marked slurm need a SLURM cluster: run `bash tools/test.sh` as root or with SLURM "
                "installed (it starts tools/local_slurm.sh), or `eval $(bash tools/local_slurm.sh start)` first")


def _slurm_cluster_answers() -> bool:
    """Whether sbatch/squeue reach a cluster: SLURM's client on the PATH and its controller up."""
    import subprocess

    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slurm`` skip, with one line saying how to enable them, without a cluster."""
    marked = [item for item in items if "slurm" in item.keywords]
    if marked and not _slurm_cluster_answers():
        skip = pytest.mark.skip(reason=SLURM_HOW_TO)
        for item in marked:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if any(SLURM_HOW_TO in str(getattr(r, "longrepr", "")) for r in skipped):
        terminalreporter.write_line(f"skipped: {SLURM_HOW_TO}")


@pytest.fixture
def run_workers():
    """
    ``run_workers(fn, *args, world_size=2)`` runs ``fn(*args)`` in ``world_size`` real
    gloo processes and returns ``[result of rank 0, result of rank 1, ...]``. ``fn`` must
    be a module-level function of the test module (tests/workers.py).
    """
    from workers import run_workers

    return run_workers
