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


@pytest.fixture
def run_workers():
    """
    ``run_workers(fn, *args, world_size=2)`` runs ``fn(*args)`` in ``world_size`` real
    gloo processes and returns ``[result of rank 0, result of rank 1, ...]``. ``fn`` must
    be a module-level function of the test module.
    """
    from d2_batchnorm.engine import run_on_local_workers

    def run(fn, *args, world_size=2):
        return run_on_local_workers(fn, world_size, args)

    return run
