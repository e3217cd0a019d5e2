"""
Every shipped config under configs/ is exercised, the COCO ones included (what a COCO user
launches, on 8 GPUs with ImageNet weights):

* fast: each config loads and validates (``load_config``, for 2 workers), and its model
  builds on CPU, without weights, with the meta-architecture and the norms of backbone,
  FPN and heads that the config names;
* slow (``-m slow`` selects it, ``-m "not slow"`` skips it): each COCO config trains 2
  iterations in 2 real gloo CPU processes on the toy dataset, at 64 px, with its model,
  norms, heads and hooks unchanged (PreciseBN, the EMA evaluation, the checkpointer and the
  final evaluation run, on a 4-image toy validation set). Only data, input size, batch size,
  schedule length, number of classes and PreciseBN's iterations are overridden.
"""
import glob
import math
import os

import pytest
import torch
from detectron2.layers.batch_norm import FrozenBatchNorm2d, LayerNorm, NaiveSyncBatchNorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from d2_batchnorm.engine import load_config
from d2_batchnorm.layers import GhostBatchNorm, LevelBatchNorm, SyncBatchNorm
from d2_batchnorm.modeling import build_model
from tiny_datasets import TINY_VAL, register_tiny_val, write_tiny_val

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR) for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
)
COCO_CONFIGS = [c for c in CONFIGS if c.startswith("COCO-")]
WORLD_SIZE = 2  # COCO configs are for 8 GPUs: SOLVER.IMS_PER_BATCH 16 divides by 2 too

# every module a norm name can build
NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d, LayerNorm)
# the module type each norm name gives in a model built by d2_batchnorm.modeling.build_model
# ("nnSyncBN" is converted to our SyncBatchNorm)
NORM_TYPE_OF_NAME = {
    "": None,
    "BN": nn.BatchNorm2d,
    "SyncBN": SyncBatchNorm,
    "nnSyncBN": SyncBatchNorm,
    "GhostBN": GhostBatchNorm,
    "FrozenBN": FrozenBatchNorm2d,
    "GN": nn.GroupNorm,
    "LN": LayerNorm,
    "naiveSyncBN": NaiveSyncBatchNorm,
    "naiveSyncBN_N": NaiveSyncBatchNorm,
}


def _path(config):
    return os.path.join(CONFIG_DIR, config)


def _norm_types(module):
    """The exact types of the norm modules inside ``module``."""
    return {type(m) for m in module.modules() if isinstance(m, NORM_TYPES)}


def _check_norms(where, modules, name, extra_allowed=()):
    """The norm modules of ``modules`` are all of the type norm ``name`` gives (none for "")."""
    types = set().union(*(_norm_types(m) for m in modules))
    expected = NORM_TYPE_OF_NAME[name]
    if expected is None:
        assert not types, f"{where}: norm {name!r} but the model has {types}"
    else:
        assert expected in types and types <= {expected, *extra_allowed}, (
            f"{where}: norm {name!r} should give {expected.__name__}; the model has {types}"
        )


def _check_retinanet_head(cfg, head):
    retina = cfg.MODEL.RETINANET
    norms = [m for m in head.modules() if isinstance(m, NORM_TYPES)]
    if cfg.MODEL.META_ARCHITECTURE != "BNRetinaNet":  # detectron2's head
        _check_norms("MODEL.RETINANET.NORM", [head], retina.NORM)
        return
    if not (retina.NORM in ("BN", "SyncBN") and retina.NORM_STATS != "naive"):
        _check_norms("MODEL.RETINANET.NORM", [head], retina.NORM)
        assert len(norms) == (2 * retina.NUM_CONVS if retina.NORM else 0)
        return
    # one LevelBatchNorm per conv of each subnet, with the configured statistics
    assert len(norms) == 2 * retina.NUM_CONVS and all(type(m) is LevelBatchNorm for m in norms), (
        f"MODEL.RETINANET.NORM {retina.NORM!r} should give {2 * retina.NUM_CONVS} LevelBatchNorm; "
        f"the head has {[type(m).__name__ for m in norms]}"
    )
    num_levels = len(retina.IN_FEATURES)
    population = retina.POPULATION_STATS or retina.NORM_STATS
    for m in norms:
        buffer_shape = (num_levels, m.num_features) if population == "per_level" else (m.num_features,)
        got = (m.num_levels, m.stats, m.population_stats, m.sync_stats, m.share_affine, tuple(m.running_mean.shape))
        want = (num_levels, retina.NORM_STATS, population, retina.NORM == "SyncBN", retina.NORM_SHARE_AFFINE,
                buffer_shape)
        assert got == want, (
            f"MODEL.RETINANET: (levels, stats, population stats, sync, shared affine, buffer shape) {got} != {want}"
        )


def _check_roi_head(cfg, node, head):
    spec = cfg.MODEL[node]
    name = "SyncBN" if spec.LEAKAGE_MITIGATION == "syncbn" else spec.NORM
    _check_norms(f"MODEL.{node}.NORM", [head], name)
    norms = [m for m in head.modules() if isinstance(m, NORM_TYPES)]
    assert len(norms) == (spec.NUM_CONV if name else 0), f"MODEL.{node}: {len(norms)} norms"
    if hasattr(head, "leakage_mitigation"):
        assert head.leakage_mitigation == spec.LEAKAGE_MITIGATION, f"MODEL.{node}: {head.leakage_mitigation!r}"


def test_config_list():
    assert CONFIGS, f"no config under {CONFIG_DIR}"
    dirs = {c.split(os.sep)[0] for c in COCO_CONFIGS}
    assert {"COCO-Detection", "COCO-InstanceSegmentation"} <= dirs, COCO_CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_config_loads_and_builds(config):
    cfg = load_config(_path(config), world_size=WORLD_SIZE)
    if not torch.cuda.is_available():
        assert cfg.MODEL.DEVICE == "cpu"
    model = build_model(cfg)

    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    assert all(p.device.type == cfg.MODEL.DEVICE for p in model.parameters())
    # backbone: ResNet (stages below FREEZE_AT have their BN frozen by detectron2) and FPN
    bottom_up = [model.backbone.bottom_up]
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and hasattr(roi_heads, "res5"):
        bottom_up.append(roi_heads.res5)
    frozen = (FrozenBatchNorm2d,) if cfg.MODEL.BACKBONE.FREEZE_AT > 0 else ()
    _check_norms("MODEL.RESNETS.NORM", bottom_up, cfg.MODEL.RESNETS.NORM, frozen)
    fpn = [m for n, m in model.backbone.named_children() if n != "bottom_up"]
    _check_norms("MODEL.FPN.NORM", fpn, cfg.MODEL.FPN.NORM)
    # heads
    if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE:
        assert model.head.cls_score.out_channels % cfg.MODEL.RETINANET.NUM_CLASSES == 0
        _check_retinanet_head(cfg, model.head)
    if roi_heads is not None:
        assert type(roi_heads).__name__ == cfg.MODEL.ROI_HEADS.NAME
        if hasattr(roi_heads, "box_head"):
            assert type(roi_heads.box_head).__name__ == cfg.MODEL.ROI_BOX_HEAD.NAME
            _check_roi_head(cfg, "ROI_BOX_HEAD", roi_heads.box_head)
        assert hasattr(roi_heads, "mask_head") == cfg.MODEL.MASK_ON
        if cfg.MODEL.MASK_ON:
            assert type(roi_heads.mask_head).__name__ == cfg.MODEL.ROI_MASK_HEAD.NAME
            _check_roi_head(cfg, "ROI_MASK_HEAD", roi_heads.mask_head)


# ---------------------------------------------------------------------------------------
# slow: 2 training iterations of every COCO config in 2 gloo processes

def _small_run_opts(output_dir):
    """What changes: data, input size, batch, schedule, classes, PreciseBN's iterations."""
    return [
        "DATASETS.TRAIN", "('toy_coco_train',)",
        "DATASETS.TEST", f"('{TINY_VAL}',)",
        "MODEL.WEIGHTS", "",
        "MODEL.RETINANET.NUM_CLASSES", "3",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "4",  # 2 images per worker, as the COCO configs on 8 GPUs
        "SOLVER.MAX_ITER", "2",
        "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.PRECISE_BN.NUM_ITER", "2",
        "OUTPUT_DIR", output_dir,
    ]


def _train_configs(configs, output_root, tiny_val_json, tiny_val_images):
    """In each worker: trains every config of ``configs`` 2 iterations; per-config results."""
    import logging
    import shutil
    import time

    from detectron2.utils import comm

    from d2_batchnorm.engine import BNTrainer

    # INFO enabled but no handler: BNTrainer sets up no console logger, nothing is printed
    logging.getLogger("detectron2").setLevel(logging.INFO)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_world_size()))
    register_tiny_val(tiny_val_json, tiny_val_images)

    results = {}
    for config in configs:
        start = time.perf_counter()
        output_dir = os.path.join(output_root, config.replace(os.sep, "_")[: -len(".yaml")])
        try:
            cfg = load_config(_path(config), _small_run_opts(output_dir), comm.get_world_size())
            trainer = BNTrainer(cfg)
            trainer.resume_or_load(resume=False)
            trainer.train()
        except Exception as e:
            raise RuntimeError(f"{config}: training failed on rank {comm.get_rank()}: {e!r}") from e
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        buffers = [b for m in model.modules() if isinstance(m, _BatchNorm) for b in (m.running_mean, m.running_var)]
        results[config] = {
            "iter": trainer.iter,
            "storage_iter": trainer.storage.iter,
            "scalars": {k: v for k, (v, _) in trainer.storage.latest().items()},
            "eval": getattr(trainer, "_last_eval_results", None),
            "params": torch.stack([p.detach().double().sum() for p in model.parameters()]),
            "bn_buffers": torch.stack([b.double().sum() for b in buffers]) if buffers else torch.zeros(0),
            "seconds": time.perf_counter() - start,
        }
        comm.synchronize()
        if comm.is_main_process():  # checkpoints of an R-50 are ~170 MB each
            for name in os.listdir(output_dir):
                if name.endswith(".pth"):
                    os.remove(os.path.join(output_dir, name))
        del trainer, model
    return results


def _check_run(config, ranks):
    cfg = load_config(_path(config), world_size=WORLD_SIZE)
    r0, r1 = ranks
    for rank, r in enumerate(ranks):
        assert r["iter"] == 2 and r["storage_iter"] == 2, f"{config} rank {rank}: {r['iter']} iterations"
        assert torch.isfinite(r["params"]).all(), f"{config} rank {rank}: non-finite parameters"
    # rank 0 logs the losses of both workers (averaged; detectron2 raises on a non-finite one)
    losses = {k: v for k, v in r0["scalars"].items() if k == "total_loss" or k.startswith("loss_")}
    assert "total_loss" in losses and len(losses) > 1, f"{config}: losses {losses}"
    assert all(math.isfinite(v) for v in losses.values()), f"{config}: losses {losses}"
    # DDP kept the workers' weights equal
    assert torch.equal(r0["params"], r1["params"]), f"{config}: parameters differ between the ranks"
    # the final evaluation ran (after 2 iterations there may be no detection at all, and
    # then COCOEvaluator reports "bbox" only, with NaN APs)
    assert "bbox" in r0["eval"], f"{config}: evaluation results {r0['eval']}"
    if cfg.TEST.PRECISE_BN.ENABLED:
        for rank, r in enumerate(ranks):
            samples = r["scalars"].get("precise_bn/samples")
            assert samples == 2 * 2 * WORLD_SIZE, f"{config} rank {rank}: PreciseBN samples {samples}"
        if cfg.TEST.PRECISE_BN.EVAL_EMA and cfg.TEST.BN_STATS == "population":  # as BNTrainer
            assert "ema/bbox/AP" in r0["scalars"], f"{config}: no EMA evaluation logged"
    else:
        assert "precise_bn/samples" not in r0["scalars"]
    # precise statistics, or the EMA averaged over workers (BN.EMA_ACROSS_WORKERS average)
    assert torch.equal(r0["bn_buffers"], r1["bn_buffers"]), f"{config}: BN statistics differ between ranks"


@pytest.mark.slow
def test_coco_configs_train_two_iterations_in_two_processes(run_workers, tmp_path):
    from d2_batchnorm.data import prepare_datasets

    prepare_datasets(["toy_coco_train"])
    tiny_val_json = str(tmp_path / "tiny_val.json")
    images = write_tiny_val(tiny_val_json)
    results = run_workers(_train_configs, COCO_CONFIGS, str(tmp_path / "runs"), tiny_val_json, images)
    assert [sorted(r) for r in results] == [COCO_CONFIGS] * WORLD_SIZE
    for config in COCO_CONFIGS:
        print(f"{config}: {max(r[config]['seconds'] for r in results):.1f} s")
        _check_run(config, [r[config] for r in results])


@pytest.mark.parametrize("momentum, expected", [(0.0, 0.1), (0.01, 0.01)])
def test_bn_momentum_reaches_every_batch_norm_of_the_model(momentum, expected):
    """BN.MOMENTUM 0.0 keeps the layers' default (torch's 0.1); > 0 sets every BN, heads included."""
    cfg = load_config(_path("Toy/retinanet_R18_FPN_bn_head.yaml"), ["BN.MOMENTUM", momentum], WORLD_SIZE)
    norms = [m for m in build_model(cfg).modules() if isinstance(m, _BatchNorm)]
    assert len(norms) > 20
    assert {m.momentum for m in norms} == {expected}
