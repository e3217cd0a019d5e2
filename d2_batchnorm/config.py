"""
Config keys of d2_batchnorm and their launch-time validation.

This module holds every key with its default and the checks that involve keys (names,
ranges, cross-key rules, the world size). The allowed values of a key are defined by the
code that implements them and imported here; argument checks themselves are ``checks.check_*``.

``add_batchnorm_config(cfg)`` extends detectron2's default config in place. detectron2's
own keys keep their meaning (``TEST.PRECISE_BN.ENABLED``, ``TEST.PRECISE_BN.NUM_ITER``,
``MODEL.*.NORM``); new keys extend the node they belong to, or sit under ``BN`` for
policies that concern every BatchNorm of the model. docs/configs.md lists every key with
its default and allowed values.
"""
from collections.abc import Sequence

from detectron2.config import CfgNode as CN
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY

from .bn_modes import EMA_ACROSS_WORKERS, TEST_BN_STATS
from .checks import check_batchnorm_keys, check_bool, check_choice, check_float, check_int
from .distributed import check_sync_group_size
from .layers import NORM_NAMES
from .modeling.retinanet import BNRetinaNetHead
from .modeling.roi_heads import leakage_args_from_config

__all__ = [
    "add_batchnorm_config", "validate_batchnorm_config", "images_per_worker", "split_batch",
    "check_frozen_last_iters", "check_amp_device", "config_value", "SETTINGS",
]

# Keys naming a norm (d2_batchnorm.layers.get_norm's names), and those whose norm sees a
# batch of images (the ones GhostBN splits into BN.GHOST_BATCH_SIZE images).
NORM_KEYS = ("RESNETS", "FPN", "RETINANET", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
IMAGE_BATCH_NORM_KEYS = ("RESNETS", "FPN", "RETINANET")


def _check_dataset_list(name: str, value) -> None:
    if isinstance(value, str) or not isinstance(value, Sequence):  # a list, tuple or ListConfig
        raise ValueError(
            f"{name} = {value!r} is not allowed; it must be a list of registered dataset names"
        )


def _at_least(minimum: int):
    return lambda name, value: check_int(name, value, minimum)


#: The one table of settings, for both kinds of config: (yacs key, where a LazyConfig
#: holds it, LazyConfig default, check(name, value)). Settings in ``train.*`` with a
#: default are d2_batchnorm's, added by ``lazy_config.add_batchnorm_train_config``; a
#: default of None marks detectron2's own (its ``configs/common/train.py`` has them; it
#: lacks ``seed``, which detectron2's ``default_setup`` reads) and the model's arguments,
#: as d2_batchnorm's ``configs/common/models`` name them. yacs defaults are set by
#: ``add_batchnorm_config`` (or detectron2's ``get_cfg``). ``config_kinds`` reads and writes them.
SETTINGS = (
    ("SOLVER.MAX_ITER", "train.max_iter", None, _at_least(1)),
    ("SOLVER.CHECKPOINT_PERIOD", "train.checkpointer.period", None, _at_least(1)),
    ("TEST.EVAL_PERIOD", "train.eval_period", None, _at_least(0)),
    ("TEST.PRECISE_BN.ENABLED", "train.precise_bn.enabled", False, check_bool),
    ("TEST.PRECISE_BN.NUM_ITER", "train.precise_bn.num_iter", 200, _at_least(1)),
    ("TEST.PRECISE_BN.NUM_SAMPLES", "train.precise_bn.num_samples", 0, _at_least(0)),
    ("TEST.PRECISE_BN.PERIOD", "train.precise_bn.period", 0, _at_least(0)),
    ("TEST.PRECISE_BN.IMS_PER_BATCH", "train.precise_bn.ims_per_batch", 0, _at_least(0)),
    ("TEST.PRECISE_BN.EVAL_EMA", "train.precise_bn.eval_ema", True, check_bool),
    ("TEST.PRECISE_BN.DATASETS", "train.precise_bn.datasets", [], _check_dataset_list),
    ("TEST.PRECISE_BN.TARGET_REL_ERROR", "train.precise_bn.target_rel_error", 0.0,
     lambda name, value: check_float(name, value, 0.0, 1.0)),
    ("TEST.BN_STATS", "train.bn_stats", "population", lambda name, value: check_choice(name, value, TEST_BN_STATS)),
    ("BN.FROZEN_LAST_ITERS", "train.frozen_bn_last_iters", 0, _at_least(0)),
    ("BN.MOMENTUM", "train.bn_momentum", 0.0, lambda name, value: check_float(name, value, 0.0, 1.0)),
    ("BN.GUARD_NONFINITE", "train.bn_guard_nonfinite", True, check_bool),
    ("BN.EMA_ACROSS_WORKERS", "train.bn_ema_across_workers", "average",
     lambda name, value: check_choice(name, value, EMA_ACROSS_WORKERS)),
    ("BN.MONITOR.ENABLED", "train.bn_monitor.enabled", False, check_bool),
    ("BN.MONITOR.PERIOD", "train.bn_monitor.period", 100, _at_least(1)),
    ("SEED", "train.seed", -1, None),
    ("OUTPUT_DIR", "train.output_dir", None, None),
    ("MODEL.WEIGHTS", "train.init_checkpoint", None, None),
    ("MODEL.DEVICE", "train.device", None, None),
    ("SOLVER.AMP.ENABLED", "train.amp.enabled", None, check_bool),
    ("SOLVER.IMS_PER_BATCH", "dataloader.train.total_batch_size", None, None),
    ("TEST.IMS_PER_BATCH", "dataloader.test.batch_size", None, None),
    ("MODEL.META_ARCHITECTURE", "model.head._target_", None, None),
    ("MODEL.RESNETS.NORM", "model.backbone.bottom_up.stages.norm", None, None),
    ("MODEL.FPN.NORM", "model.backbone.norm", None, None),
    ("MODEL.RETINANET.NORM", "model.head.norm", None, None),
    ("MODEL.RETINANET.NORM_STATS", "model.head.norm_stats", None, None),
    ("MODEL.RETINANET.POPULATION_STATS", "model.head.population_stats", None, None),
    ("MODEL.ROI_BOX_HEAD.NAME", "model.roi_heads.box_head._target_", None, None),
    ("MODEL.ROI_BOX_HEAD.NORM", "model.roi_heads.box_head.conv_norm", None, None),
    ("MODEL.ROI_BOX_HEAD.LEAKAGE_MITIGATION", "model.roi_heads.box_head.leakage_mitigation", None, None),
    ("MODEL.ROI_MASK_HEAD.NAME", "model.roi_heads.mask_head._target_", None, None),
    ("MODEL.ROI_MASK_HEAD.NORM", "model.roi_heads.mask_head.conv_norm", None, None),
    ("MODEL.ROI_MASK_HEAD.LEAKAGE_MITIGATION", "model.roi_heads.mask_head.leakage_mitigation", None, None),
)


def add_batchnorm_config(cfg: CN) -> CN:
    """
    Adds d2_batchnorm's keys with their defaults to ``cfg`` (a detectron2 config from
    ``get_cfg()``), in place. Calling it twice is harmless. Returns ``cfg``.
    """
    frozen = cfg.is_frozen()
    cfg.defrost()
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
    # Adaptive PreciseBN: > 0 keeps drawing batches until every BN module's relative
    # standard error (of its population mean and standard deviation, relative to the
    # population standard deviation) is at most this, or NUM_SAMPLES (NUM_ITER) is reached.
    _set_default(pbn, "TARGET_REL_ERROR", 0.0)

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
    # A training step whose gradients are not finite (a NaN/Inf loss, AMP's skipped steps)
    # leaves every BN's running statistics as they were before that step.
    _set_default(cfg.BN, "GUARD_NONFINITE", True)
    # With several workers, the running statistics of per-worker BN differ by rank:
    # "average" replaces them by their mean over workers before every checkpoint and
    # evaluation (the model evaluated is the one saved); "per_worker" keeps each rank's own
    # (detectron2: each rank evaluates its share of the test set with its own statistics,
    # and a checkpoint holds rank 0's).
    _set_default(cfg.BN, "EMA_ACROSS_WORKERS", "average")
    # The BN monitor hook: health of every BN module group every PERIOD iterations
    # (non-finite statistics, EMA divergence across ranks, batch vs running statistics,
    # collapsing variance or gamma, the leakage / inconsistency gap), as scalars and warnings.
    if "MONITOR" not in cfg.BN:
        cfg.BN.MONITOR = CN()
    _set_default(cfg.BN.MONITOR, "ENABLED", False)
    _set_default(cfg.BN.MONITOR, "PERIOD", 100)

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
    if frozen:
        cfg.freeze()
    return cfg


def _set_default(node: CN, key: str, value) -> None:
    if key not in node:
        node[key] = value


def validate_batchnorm_config(cfg: CN, world_size: int = 1) -> None:
    """
    Raises ``ValueError`` naming the first bad key of ``cfg``, its value and what is allowed;
    called before any model, data loader or process group is built.

    Args:
        cfg: a config extended by :func:`add_batchnorm_config`.
        world_size: the number of training processes, for keys that must divide it.
    """
    check_batchnorm_keys(cfg)
    for key, _, _, check in SETTINGS:  # the schedule first: other checks use it
        if check is not None:
            check(key, config_value(cfg, key))
    images_per_worker(cfg, world_size)
    check_int("TEST.IMS_PER_BATCH", cfg.TEST.IMS_PER_BATCH, 1)
    check_frozen_last_iters(cfg.BN.FROZEN_LAST_ITERS, cfg.SOLVER.MAX_ITER)
    check_amp_device(cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE)
    check_sync_group_size(cfg.BN.SYNC_GROUP_SIZE, world_size, name="BN.SYNC_GROUP_SIZE")
    check_int("BN.GHOST_BATCH_SIZE", cfg.BN.GHOST_BATCH_SIZE, 0)

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


def config_value(cfg: CN, key: str):
    """The value of ``key`` (e.g. "TEST.PRECISE_BN.NUM_ITER") in ``cfg``."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def check_frozen_last_iters(frozen: int, max_iter: int,
                            names=("BN.FROZEN_LAST_ITERS", "SOLVER.MAX_ITER")) -> None:
    """Raises ``ValueError`` when FrozenBN would start before the first iteration."""
    if frozen > max_iter:
        raise ValueError(
            f"{names[0]} = {frozen} is not allowed; it must be <= {names[1]} ({max_iter})"
        )


def check_amp_device(amp: bool, device: str, names=("SOLVER.AMP.ENABLED", "MODEL.DEVICE")) -> None:
    """
    Raises ``ValueError`` when mixed precision is asked for on a device other than CUDA:
    detectron2's ``AMPTrainer`` runs float16 autocast with a CUDA grad scaler and asserts
    CUDA in its first step, after the workers have started.
    """
    if amp and not str(device).startswith("cuda"):
        raise ValueError(
            f"{names[0]} = True is not allowed with {names[1]} = {device!r}: detectron2's AMPTrainer "
            f"needs a CUDA device; set {names[0]} False to train on the CPU"
        )


def images_per_worker(cfg: CN, world_size: int) -> int:
    """
    Training images per worker: ``SOLVER.IMS_PER_BATCH`` (the total batch) split evenly over
    ``world_size`` workers, after detectron2 scales it to ``world_size /
    SOLVER.REFERENCE_WORLD_SIZE`` of itself when that key is > 0 (``auto_scale_workers``).
    Raises ``ValueError`` naming the key when the batch cannot be split evenly.
    """
    return split_batch(cfg.SOLVER.IMS_PER_BATCH, world_size, cfg.SOLVER.REFERENCE_WORLD_SIZE)


def split_batch(batch: int, world_size: int, reference: int = 0,
                names=("SOLVER.IMS_PER_BATCH", "SOLVER.REFERENCE_WORLD_SIZE")) -> int:
    """
    ``batch`` (a total batch) per worker of ``world_size`` (or of ``reference`` workers when
    > 0); ``ValueError`` naming ``names[0]`` (``names[1]``: the reference) when it does not
    split evenly. A LazyConfig's ``dataloader.train.total_batch_size`` is checked here too.
    """
    check_int(names[0], batch, 1)
    check_int(names[1], reference, 0)
    workers = reference or world_size
    if batch % workers != 0:
        lower = batch // workers * workers
        nearest = " or ".join(str(v) for v in (lower, lower + workers) if v > 0)
        what = (f"{names[1]} = {reference} (detectron2 scales the batch by "
                f"workers / REFERENCE_WORLD_SIZE)" if reference else f"{world_size} workers")
        raise ValueError(
            f"{names[0]} = {batch} is not allowed with {what}: it is the total batch, "
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
