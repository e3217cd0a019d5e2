"""
d2_batchnorm for detectron2's LazyConfig (Python configs): the counterpart of
:mod:`d2_batchnorm.config` for configs that ``instantiate`` their objects.

A LazyConfig builds our modules with keyword arguments (``L(BNRetinaNetHead)(norm="SyncBN",
norm_stats="shared")``), the same classes and checks the yacs path uses. What yacs keeps
under ``TEST.PRECISE_BN``, ``TEST.BN_STATS`` and ``BN.FROZEN_LAST_ITERS`` lives in the
config's ``train`` section; :data:`d2_batchnorm.config.TRAIN_SETTINGS` pairs every such
setting with its yacs key, its default and its check, once for both kinds of config:

* :func:`add_batchnorm_train_config` adds our settings with their defaults to ``train``;
* :func:`setting` / :func:`setting_name` read a setting (named by its yacs key) from a yacs
  config or a LazyConfig — the hooks are built from either through them;
* :func:`validate_lazy_config` checks values before any model, loader or process group is
  built, and raises ``ValueError`` naming the config path (``model.head.norm_stats``,
  ``train.precise_bn.num_iter``, ``dataloader.train.total_batch_size``).
"""
import copy
import inspect
from typing import Any, Dict, List

from omegaconf import DictConfig, ListConfig, OmegaConf

from .checks import check_bool, check_choice, check_int
from .config import TRAIN_SETTINGS, check_amp_device, check_frozen_last_iters, config_value, split_batch
from .distributed import check_sync_group_size
from .layers import D2BN_NORM_NAMES, LEVEL_STATS, NORM_NAMES, LevelBatchNorm
from .modeling.retinanet import BNRetinaNetHead
from .modeling.roi_heads import check_leakage_mitigation

__all__ = [
    "is_lazy_config", "setting", "setting_name", "set_setting", "copy_config", "add_batchnorm_train_config",
    "validate_lazy_config", "train_datasets", "test_datasets", "dataset_names", "DETECTRON2_NORM_NAMES",
]

#: the norm names detectron2's own modules resolve (its ``get_norm``); models built from a
#: LazyConfig get d2_batchnorm's SyncBatchNorm for "SyncBN" / "nnSyncBN" (converted after
#: building), and other norms of ours as callables (e.g. ``lambda c: GhostBatchNorm(c, 2)``)
DETECTRON2_NORM_NAMES = tuple(n for n in NORM_NAMES if n not in D2BN_NORM_NAMES)

_PATHS = {key: path for key, path, _, _ in TRAIN_SETTINGS}
_MISSING = object()


def is_lazy_config(cfg) -> bool:
    """True for a LazyConfig (an omegaconf ``DictConfig``), False for a yacs ``CfgNode``."""
    return isinstance(cfg, DictConfig)


def setting_name(cfg, key: str) -> str:
    """How errors call setting ``key`` (a yacs key of ``TRAIN_SETTINGS``) in ``cfg``."""
    return f"train.{_PATHS[key]}" if is_lazy_config(cfg) else key


def setting(cfg, key: str):
    """
    The value of the training setting ``key`` (its yacs key in ``TRAIN_SETTINGS``, e.g.
    "TEST.PRECISE_BN.NUM_ITER") in a yacs config or in a LazyConfig's ``train`` section.
    """
    if is_lazy_config(cfg):
        value = OmegaConf.select(cfg, setting_name(cfg, key), default=_MISSING)
        if value is _MISSING:
            raise ValueError(f"{setting_name(cfg, key)} is missing: call add_batchnorm_train_config(cfg.train)")
        return value
    return config_value(cfg, key)


def set_setting(cfg, key: str, value) -> None:
    """Sets ``key`` (as :func:`setting`) in ``cfg``, which must not be frozen."""
    if is_lazy_config(cfg):
        OmegaConf.update(cfg, setting_name(cfg, key), value, merge=False)
        return
    *parents, last = key.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[last] = value


def copy_config(cfg):
    """A modifiable copy of either kind of config (a yacs clone, unfrozen; a LazyConfig deep copy)."""
    if is_lazy_config(cfg):
        return copy.deepcopy(cfg)
    cfg = cfg.clone()
    cfg.defrost()
    return cfg


def add_batchnorm_train_config(train: DictConfig) -> DictConfig:
    """
    Adds d2_batchnorm's settings to a LazyConfig's ``train`` section (detectron2's
    ``configs/common/train.py``), in place, with their defaults; a value already there is
    kept. Returns ``train``. Refuses a key under ``train.precise_bn`` that is not a setting
    (a typo would otherwise be ignored).
    """
    for _, path, default, _ in TRAIN_SETTINGS:
        if default is not None and OmegaConf.select(train, path, default=_MISSING) is _MISSING:
            OmegaConf.update(train, path, default, merge=True)
    known = {p.split(".", 1)[1] for p in _PATHS.values() if p.startswith("precise_bn.")}
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
    for key, _, _, check in TRAIN_SETTINGS:
        if check is not None:
            check(setting_name(cfg, key), setting(cfg, key))
    split_batch(cfg.dataloader.train.total_batch_size, world_size, 0,
                ("dataloader.train.total_batch_size", "reference_world_size"))
    check_frozen_last_iters(setting(cfg, "BN.FROZEN_LAST_ITERS"), setting(cfg, "SOLVER.MAX_ITER"),
                            ("train.frozen_bn_last_iters", "train.max_iter"))
    check_amp_device(setting(cfg, "SOLVER.AMP.ENABLED"), setting(cfg, "MODEL.DEVICE"),
                     (setting_name(cfg, "SOLVER.AMP.ENABLED"), setting_name(cfg, "MODEL.DEVICE")))
    _check_node(cfg.model, "model", world_size)


def train_datasets(cfg) -> List[str]:
    """The training datasets of either kind of config (``DATASETS.TRAIN``; ``dataloader.train``)."""
    if is_lazy_config(cfg):
        return _names(OmegaConf.select(cfg, "dataloader.train.dataset.names", default=None))
    return list(cfg.DATASETS.TRAIN)


def test_datasets(cfg) -> List[str]:
    """The test datasets of either kind of config (``DATASETS.TEST``; ``dataloader.test``)."""
    if is_lazy_config(cfg):
        return _names(OmegaConf.select(cfg, "dataloader.test.dataset.names", default=None))
    return list(cfg.DATASETS.TEST)


def dataset_names(cfg) -> List[str]:
    """The datasets a config of either kind reads: training, test and PreciseBN's."""
    return train_datasets(cfg) + test_datasets(cfg) + list(setting(cfg, "TEST.PRECISE_BN.DATASETS"))


def _names(node) -> List[str]:
    """A LazyConfig's dataset ``names``: one name, a list of names, or none."""
    if node is None:
        return []
    return [node] if isinstance(node, str) else list(node)


# ---------------------------------------------------------------------------------------
# the model: every node with a _target_ is checked with the checks of what it builds

def _check_node(node, path: str, world_size: int) -> None:
    if isinstance(node, (DictConfig, dict)):
        target = node.get("_target_")
        if target is not None:
            _check_call(_locate(target), node, path, world_size)
        for key in node:
            if key != "_target_":
                _check_node(node[key], f"{path}.{key}", world_size)
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, item in enumerate(node):
            _check_node(item, f"{path}.{i}", world_size)


def _locate(target):
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        return locate(target)
    return target


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
