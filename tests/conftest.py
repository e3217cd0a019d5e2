import os
import warnings

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session", autouse=True)
def _toy_datasets_root(tmp_path_factory):
    """Toy datasets are generated once per session into a temporary folder."""
    if "D2BN_TEST_DATASETS" in os.environ:
        os.environ["DETECTRON2_DATASETS"] = os.environ["D2BN_TEST_DATASETS"]
    else:
        os.environ["DETECTRON2_DATASETS"] = str(tmp_path_factory.mktemp("datasets"))
    yield


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
