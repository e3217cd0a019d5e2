"""
d2_batchnorm.audit and tools/bn_audit.py: every finding with and without its problem, the
shipped configs' findings, the batch arithmetic, and the command line.
"""
import glob
import importlib
import json
import os

import pytest
import torch

from d2_batchnorm.audit import audit_config

from tiny_datasets import TINY_VAL, register_tiny_val, write_tiny_val

TOY_MASK = "configs/Toy/mask_rcnn_R18_FPN_bn_head.yaml"
TOY_RETINA = "configs/Toy/retinanet_R18_FPN_bn_head.yaml"
SMALL_COCO_INPUT = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128"]  # findings do not depend on it


def _codes(config, opts=(), world_size=2):
    audit, _, _ = audit_config(config, list(opts), world_size)
    return sorted((f.code, f.group) for f in audit.findings)


LEAKY = [("leaky_head", "box head"), ("leaky_head", "mask head")]
LEVELS = [("level_statistics", "RetinaNet head")]
# shipped config -> the findings that explain why it is a baseline (none: a consistent variant)
SHIPPED = {
    "Toy/mask_rcnn_R18_FPN_base.yaml": LEAKY,
    "Toy/mask_rcnn_R18_FPN_bn_head.yaml": LEAKY,
    "Toy/mask_rcnn_R18_FPN_bn_head_batch_stats.yaml": sorted(LEAKY + [("mini_batch_inference", "all")]),
    "Toy/mask_rcnn_R18_FPN_gn_head.yaml": [],
    "Toy/mask_rcnn_R18_FPN_nonorm_head.yaml": [],
    "Toy/mask_rcnn_R18_FPN_shuffle_head.yaml": [],
    "Toy/mask_rcnn_R18_FPN_syncbn_head.yaml": [],
    "Base-RetinaNet-Toy.yaml": [],
    "Toy/retinanet_R18_FPN_bn_head.yaml": [],
    "Toy/retinanet_R18_FPN_syncbn_head_naive.yaml": LEVELS,
    "Toy/retinanet_R18_FPN_syncbn_head_train_per_level_pop_per_level.yaml": [],
    "Toy/retinanet_R18_FPN_syncbn_head_train_per_level_pop_shared.yaml": LEVELS,
    "Toy/retinanet_R18_FPN_syncbn_head_train_shared_pop_per_level.yaml": LEVELS,
    "Toy/retinanet_R18_FPN_syncbn_head_train_shared_pop_shared.yaml": [],
    "COCO-InstanceSegmentation/Base-Mask-RCNN-BN-Head.yaml": LEAKY,
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_bn_head.yaml": LEAKY,
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_bn_head_batch_stats.yaml":
        sorted(LEAKY + [("mini_batch_inference", "all")]),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn_head.yaml": [],
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_shuffle_head.yaml": [],
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn_head.yaml": [],
    "COCO-Detection/Base-RetinaNet-BN-Head.yaml": [],
    # per-GPU BN over 2 images: consistent levels, noisy batch statistics
    "COCO-Detection/retinanet_R_50_FPN_1x_bn_head.yaml": [("small_batch", "RetinaNet head")],
    "COCO-Detection/retinanet_R_50_FPN_1x_syncbn_head_naive.yaml": LEVELS,
    "COCO-Detection/retinanet_R_50_FPN_1x_syncbn_head_train_per_level_pop_per_level.yaml": [],
    "COCO-Detection/retinanet_R_50_FPN_1x_syncbn_head_train_per_level_pop_shared.yaml": LEVELS,
    "COCO-Detection/retinanet_R_50_FPN_1x_syncbn_head_train_shared_pop_per_level.yaml": LEVELS,
    "COCO-Detection/retinanet_R_50_FPN_1x_syncbn_head_train_shared_pop_shared.yaml": [],
}


def test_every_shipped_yaml_config_is_listed():
    found = {os.path.relpath(p, "configs") for p in glob.glob("configs/**/*.yaml", recursive=True)}
    assert found == set(SHIPPED)


@pytest.mark.parametrize("config", sorted(SHIPPED))
def test_shipped_configs_give_exactly_the_findings_that_make_them_baselines(config):
    coco = config.startswith("COCO")
    opts = SMALL_COCO_INPUT if coco else []
    assert _codes(os.path.join("configs", config), opts, world_size=8 if coco else 2) == SHIPPED[config]


LAZY_CONFIGS = sorted(
    os.path.relpath(p, "configs") for d in ("Toy", "COCO-Detection", "COCO-InstanceSegmentation")
    for p in glob.glob(f"configs/{d}/*.py"))


def test_every_lazy_config_has_a_yacs_twin():
    twins = {c.replace("fcos_", "retinanet_")[:-3] + ".yaml" for c in LAZY_CONFIGS}
    assert LAZY_CONFIGS and twins <= set(SHIPPED)


@pytest.mark.parametrize("config", LAZY_CONFIGS)
def test_shipped_lazy_configs_give_the_findings_of_their_yacs_twins(config):
    """Every shipped LazyConfig loads, builds and audits like its yacs twin (FCOS like RetinaNet)."""
    coco = config.startswith("COCO")
    opts = ["dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
            "dataloader.train.mapper.augmentations.0.max_size=128"] if coco else []
    audit, _, _ = audit_config(os.path.join("configs", config), opts, 8 if coco else 2)
    twin = SHIPPED[config.replace("fcos_", "retinanet_")[:-3] + ".yaml"]
    head = "FCOS head" if "fcos" in config else "RetinaNet head"
    assert sorted((f.code, f.group) for f in audit.findings) == [
        (code, head if group == "RetinaNet head" else group) for code, group in twin]
    for finding in audit.findings:  # fixes are LazyConfig overrides
        assert "=" in finding.fix.split()[0] and not finding.fix.startswith(("MODEL.", "TEST."))


def test_leaky_head_with_and_without_mitigation_or_enough_images():
    assert _codes(TOY_MASK) == LEAKY  # 2 images per worker, per-worker BN heads
    mitigated = ["MODEL.ROI_BOX_HEAD.LEAKAGE_MITIGATION", "shuffle", "MODEL.ROI_MASK_HEAD.LEAKAGE_MITIGATION", "syncbn"]
    assert _codes(TOY_MASK, mitigated) == []
    assert _codes(TOY_MASK, ["SOLVER.IMS_PER_BATCH", "8"]) == []  # 4 images per worker
    audit, _, _ = audit_config(TOY_MASK, ["SOLVER.IMS_PER_BATCH", "2"], 1)
    assert all("SOLVER.IMS_PER_BATCH" in f.fix for f in audit.findings)  # one worker: nothing to shuffle with


def test_level_statistics_of_detectron2s_head_shared_across_levels():
    # detectron2's RetinaNet applies one naiveSyncBN module to each level in turn: one EMA
    config = "configs/Base-RetinaNet-Toy.yaml"
    assert _codes(config) == []  # "BN": detectron2's CycleBatchNormList, one BN per level
    audit, _, _ = audit_config(config, ["MODEL.RETINANET.NORM", "naiveSyncBN"], 2)
    [finding] = audit.findings
    assert finding.code == "level_statistics" and "5 per forward" in finding.message
    assert "MODEL.META_ARCHITECTURE BNRetinaNet" in finding.fix


def test_small_batch_with_and_without():
    small = _codes(TOY_RETINA, ["SOLVER.IMS_PER_BATCH", "4"])
    assert small == [("small_batch", "RetinaNet head"), ("small_batch", "backbone")]
    assert _codes(TOY_RETINA, ["SOLVER.IMS_PER_BATCH", "4", "MODEL.RESNETS.NORM", "SyncBN",
                               "MODEL.RETINANET.NORM", "SyncBN"], world_size=2) == small  # 4 images in all
    audit, _, _ = audit_config(TOY_RETINA, ["SOLVER.IMS_PER_BATCH", "8"], 4)  # 2 per worker, 8 in all
    assert {f.fix for f in audit.findings} == {"MODEL.RESNETS.NORM SyncBN", "MODEL.RETINANET.NORM SyncBN"}
    assert _codes(TOY_RETINA, ["SOLVER.IMS_PER_BATCH", "8", "MODEL.RESNETS.NORM", "SyncBN",
                               "MODEL.RETINANET.NORM", "SyncBN"], world_size=4) == []


def test_ema_lag_with_and_without():
    # 300 iterations, last step at 270: momentum 0.01 keeps 0.99^30 = 0.74 of older statistics
    assert _codes(TOY_RETINA, ["BN.MOMENTUM", "0.01"]) == [
        ("ema_lag", "RetinaNet head"), ("ema_lag", "backbone")]
    assert _codes(TOY_RETINA, ["BN.MOMENTUM", "0.1"]) == []  # 0.9^30 = 0.04
    assert _codes(TOY_RETINA, ["BN.MOMENTUM", "0.01", "TEST.PRECISE_BN.ENABLED", "True"]) == []


def test_per_worker_population_with_and_without():
    per_worker = ["BN.EMA_ACROSS_WORKERS", "per_worker"]
    assert _codes(TOY_RETINA, per_worker) == [("per_worker_population", "all")]
    assert _codes(TOY_RETINA, per_worker, world_size=1) == []
    assert _codes(TOY_RETINA, per_worker + ["TEST.PRECISE_BN.ENABLED", "True"]) == []
    assert _codes(TOY_RETINA, per_worker + ["MODEL.RESNETS.NORM", "SyncBN", "MODEL.RETINANET.NORM", "SyncBN"]) == []


def test_few_precise_samples_with_and_without():
    on = ["TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.NUM_SAMPLES"]
    assert _codes(TOY_RETINA, on + ["128"]) == [("few_precise_samples", "all")]
    assert _codes(TOY_RETINA, on + ["1024"]) == []
    # NUM_ITER batches of the training batch per worker on every worker: 200 x 8 x 2
    assert _codes(TOY_RETINA, on + ["0"]) == []


def test_contradicting_inference_settings():
    frozen = ["BN.FROZEN_LAST_ITERS", "50"]
    mini = ["TEST.BN_STATS", "mini_batch", "TEST.IMS_PER_BATCH", "8"]
    assert _codes(TOY_RETINA, frozen) == []
    assert _codes(TOY_RETINA, mini) == [("mini_batch_inference", "all")]
    assert _codes(TOY_RETINA, frozen + mini) == [("frozen_then_mini_batch", "all"), ("mini_batch_inference", "all")]
    domain = ["TEST.PRECISE_BN.DATASETS", "('toy_coco_shifted_train',)"]
    assert _codes(TOY_RETINA, domain) == [("new_domain_unused", "all")]  # PreciseBN off
    assert _codes(TOY_RETINA, domain + ["TEST.PRECISE_BN.ENABLED", "True"]) == []


def test_batch_arithmetic_and_values_per_channel():
    audit, _, _ = audit_config("configs/Toy/mask_rcnn_R18_FPN_syncbn_head.yaml", [], 2)
    box = next(g for g in audit.groups if g.name == "box head")
    assert (box.workers_per_normalization, box.images_per_normalization) == (2, 4.0)
    assert box.values_per_channel == "4 images × 64 RoIs × 49 positions"
    audit, _, _ = audit_config("configs/Toy/mask_rcnn_R18_FPN_shuffle_head.yaml", ["SOLVER.IMS_PER_BATCH", "4"], 2)
    assert next(g for g in audit.groups if g.name == "mask head").images_per_normalization == 4.0
    audit, _, _ = audit_config(TOY_RETINA, ["MODEL.RESNETS.NORM", "GhostBN", "BN.GHOST_BATCH_SIZE", "2"], 2)
    backbone = next(g for g in audit.groups if g.name == "backbone")
    assert backbone.images_per_normalization == 2.0
    # 128 px: the stem's BN sees 64 x 64 positions, res5's 4 x 4; the head's P3..P7 16x16..1x1
    assert backbone.values_per_channel == "2 images × 4096 … 16 positions"
    head = next(g for g in audit.groups if g.name == "RetinaNet head")
    assert head.values_per_channel == "8 images × 256 … 1 positions" and "per_level over 5 levels" in head.population


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    tool = importlib.import_module("d2_batchnorm.cli.bn_audit")
    assert tool.cli(["--config-file", str(tmp_path / "missing.yaml")]) == 2
    assert tool.cli(["--config-file", TOY_RETINA, "MODEL.RETINANET.NORM_STATS", "perlevel"]) == 2
    assert tool.cli(["--config-file", TOY_RETINA, "--eval"]) == 2
    assert tool.cli(["--config-file", TOY_RETINA, "MODEL.WEIGHTS", str(tmp_path / "none.pth")]) == 2
    lazy = "configs/Toy/fcos_R18_FPN_bn_head.py"
    assert tool.cli(["--config-file", lazy, "model.head.norm_stats=mine"]) == 2
    assert tool.cli(["--config-file", lazy, f"train.init_checkpoint={tmp_path / 'x.pth'}"]) == 2
    assert tool.cli(["--config-file", lazy, "--eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["error"] * 7, err
    assert "MODEL.RETINANET.NORM_STATS = 'perlevel'" in err[1] and "MODEL.WEIGHTS" in err[3]
    assert "model.head.norm_stats = 'mine'" in err[4] and "train.init_checkpoint = " in err[5]
    assert "pass train.init_checkpoint on the command line" in err[6]


def test_cli_writes_the_audit_and_measures_a_checkpoint(tmp_path, capsys):
    from d2_batchnorm.modeling import build_model

    tool = importlib.import_module("d2_batchnorm.cli.bn_audit")
    out = tmp_path / "audit"
    assert tool.cli(["--config-file", TOY_MASK, "--num-gpus", "2", "--output", str(out)]) == 1  # findings
    data = json.loads((out / "bn_audit.json").read_text())
    assert [f["code"] for f in data["findings"]] == ["leaky_head", "leaky_head"]
    assert "| box head |" in (out / "bn_audit.md").read_text()

    # a checkpoint whose BN buffers are the initial ones (mean 0, var 1): far from precise
    json_file = str(tmp_path / "tiny_val.json")
    register_tiny_val(json_file, write_tiny_val(json_file))
    audit, cfg, _ = audit_config(TOY_RETINA, [], 1)
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    argv = ["--config-file", TOY_RETINA, "--output", str(out), "--samples", "8", "--eval",
            "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", f"('{TINY_VAL}',)", "TEST.IMS_PER_BATCH", "2",
            "TEST.PRECISE_BN.IMS_PER_BATCH", "2"]
    assert tool.cli(argv) == 0
    measured = json.loads((out / "bn_audit.json").read_text())["measured"]
    backbone = measured["backbone: checkpoint vs precise statistics (relative L2)"]
    assert backbone["mean"] > 0.5 and backbone["var"] > 0.1
    assert measured["PreciseBN"]["images"] == 8
    assert set(measured["bbox AP"]) == {"EMA (checkpoint)", "mini-batch (2 img)", "precise"}
    # 4 batches of 2 images: the standard errors of the precise statistics, per group
    errors = measured["backbone: relative standard error of the precise statistics"]
    assert set(errors) == {"mean max", "mean median", "std max", "std median"}
    assert 0 < errors["mean median"] <= errors["mean max"] < float("inf")

    # the same measurement from a LazyConfig (key=value overrides, train.init_checkpoint)
    lazy = "configs/Toy/retinanet_R18_FPN_bn_head.py"
    from d2_batchnorm.engine import build_any_model, load_any_config

    torch.save({"model": build_any_model(load_any_config(lazy, ["train.device=cpu"])).state_dict()}, weights)
    argv = ["--config-file", lazy, "--output", str(out), "--samples", "8", f"train.init_checkpoint={weights}"]
    assert tool.cli(argv) == 0
    measured = json.loads((out / "bn_audit.json").read_text())["measured"]
    assert measured["PreciseBN"]["images"] == 8
    assert measured["RetinaNet head: checkpoint vs precise statistics (relative L2)"]["var"] > 0.1
