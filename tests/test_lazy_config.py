"""
LazyConfig users: tools/lazyconfig_train_net.py refuses bad values before any worker
starts; the yacs and LazyConfig builds of a variant are the same model; a toy LazyConfig of
each family (RetinaNet, FCOS, Mask R-CNN) trains and evaluates in 2 gloo processes with
PreciseBN; FCOS's level statistics on 2 ranks equal an independent computation.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from d2_batchnorm.engine import build_lazy_model, load_config, load_lazy_config
from d2_batchnorm.layers import LevelBatchNorm, SyncBatchNorm
from d2_batchnorm.modeling import build_model
from tiny_datasets import TINY_VAL, register_tiny_val, write_tiny_val

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from d2_batchnorm.cli import lazyconfig_train_net  # noqa: E402


def _config(name):
    return os.path.join(REPO, "configs", name)


TOY_FCOS = _config("Toy/fcos_R18_FPN_bn_head.py")
TOY_MASK = _config("Toy/mask_rcnn_R18_FPN_bn_head.py")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config-file", "configs/Toy/nope.py"], "configs/Toy/nope.py' does not exist"),
        (["--config-file", TOY_FCOS, "model.head.norm_stats=mine"], "model.head.norm_stats = 'mine' is not allowed"),
        (["--config-file", TOY_FCOS, "model.head.norm_stats=naive", "model.head.population_stats=shared"],
         "model.head.population_stats = 'shared' is not allowed with model.head.norm_stats = 'naive'"),
        (["--config-file", TOY_FCOS, "model.head.norm=SynBN"], "model.head.norm = 'SynBN' is not allowed"),
        (["--config-file", TOY_FCOS, "model.backbone.bottom_up.stem.norm=GhostBN"],
         "model.backbone.bottom_up.stem.norm = 'GhostBN' is not allowed"),
        (["--config-file", TOY_FCOS, "--num-gpus", "3"], "dataloader.train.total_batch_size = 16 is not allowed with 3 workers"),
        (["--config-file", TOY_FCOS, "train.amp.enabled=True"],
         "train.amp.enabled = True is not allowed with train.device = 'cpu': detectron2's AMPTrainer needs a CUDA device"),
        (["--config-file", TOY_FCOS, "model.head.sync_group_size=3"], "model.head.sync_group_size = 3 is not allowed"),
        (["--config-file", TOY_FCOS, "train.precise_bn.num_iter=0"], "train.precise_bn.num_iter = 0 is not allowed"),
        (["--config-file", TOY_FCOS, "train.precise_bn.enable=True"], "train.precise_bn.enable is not a setting"),
        (["--config-file", TOY_FCOS, "train.bn_stats=batch"], "train.bn_stats = 'batch' is not allowed"),
        (["--config-file", TOY_FCOS, "train.frozen_bn_last_iters=400"], "train.frozen_bn_last_iters = 400 is not allowed"),
        (["--config-file", TOY_FCOS, "train.init_checkpoint={tmp}/nowhere.pth"],
         "train.init_checkpoint = '{tmp}/nowhere.pth' does not exist"),
        (["--config-file", TOY_MASK, "model.roi_heads.box_head.leakage_mitigation=shuffle",
          "model.roi_heads.box_head.conv_norm=GN"],
         "model.roi_heads.box_head.leakage_mitigation = 'shuffle' needs BatchNorm in the head"),
    ],
)
def test_bad_values_fail_before_any_worker_starts(argv, message, capsys, tmp_path):
    """One ``error:`` line naming the config path; nothing is written into train.output_dir."""
    out = tmp_path / "out"
    argv = ["--num-gpus", "2"] * ("--num-gpus" not in argv) + [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert lazyconfig_train_net.cli(argv + [f"train.output_dir={out}", "train.device=cpu"]) == 2  # CPU processes
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# the same variant from yacs and from a LazyConfig

PAIRS = [
    ("Toy/retinanet_R18_FPN_bn_head", "Toy/retinanet_R18_FPN_bn_head"),
    ("Toy/retinanet_R18_FPN_syncbn_head_train_shared_pop_per_level",) * 2,
    ("Toy/retinanet_R18_FPN_syncbn_head_naive",) * 2,
    ("Toy/mask_rcnn_R18_FPN_bn_head",) * 2,
    ("Toy/mask_rcnn_R18_FPN_shuffle_head",) * 2,
    ("Toy/mask_rcnn_R18_FPN_syncbn_head",) * 2,
    ("Toy/mask_rcnn_R18_FPN_gn_head",) * 2,
    ("COCO-Detection/retinanet_R_50_FPN_1x_syncbn_head_train_per_level_pop_shared",) * 2,
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_shuffle_head",) * 2,
]

_NORM_MODES = ("stats", "population_stats", "share_affine", "sync_stats", "num_levels", "leakage_mitigation",
               "training", "eps", "momentum")


def _structure(model):
    """(name, type, norm modes) of every module; (name, shape) of every parameter."""
    modules = [(n, type(m).__name__, tuple(getattr(m, a, None) for a in _NORM_MODES)) for n, m in model.named_modules()]
    return modules, [(n, tuple(p.shape)) for n, p in model.named_parameters()]


@pytest.mark.parametrize("yacs, lazy", PAIRS)
def test_yacs_and_lazy_config_build_the_same_model(yacs, lazy):
    yacs_model = build_model(load_config(_config(yacs + ".yaml"), world_size=2))
    lazy_cfg = load_lazy_config(_config(lazy + ".py"), world_size=2)
    lazy_model = build_lazy_model(lazy_cfg)
    yacs_modules, yacs_params = _structure(yacs_model)
    lazy_modules, lazy_params = _structure(lazy_model)
    assert lazy_modules == yacs_modules
    assert lazy_params == yacs_params
    # the inference statistics and PreciseBN settings agree too
    yacs_cfg = load_config(_config(yacs + ".yaml"), world_size=2)
    assert lazy_cfg.train.bn_stats == yacs_cfg.TEST.BN_STATS
    assert lazy_cfg.train.precise_bn.enabled == yacs_cfg.TEST.PRECISE_BN.ENABLED


def test_a_detectron2_style_config_needs_only_its_import_changed(tmp_path):
    """Configs written as in detectron2's projects/Rethinking-BatchNorm, with d2_batchnorm's get_config."""
    (tmp_path / "retinanet_syncbn.py").write_text(
        "from d2_batchnorm.model_zoo import get_config\n"
        "model = get_config('common/models/retinanet.py').model\n"
        "model.head.norm = 'SyncBN'\n"
        "dataloader = get_config('common/data/coco.py').dataloader\n"
        "lr_multiplier = get_config('common/coco_schedule.py').lr_multiplier_3x\n"
        "optimizer = get_config('common/optim.py').SGD\n"
        "train = get_config('common/train.py').train\n"
    )
    (tmp_path / "mask_rcnn_syncbn.py").write_text(
        "from d2_batchnorm.model_zoo import get_config\n"
        "model = get_config('common/models/mask_rcnn_fpn.py').model\n"
        "model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = 'SyncBN'\n"
        "model.roi_heads.box_head.conv_dims = [256] * 4\n"
        "model.roi_heads.box_head.fc_dims = [1024]\n"
        "from .retinanet_syncbn import dataloader, lr_multiplier, optimizer, train\n"
    )
    head = build_lazy_model(load_lazy_config(str(tmp_path / "retinanet_syncbn.py"), world_size=8)).head
    norms = [m for m in head.modules() if isinstance(m, _BatchNorm)]
    assert len(norms) == 8 and all(type(m) is LevelBatchNorm and m.sync_stats and m.stats == "per_level" for m in norms)
    roi_heads = build_lazy_model(load_lazy_config(str(tmp_path / "mask_rcnn_syncbn.py"), world_size=8)).roi_heads
    for head, count in ((roi_heads.box_head, 4), (roi_heads.mask_head, 4)):
        assert [type(m) for m in head.modules() if isinstance(m, _BatchNorm)] == [SyncBatchNorm] * count


# ---------------------------------------------------------------------------------------
# a toy LazyConfig of each family trains and evaluates in 2 processes, with PreciseBN

FAMILIES = ["Toy/retinanet_R18_FPN_syncbn_head_train_shared_pop_shared.py", "Toy/fcos_R18_FPN_bn_head.py",
            "Toy/mask_rcnn_R18_FPN_shuffle_head.py"]


def _small_run(output_dir):
    return [
        "dataloader.train.dataset.names=toy_coco_train",
        f"dataloader.test.dataset.names={TINY_VAL}",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.max_size=64",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=64",
        "dataloader.train.total_batch_size=4",
        "train.max_iter=2",
        "train.precise_bn.enabled=True",
        # adaptive PreciseBN: a target every module meets once it has MIN_UNITS = 10 units
        # (5 batches on each of 2 workers), capped at 6 batches
        "train.precise_bn.num_iter=6",
        "train.precise_bn.target_rel_error=1.0",
        f"train.output_dir={output_dir}",
    ]


def _train_families(output_root, tiny_val_json, tiny_val_images):
    import argparse
    import logging

    from detectron2.utils import comm

    from d2_batchnorm.engine import build_lazy_trainer, setup_lazy

    logging.getLogger("detectron2").setLevel(logging.INFO)
    register_tiny_val(tiny_val_json, tiny_val_images)
    results = {}
    for config in FAMILIES:
        out = os.path.join(output_root, os.path.basename(config)[:-3])
        args = argparse.Namespace(config_file=_config(config), opts=_small_run(out), eval_only=False, resume=False)
        cfg = setup_lazy(args)
        trainer = build_lazy_trainer(cfg)
        trainer.train(0, cfg.train.max_iter)
        model = trainer.model.module
        results[config] = {
            "iter": trainer.iter,
            "scalars": {k: v for k, (v, _) in trainer.storage.latest().items()},
            "params": torch.stack([p.detach().double().sum() for p in model.parameters()]),
            "bn_buffers": torch.cat([b.double().flatten() for m in model.modules() if isinstance(m, _BatchNorm)
                                     for b in (m.running_mean, m.running_var)]),
            "output_files": sorted(os.listdir(out)),
        }
        comm.synchronize()
    return results


def test_toy_lazy_configs_train_and_evaluate_in_two_processes(run_workers, tmp_path):
    from d2_batchnorm.data import prepare_datasets

    prepare_datasets(["toy_coco_train"])
    tiny_val_json = str(tmp_path / "tiny_val.json")
    images = write_tiny_val(tiny_val_json)
    r0, r1 = run_workers(_train_families, str(tmp_path / "runs"), tiny_val_json, images)
    for config in FAMILIES:
        a, b = r0[config], r1[config]
        assert a["iter"] == b["iter"] == 2, config
        assert torch.equal(a["params"], b["params"]), f"{config}: DDP kept the weights equal"
        assert torch.equal(a["bn_buffers"], b["bn_buffers"]), f"{config}: precise statistics differ between ranks"
        # batches of 2 images on each of 2 workers, until the errors of >= 10 units meet the target
        assert a["scalars"]["precise_bn/samples"] in (20, 24), config
        assert a["scalars"]["precise_bn/rel_error/min_units"] >= 10, config
        assert a["scalars"]["precise_bn/samples"] == 24 or a["scalars"]["precise_bn/rel_error/max"] <= 1.0, config
        assert "bbox/AP" in a["scalars"] and "ema/bbox/AP" in a["scalars"], f"{config}: {sorted(a['scalars'])}"
        assert {"config.yaml", "metrics.json", "model_final.pth"} <= set(a["output_files"]), a["output_files"]


# ---------------------------------------------------------------------------------------
# FCOS head statistics on 2 ranks against plain batch norm over all ranks' data

LEVEL_SIZES = ((8, 8), (4, 4), (2, 2))
C = 8


def _features(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(2, C, h, w, generator=g) * (1 + i) + i for i, (h, w) in enumerate(LEVEL_SIZES)]


def _head(stats):
    from detectron2.layers import ShapeSpec

    from d2_batchnorm.modeling import BNFCOSHead

    torch.manual_seed(0)
    return BNFCOSHead(input_shape=[ShapeSpec(channels=C)] * len(LEVEL_SIZES), num_classes=3, conv_dims=[C, C],
                      norm="SyncBN", norm_stats=stats)


def _reference_subnet(subnet, per_rank_levels, stats, rank):
    """The subnet by hand: conv, then F.batch_norm over both ranks' maps (per level or all levels at once)."""
    xs = per_rank_levels  # [rank][level] tensors
    for layer in subnet:
        if isinstance(layer, nn.Conv2d):
            xs = [[layer(x) for x in levels] for levels in xs]
        elif isinstance(layer, LevelBatchNorm):
            w, b = layer.weight, layer.bias
            if stats == "per_level":
                out = [[None] * len(LEVEL_SIZES) for _ in xs]
                for i in range(len(LEVEL_SIZES)):
                    y = F.batch_norm(torch.cat([levels[i] for levels in xs]), None, None, w, b, True, 0.0, layer.eps)
                    for r, part in enumerate(y.split([levels[i].shape[0] for levels in xs])):
                        out[r][i] = part
            else:  # one BN over the flattened concatenation of every level of every rank
                flat = torch.cat([x.flatten(2) for levels in xs for x in levels], dim=2).unsqueeze(3)
                y = F.batch_norm(flat, None, None, w, b, True, 0.0, layer.eps)
                sizes = [x.shape[2] * x.shape[3] for levels in xs for x in levels]
                parts = iter(y.split(sizes, dim=2))
                out = [[next(parts).reshape(x.shape) for x in levels] for levels in xs]
            xs = out
        else:
            xs = [[layer(x) for x in levels] for levels in xs]
    return xs[rank]


def _fcos_level_statistics(stats):
    from detectron2.utils import comm

    from d2_batchnorm import update_bn_stats

    rank = comm.get_rank()
    head = _head(stats).train()
    ours = head([x.requires_grad_(False) for x in _features(rank, 0)])
    with torch.no_grad():
        both = [_features(r, 0) for r in range(2)]
        reference = (
            [head.cls_score(x) for x in _reference_subnet(head.cls_subnet, both, stats, rank)],
            [head.bbox_pred(x) for x in _reference_subnet(head.bbox_subnet, both, stats, rank)],
            [head.ctrness(x) for x in _reference_subnet(head.bbox_subnet, both, stats, rank)],
        )
    output_error = max((o - r).abs().max().item() for os_, rs in zip(ours, reference) for o, r in zip(os_, rs))

    # PreciseBN: the first norm's population statistics are those of conv1's outputs over
    # both ranks' batches (per level, or of all levels together)
    batches = [_features(rank, step) for step in range(1, 4)]
    update_bn_stats(head, batches, num_iters=len(batches))
    conv, norm = head.cls_subnet[0], head.cls_subnet[1]
    with torch.no_grad():
        inputs = [[conv(x) for x in _features(r, step)] for r in range(2) for step in range(1, 4)]
    if stats == "per_level":
        values = [torch.cat([levels[i].transpose(0, 1).flatten(1) for levels in inputs], 1) for i in range(len(LEVEL_SIZES))]
        mean = torch.stack([v.double().mean(1) for v in values])
        var = torch.stack([v.double().var(1, unbiased=False) for v in values])
    else:
        v = torch.cat([x.transpose(0, 1).flatten(1) for levels in inputs for x in levels], 1).double()
        mean, var = v.mean(1), v.var(1, unbiased=False)
    stats_error = max((norm.running_mean.double() - mean).abs().max().item(),
                      ((norm.running_var.double() - var).abs() / var).max().item())
    return output_error, stats_error, tuple(norm.running_mean.shape)


def _fcos_both_modes():
    return {stats: _fcos_level_statistics(stats) for stats in ("per_level", "shared")}


def test_fcos_head_level_statistics_on_two_ranks(run_workers):
    for results in run_workers(_fcos_both_modes):
        for stats, (output_error, stats_error, shape) in results.items():
            assert output_error < 1e-4, f"{stats}: head outputs differ from batch norm over both ranks by {output_error}"
            assert stats_error < 1e-5, f"{stats}: PreciseBN statistics off by {stats_error}"
            assert shape == ((len(LEVEL_SIZES), C) if stats == "per_level" else (C,))
