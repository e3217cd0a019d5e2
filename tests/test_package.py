"""Package-level promises: the import-time message without detectron2, config keys."""
import subprocess
import sys

import pytest

from d2_batchnorm import add_batchnorm_config, validate_batchnorm_config
from d2_batchnorm.engine import get_bn_cfg


def test_import_without_detectron2_names_the_ways_to_install_it():
    code = "import sys; sys.modules['detectron2'] = None; import d2_batchnorm"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "d2_batchnorm needs detectron2" in proc.stderr
    assert "sal-detectron2" in proc.stderr and "facebookresearch/detectron2" in proc.stderr


def test_add_batchnorm_config_is_idempotent_and_keeps_detectron2_keys():
    cfg = get_bn_cfg()
    before = cfg.dump()
    add_batchnorm_config(cfg)
    assert cfg.dump() == before
    assert cfg.TEST.PRECISE_BN.ENABLED is False and cfg.TEST.PRECISE_BN.NUM_ITER == 200
    validate_batchnorm_config(cfg)


def test_validation_requires_our_keys():
    from detectron2.config import get_cfg

    with pytest.raises(ValueError, match="add_batchnorm_config"):
        validate_batchnorm_config(get_cfg())


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("TEST.PRECISE_BN.NUM_ITER", 0, "TEST.PRECISE_BN.NUM_ITER = 0 is not allowed; it must be an integer >= 1"),
        ("TEST.PRECISE_BN.NUM_SAMPLES", -5, "TEST.PRECISE_BN.NUM_SAMPLES = -5"),
        ("TEST.BN_STATS", "batch", "allowed values: ['population', 'mini_batch']"),
        ("BN.FROZEN_LAST_ITERS", 10**9, "<= SOLVER.MAX_ITER"),
        ("MODEL.ROI_BOX_HEAD.LEAKAGE_MITIGATION", "shufle", "MODEL.ROI_BOX_HEAD.LEAKAGE_MITIGATION = 'shufle'"),
        ("MODEL.RETINANET.POPULATION_STATS", "per-level", "MODEL.RETINANET.POPULATION_STATS"),
        ("TEST.PRECISE_BN.EVAL_EMA", 1, "TEST.PRECISE_BN.EVAL_EMA = 1 is not allowed; allowed values: [True, False]"),
        ("MODEL.RETINANET.NORM_SHARE_AFFINE", "yes", "MODEL.RETINANET.NORM_SHARE_AFFINE = 'yes'"),
        ("SOLVER.MAX_ITER", -5, "SOLVER.MAX_ITER = -5 is not allowed; it must be an integer >= 1"),
        ("SOLVER.IMS_PER_BATCH", 0, "SOLVER.IMS_PER_BATCH = 0 is not allowed"),
        ("SOLVER.CHECKPOINT_PERIOD", 0, "SOLVER.CHECKPOINT_PERIOD = 0 is not allowed"),
        ("BN.MOMENTUM", 1.5, "BN.MOMENTUM = 1.5 is not allowed; it must be a number in [0.0, 1.0]"),
        ("BN.MOMENTUM", float("nan"), "BN.MOMENTUM = nan is not allowed"),
        ("BN.MOMENTUM", "0.1", "BN.MOMENTUM = '0.1' is not allowed"),
        ("BN.EMA_ACROSS_WORKERS", "mean", "BN.EMA_ACROSS_WORKERS = 'mean' is not allowed; allowed values: "
         "['average', 'per_worker']"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(key, value, message):
    cfg = get_bn_cfg()
    node, name = key.rsplit(".", 1)
    target = cfg
    for part in node.split("."):
        target = target[part]
    target[name] = value
    with pytest.raises(ValueError) as err:
        validate_batchnorm_config(cfg)
    assert message in str(err.value)


def test_mini_batch_statistics_take_any_positive_test_batch():
    cfg = get_bn_cfg()
    cfg.TEST.BN_STATS = "mini_batch"
    cfg.TEST.IMS_PER_BATCH = 0
    with pytest.raises(ValueError, match="TEST.IMS_PER_BATCH = 0"):
        validate_batchnorm_config(cfg)
    cfg.TEST.IMS_PER_BATCH = 1  # one image: H x W values per channel, all RoIs of the image
    validate_batchnorm_config(cfg)


@pytest.mark.parametrize(
    "batch, reference, world_size, message",
    [
        (16, 0, 3, "SOLVER.IMS_PER_BATCH = 16 is not allowed with 3 workers: it is the total "
                   "batch, split evenly over the workers; allowed values: multiples of 3 (e.g. 15 or 18)"),
        (16, 3, 2, "SOLVER.IMS_PER_BATCH = 16 is not allowed with SOLVER.REFERENCE_WORLD_SIZE = 3"),
        (2, 0, 4, "allowed values: multiples of 4 (e.g. 4)"),
        (16, 0, 4, None),
        (16, 8, 3, None),  # detectron2 scales 16 images for 8 workers to 6 for 3
    ],
)
def test_the_training_batch_must_split_evenly_over_the_workers(batch, reference, world_size, message):
    cfg = get_bn_cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE = batch, reference
    if message is None:
        validate_batchnorm_config(cfg, world_size=world_size)
        return
    with pytest.raises(ValueError) as err:
        validate_batchnorm_config(cfg, world_size=world_size)
    assert message in str(err.value)


def test_the_code_needs_no_python_newer_than_the_declared_minimum():
    """pyproject's requires-python lower bound is not run here (only 3.11 is); vermin reads the
    package and its tools and finds no syntax, module or function newer than that bound."""
    import os
    import re

    from scripts import REPO

    with open(os.path.join(REPO, "pyproject.toml")) as f:
        minimum = re.search(r'requires-python = ">=(\d+\.\d+)', f.read()).group(1)
    vermin = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())"]
    out = subprocess.run([*vermin, "--no-tips", "--violations", f"-t={minimum}-",
                          os.path.join(REPO, "d2_batchnorm"), os.path.join(REPO, "tools")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
