"""
The package as a user installs it: the wheel is built, installed into a fresh folder (no
editable link to this checkout) and run from outside the checkout, reusing this
environment's torch and detectron2.
"""
import glob
import os
import subprocess
import sys

import pytest

from scripts import REPO

pytestmark = pytest.mark.wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(folder the wheel was installed into, environment that imports it from there)."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", REPO, "-w", str(root / "dist")],
                   check=True, cwd=root)
    wheel, = glob.glob(str(root / "dist" / "d2_batchnorm-*.whl"))
    target = root / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), wheel], check=True, cwd=root)
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONWARNINGS="ignore")
    return target, env


def test_the_d2bn_entry_point_runs_from_outside_the_checkout(installed, tmp_path):
    target, env = installed
    out = subprocess.run([str(target / "bin" / "d2bn"), "compare", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--seeds" in out.stdout and "--launcher" in out.stdout


def test_shipped_configs_and_registered_heads_come_from_the_installed_package(installed, tmp_path):
    target, env = installed
    code = (
        "import d2_batchnorm, d2_batchnorm.model_zoo as zoo\n"
        "from detectron2.modeling import META_ARCH_REGISTRY\n"
        "print(d2_batchnorm.__file__)\n"
        "cfg = zoo.get_config('Toy/retinanet_R18_FPN_bn_head.yaml')\n"
        "lazy = zoo.get_config('Toy/retinanet_R18_FPN_bn_head.py')\n"
        "print(cfg.MODEL.META_ARCHITECTURE, lazy.model.head._target_.__name__, 'BNRetinaNet' in META_ARCH_REGISTRY)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    where, found = out.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(target))
    assert found == "BNRetinaNet BNRetinaNetHead True"
