"""
Config keys of d2_batchnorm and their launch-time validation.

This module holds every key with its default and the checks that involve keys (names,
ranges, cross-key rules, the world size). The allowed values of a key are defined by the
code that implements them and imported here: norm names (``layers.NORM_NAMES``), RetinaNet
statistics modes (``modeling.retinanet.BNRetinaNetHead``), leakage mitigations
(``modeling.roi_heads``, and the registered heads that declare them), inference statistics
(``bn_modes.TEST_BN_STATS``); argument checks themselves are ``checks.check_*``.

``add_batchnorm_config(cfg)`` extends detectron2's default config in place. detectron2's
own keys keep their meaning (``TEST.PRECISE_BN.ENABLED``, ``TEST.PRECISE_BN.NUM_ITER``,
``MODEL.*.NORM``); new keys extend the node they belong to, or sit under ``BN`` for
policies that concern every BatchNorm of the model. README.md lists every key with its
default and allowed values.

``validate_batchnorm_config(cfg)`` checks values before any model, data loader or process
group is built, and raises ``ValueError`` naming the key, the bad value and what is allowed.
"""
from detectron2.config import CfgNode as CN
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY

from .bn_modes import TEST_BN_STATS
from .checks import check_bool, check_choice, check_float, check_int
from .distributed import check_sync_group_size
from .layers import NORM_NAMES
from .modeling.retinanet import BNRetinaNetHead
from .modeling.roi_heads import leakage_args_from_config

__all__ = ["add_batchnorm_config", "validate_batchnorm_config", "images_per_worker"]

# Keys naming a norm (d2_batchnorm.layers.get_norm's names), and those whose norm sees a
# batch of images (the ones GhostBN splits into BN.GHOST_BATCH_SIZE images).
NORM_KEYS = ("RESNETS", "FPN", "RETINANET", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
IMAGE_BATCH_NORM_KEYS = ("RESNETS", "FPN", "RETINANET")


def add_batchnorm_config(cfg: CN) -> CN:
    """
    Adds d2_batchnorm's keys with their defaults to ``cfg`` (a detectron2 config from
    ``get_cfg()``), in place. Calling it twice is harmless. Returns ``cfg``.
    """
    frozen = cfg.is_frozen()
    cfg.defrost()
    _add_keys(cfg)
    if frozen:
        cfg.freeze()
    return cfg


def _set_default(node: CN, key: str, value) -> None:
    if key not in node:
        node[key] = value


def _add_keys(cfg: CN) -> None:
    # ---- PreciseBN (detectron2: TEST.PRECISE_BN.ENABLED / NUM_ITER keep their meaning)
    pbn = cfg.TEST.PRECISE_BN
    # Global number of images (all workers together) to compute population statistics
    # from; > 0 takes precedence over NUM_ITER (iterations per worker).
    _set_default(pbn, "NUM_SAMPLES", 0)
    # Run PreciseBN every PERIOD iterations (and after the last one); 0: TEST.EVAL_PERIOD.
    _set_default(pbn, "PERIOD", 0)
    # Images per worker per PreciseBN batch; 0: the training batch per worker.
    _set_default(pbn, "IMS_PER_BATCH", 0)
    # Datasets to compute the statistics on; empty: DATASETS.TRAIN. Naming a test-domain
    # dataset recomputes the statistics on that domain before evaluation.
    _set_default(pbn, "DATASETS", ())
    # Also evaluate with the EMA statistics before PreciseBN replaces them, so both APs are
    # logged in one run ("ema/<metric>" next to "<metric>").
    _set_default(pbn, "EVAL_EMA", True)

    # ---- statistics at inference
    # "population": running (EMA or precise) statistics; "mini_batch": every BN normalizes
    # each test batch by its own statistics (train-mode BN at inference).
    _set_default(cfg.TEST, "BN_STATS", "population")
    # Images per worker per inference batch when TEST.BN_STATS is "mini_batch" (1 is a
    # batch too: H x W values per channel in the backbone, all RoIs of one image in a head).
    _set_default(cfg.TEST, "IMS_PER_BATCH", 1)

    # ---- policies for every BatchNorm of the model
    if "BN" not in cfg:
        cfg.BN = CN()
    # Freeze all BN layers (population statistics, affine still trained) for the last N
    # training iterations; 0 disables.
    _set_default(cfg.BN, "FROZEN_LAST_ITERS", 0)
    # "SyncBN" normalizes over groups of this many consecutive workers; 0: all workers.
    _set_default(cfg.BN, "SYNC_GROUP_SIZE", 0)
    # "GhostBN" normalizes over virtual batches of this many samples; 0: whole batch.
    _set_default(cfg.BN, "GHOST_BATCH_SIZE", 0)
    # EMA momentum m of every BatchNorm (running = (1 - m) running + m batch: an average
    # over roughly the last 1/m iterations); 0.0: keep the layers' own (0.1 in torch and
    # detectron2). Training itself does not depend on it, only the EMA statistics do.
    _set_default(cfg.BN, "MOMENTUM", 0.0)

    # ---- RetinaNet head shared across FPN levels
    # Training statistics: "per_level" (each level its own), "shared" (all levels jointly),
    # "naive" (detectron2's shared BN: per-level batch statistics, one EMA).
    _set_default(cfg.MODEL.RETINANET, "NORM_STATS", "per_level")
    # Population statistics: "" (same as NORM_STATS), "per_level" or "shared".
    _set_default(cfg.MODEL.RETINANET, "POPULATION_STATS", "")
    # With per-level statistics: one affine (gamma, beta) shared by all levels, or one each.
    _set_default(cfg.MODEL.RETINANET, "NORM_SHARE_AFFINE", True)

    # ---- information leakage in R-CNN heads with BN
    # "none": per-worker BN; "syncbn": statistics over all workers; "shuffle": RoI features
    # shuffled across workers before the head and restored after it.
    _set_default(cfg.MODEL.ROI_BOX_HEAD, "LEAKAGE_MITIGATION", "none")
    _set_default(cfg.MODEL.ROI_MASK_HEAD, "LEAKAGE_MITIGATION", "none")


def validate_batchnorm_config(cfg: CN, world_size: int = 1) -> None:
    """
    Raises ``ValueError`` naming the first bad key of ``cfg``, its value and what is allowed.

    Args:
        cfg: a config extended by :func:`add_batchnorm_config`.
        world_size: the number of training processes, for keys that must divide it.
    """
    if "BN" not in cfg:
        raise ValueError("the config lacks d2_batchnorm's keys: call add_batchnorm_config(cfg)")
    _check_schedule(cfg, world_size)
    pbn = cfg.TEST.PRECISE_BN
    check_int("TEST.PRECISE_BN.NUM_ITER", pbn.NUM_ITER, 1)
    check_int("TEST.PRECISE_BN.NUM_SAMPLES", pbn.NUM_SAMPLES, 0)
    check_int("TEST.PRECISE_BN.PERIOD", pbn.PERIOD, 0)
    check_int("TEST.PRECISE_BN.IMS_PER_BATCH", pbn.IMS_PER_BATCH, 0)
    check_bool("TEST.PRECISE_BN.EVAL_EMA", pbn.EVAL_EMA)
    if not isinstance(pbn.DATASETS, (list, tuple)):
        raise ValueError(
            f"TEST.PRECISE_BN.DATASETS = {pbn.DATASETS!r} is not allowed; "
            "it must be a list of registered dataset names"
        )
    check_choice("TEST.BN_STATS", cfg.TEST.BN_STATS, TEST_BN_STATS)
    check_int("TEST.IMS_PER_BATCH", cfg.TEST.IMS_PER_BATCH, 1)

    check_int("BN.FROZEN_LAST_ITERS", cfg.BN.FROZEN_LAST_ITERS, 0)
    if cfg.BN.FROZEN_LAST_ITERS > cfg.SOLVER.MAX_ITER:
        raise ValueError(
            f"BN.FROZEN_LAST_ITERS = {cfg.BN.FROZEN_LAST_ITERS} is not allowed; it must be "
            f"<= SOLVER.MAX_ITER ({cfg.SOLVER.MAX_ITER})"
        )
    check_sync_group_size(cfg.BN.SYNC_GROUP_SIZE, world_size, name="BN.SYNC_GROUP_SIZE")
    check_int("BN.GHOST_BATCH_SIZE", cfg.BN.GHOST_BATCH_SIZE, 0)
    check_float("BN.MOMENTUM", cfg.BN.MOMENTUM, 0.0, 1.0)

    BNRetinaNetHead.check_config(cfg)  # NORM_STATS, POPULATION_STATS
    check_bool("MODEL.RETINANET.NORM_SHARE_AFFINE", cfg.MODEL.RETINANET.NORM_SHARE_AFFINE)
    _check_norms(cfg, world_size)
    for node, registry in (("ROI_BOX_HEAD", ROI_BOX_HEAD_REGISTRY), ("ROI_MASK_HEAD", ROI_MASK_HEAD_REGISTRY)):
        head = cfg.MODEL[node]
        leakage_args_from_config(cfg, node)  # LEAKAGE_MITIGATION with NORM
        # registered heads declare the mitigations they implement
        heads = [name for name, cls in registry
                 if head.LEAKAGE_MITIGATION in getattr(cls, "LEAKAGE_MITIGATIONS", ())]
        if head.LEAKAGE_MITIGATION != "none" and head.NAME not in heads:
            raise ValueError(
                f"MODEL.{node}.LEAKAGE_MITIGATION = {head.LEAKAGE_MITIGATION!r} needs a head that "
                f"implements it: MODEL.{node}.NAME = {head.NAME!r} is not allowed; allowed values: {heads}"
            )


def _check_schedule(cfg: CN, world_size: int) -> None:
    """detectron2's solver keys that the workers would otherwise fail on."""
    check_int("SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER, 1)
    check_int("SOLVER.CHECKPOINT_PERIOD", cfg.SOLVER.CHECKPOINT_PERIOD, 1)
    check_int("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD, 0)
    images_per_worker(cfg, world_size)


def images_per_worker(cfg: CN, world_size: int) -> int:
    """
    Training images per worker: ``SOLVER.IMS_PER_BATCH`` (the total batch) split evenly over
    ``world_size`` workers, after detectron2 scales it to ``world_size /
    SOLVER.REFERENCE_WORLD_SIZE`` of itself when that key is > 0 (``auto_scale_workers``).
    Raises ``ValueError`` naming the key when the batch cannot be split evenly.
    """
    batch, reference = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE
    check_int("SOLVER.IMS_PER_BATCH", batch, 1)
    check_int("SOLVER.REFERENCE_WORLD_SIZE", reference, 0)
    workers = reference or world_size
    if batch % workers != 0:
        lower = batch // workers * workers
        nearest = " or ".join(str(v) for v in (lower, lower + workers) if v > 0)
        what = (f"SOLVER.REFERENCE_WORLD_SIZE = {reference} (detectron2 scales the batch by "
                f"workers / REFERENCE_WORLD_SIZE)" if reference else f"{world_size} workers")
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH = {batch} is not allowed with {what}: it is the total batch, "
            f"split evenly over the workers; allowed values: multiples of {workers} "
            f"(e.g. {nearest})"
        )
    return batch // workers


def _check_norms(cfg: CN, world_size: int) -> None:
    """Norm names and GhostBN's batch divisor."""
    for node in NORM_KEYS:
        check_choice(f"MODEL.{node}.NORM", cfg.MODEL[node].NORM, NORM_NAMES)
    ghost = [f"MODEL.{n}.NORM" for n in IMAGE_BATCH_NORM_KEYS if cfg.MODEL[n].NORM == "GhostBN"]
    size = cfg.BN.GHOST_BATCH_SIZE
    if ghost and size > 0:
        per_worker = images_per_worker(cfg, world_size)
        if per_worker % size != 0:
            raise ValueError(
                f"BN.GHOST_BATCH_SIZE = {size} is not allowed with {ghost[0]} = 'GhostBN': it "
                f"must divide the images per worker ({per_worker}: SOLVER.IMS_PER_BATCH = "
                f"{cfg.SOLVER.IMS_PER_BATCH} over the workers); use 0 (whole batch) or a divisor"
            )
