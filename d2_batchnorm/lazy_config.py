"""
d2_batchnorm for detectron2's LazyConfig (Python configs): the counterpart of
:mod:`d2_batchnorm.config` for configs that ``instantiate`` their objects.

A LazyConfig builds our modules with keyword arguments (``L(BNRetinaNetHead)(norm="SyncBN",
norm_stats="shared")``), the same classes and checks the yacs path uses. What yacs keeps
under ``TEST.PRECISE_BN``, ``TEST.BN_STATS`` and ``BN.FROZEN_LAST_ITERS`` lives in the
config's ``train`` section, at the paths :data:`d2_batchnorm.config.SETTINGS` names;
:func:`add_batchnorm_train_config` adds their defaults and :func:`validate_lazy_config`
checks values before any model, loader or process group is built.
"""
import inspect
from typing import Any, Dict

from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from .checks import check_bool, check_choice, check_int
from .config import SETTINGS, check_amp_device, check_frozen_last_iters, split_batch
from .distributed import check_sync_group_size
from .layers import D2BN_NORM_NAMES, LEVEL_STATS, NORM_NAMES, LevelBatchNorm
from .modeling.retinanet import BNRetinaNetHead
from .modeling.roi_heads import check_leakage_mitigation

__all__ = ["add_batchnorm_train_config", "validate_lazy_config", "lazy_setting", "lazy_name", "DETECTRON2_NORM_NAMES"]

#: the norm names detectron2's own modules resolve (its ``get_norm``); models built from a
#: LazyConfig get d2_batchnorm's SyncBatchNorm for "SyncBN" / "nnSyncBN" (converted after
#: building), and other norms of ours as callables (e.g. ``lambda c: GhostBatchNorm(c, 2)``)
DETECTRON2_NORM_NAMES = tuple(n for n in NORM_NAMES if n not in D2BN_NORM_NAMES)

_MISSING = object()
_PATHS = {key: path for key, path, _, _ in SETTINGS}


def lazy_name(key: str) -> str:
    """Where a LazyConfig holds the setting of yacs key ``key`` (:data:`~d2_batchnorm.config.SETTINGS`)."""
    if key not in _PATHS:
        raise ValueError(f"{key} has no LazyConfig name; allowed yacs keys: {sorted(_PATHS)}, "
                         "or give key=value overrides")
    return _PATHS[key]


def lazy_setting(cfg: DictConfig, key: str):
    """The value of the setting of yacs key ``key`` in the LazyConfig ``cfg``."""
    value = OmegaConf.select(cfg, lazy_name(key), default=_MISSING)
    if value is _MISSING:
        raise ValueError(f"{lazy_name(key)} is missing: call add_batchnorm_train_config(cfg.train)")
    return value


def add_batchnorm_train_config(train: DictConfig) -> DictConfig:
    """
    Adds d2_batchnorm's settings to a LazyConfig's ``train`` section (detectron2's
    ``configs/common/train.py``), in place, with their defaults; a value already there is
    kept. Returns ``train``. Refuses a key under ``train.precise_bn`` that is not a setting
    (a typo would otherwise be ignored).
    """
    ours = {path.split(".", 1)[1]: default for _, path, default, _ in SETTINGS
            if path.startswith("train.") and default is not None}
    for path, default in ours.items():
        if OmegaConf.select(train, path, default=_MISSING) is _MISSING:
            OmegaConf.update(train, path, default, merge=True)
    known = {p.split(".", 1)[1] for p in ours if p.startswith("precise_bn.")}
    unknown = sorted(set(train.precise_bn) - known)
    if unknown:
        raise ValueError(
            f"train.precise_bn.{unknown[0]} is not a setting; allowed keys: {sorted(known)}"
        )
    return train


def validate_lazy_config(cfg: DictConfig, world_size: int = 1) -> None:
    """
    Raises ``ValueError`` naming the config path of the first bad value of ``cfg`` (a
    LazyConfig whose ``train`` went through :func:`add_batchnorm_train_config`): the
    training settings, the training batch split over ``world_size`` workers, and the
    arguments of every object ``cfg.model`` instantiates — norm names, the sync-group size,
    RetinaNet/FCOS head statistics, leakage mitigations — with the checks their classes use.
    """
    for key, path, _, check in SETTINGS:
        if check is not None:
            check(path, lazy_setting(cfg, key))
    split_batch(cfg.dataloader.train.total_batch_size, world_size, 0,
                ("dataloader.train.total_batch_size", "reference_world_size"))
    check_frozen_last_iters(lazy_setting(cfg, "BN.FROZEN_LAST_ITERS"), lazy_setting(cfg, "SOLVER.MAX_ITER"),
                            (lazy_name("BN.FROZEN_LAST_ITERS"), lazy_name("SOLVER.MAX_ITER")))
    check_amp_device(lazy_setting(cfg, "SOLVER.AMP.ENABLED"), lazy_setting(cfg, "MODEL.DEVICE"),
                     (lazy_name("SOLVER.AMP.ENABLED"), lazy_name("MODEL.DEVICE")))
    _check_node(cfg.model, "model", world_size)


# ---------------------------------------------------------------------------------------
# the model: every node with a _target_ is checked with the checks of what it builds

def _check_node(node, path: str, world_size: int) -> None:
    if isinstance(node, (DictConfig, dict)):
        target = node.get("_target_")
        if target is not None:  # a class or function, or its dotted name
            _check_call(locate(target) if isinstance(target, str) else target, node, path, world_size)
        for key in node:
            if key != "_target_":
                _check_node(node[key], f"{path}.{key}", world_size)
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, item in enumerate(node):
            _check_node(item, f"{path}.{i}", world_size)


def _arguments(target, node) -> Dict[str, Any]:
    """
    The keyword arguments ``target`` will be called with: its defaults — a class's and,
    for ``**kwargs`` passed on, its base classes' ``__init__`` —, then the node's.
    """
    functions = [target]
    if isinstance(target, type):
        functions = [c.__init__ for c in reversed(target.__mro__) if "__init__" in vars(c)]
    args = {}
    for function in functions:
        try:
            params = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            continue
        args.update({p.name: p.default for p in params if p.default is not inspect.Parameter.empty})
    args.update({k: node[k] for k in node if k != "_target_"})
    return args


def _check_call(target, node, path: str, world_size: int) -> None:
    args = _arguments(target, node)

    def name(arg: str) -> str:
        return f"{path}.{arg}"

    ours = getattr(target, "__module__", "").startswith("d2_batchnorm.")
    for arg in ("norm", "conv_norm"):
        if isinstance(args.get(arg), str):
            check_choice(name(arg), args[arg], NORM_NAMES if ours else DETECTRON2_NORM_NAMES)
    if args.get("sync_group_size") is not None:
        check_sync_group_size(args["sync_group_size"], world_size, name=name("sync_group_size"))
    if "ghost_batch_size" in args:
        check_int(name("ghost_batch_size"), args["ghost_batch_size"], 0)
    if not isinstance(target, type):
        return
    if issubclass(target, BNRetinaNetHead):
        target.check_stats(args["norm_stats"], args["population_stats"], (name("norm_stats"), name("population_stats")))
        check_bool(name("share_affine"), args["share_affine"])
    if issubclass(target, LevelBatchNorm):
        check_choice(name("stats"), args["stats"], LEVEL_STATS)
        if args["population_stats"]:
            check_choice(name("population_stats"), args["population_stats"], LEVEL_STATS)
    if hasattr(target, "LEAKAGE_MITIGATIONS"):  # the R-CNN heads with leakage mitigation
        check_leakage_mitigation(args["leakage_mitigation"], args["conv_norm"],
                                 (name("leakage_mitigation"), name("conv_norm")))
