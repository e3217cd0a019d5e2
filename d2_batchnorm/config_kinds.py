"""
One adapter per kind of config: a yacs ``CfgNode`` (:class:`YacsConfig`) and a LazyConfig,
detectron2's Python configs (:class:`LazyConfig`). Nothing else asks which kind a config is:

    kind = adapt(cfg)                      # or config_kind(path).load(path, opts, world_size)
    kind.get("TEST.PRECISE_BN.NUM_ITER")   # a setting, named by its yacs key
    kind.name("TEST.PRECISE_BN.NUM_ITER")  # how errors and fixes call it: the key, or
                                           # "train.precise_bn.num_iter"
    kind.fix(("MODEL.RETINANET.NORM", "SyncBN"))   # the config line that sets it

Where a LazyConfig holds what a yacs key configures is :data:`d2_batchnorm.config.SETTINGS`,
the one table of settings (with their LazyConfig defaults and checks).
"""
import copy
import logging
import os
from typing import Dict, List, Tuple

import torch
from detectron2.config import LazyConfig as D2LazyConfig
from detectron2.config import get_cfg, instantiate
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from omegaconf import DictConfig, OmegaConf

from .config import add_batchnorm_config, config_value, images_per_worker, split_batch, validate_batchnorm_config
from .lazy_config import add_batchnorm_train_config, lazy_name, lazy_setting, validate_lazy_config

__all__ = ["ConfigKind", "YacsConfig", "LazyConfig", "adapt", "config_kind", "describe_dump", "get_bn_cfg"]

logger = logging.getLogger(__name__)

#: yacs names of d2_batchnorm's classes -> their LazyConfig ``_target_`` (for fix lines)
LAZY_TARGETS = {
    "BNConvFCHead": "d2_batchnorm.modeling.BNConvFCHead",
    "BNMaskRCNNConvUpsampleHead": "d2_batchnorm.modeling.BNMaskRCNNConvUpsampleHead",
    "BNRetinaNet": "d2_batchnorm.modeling.BNRetinaNetHead",
    "BNFCOS": "d2_batchnorm.modeling.BNFCOSHead",
}
#: what a LazyConfig for ``d2bn lazy-train`` defines (detectron2's convention)
LAZY_CONFIG_PARTS = ("model", "dataloader", "optimizer", "lr_multiplier", "train")


def get_bn_cfg():
    """detectron2's default config extended with d2_batchnorm's keys."""
    return add_batchnorm_config(get_cfg())


class ConfigKind:
    """
    What d2_batchnorm reads and writes in a config, whatever its kind; a subclass wraps
    ``cfg`` for ``world_size`` workers and says where each setting lives:

    ==============================  =========================================================
    ``read(file)``, ``load(file,    the config as written; validated with command-line
    opts, world_size)``             options, device resolved (``ValueError`` naming the key)
    ``get(key)``, ``set(key, v)``   a setting, named by its yacs key (``config.SETTINGS``)
    ``name(key)``, ``fix(*pairs)``  how errors and fix lines call it: ``KEY VALUE`` or
                                    ``path=value``
    ``opts(key, v)``, ``given(key,  the command-line options that set it; whether ``opts``
    opts)``, ``command_opts(pairs,  set it; the options of this kind from yacs pairs and
    overrides)``                    LazyConfig overrides
    ``copy()``                      an adapter of a modifiable copy
    ``train_datasets()``,           dataset names; whether there is an evaluator
    ``test_datasets()``,
    ``has_test_set()``
    ``images_per_worker(w)``,       the training batch per worker (``ValueError`` when it
    ``test_images_per_worker()``    does not split evenly); the inference batch
    ``train_loader(datasets, ims,   the training stream with 0 loader workers (PreciseBN's);
    w)``, ``test_loader()``,        the test loader; (image format, augmentations) of a
    ``test_transform()``            test image file
    ``lr_steps()``, ``_edges()``    LR milestones; (largest short edge, long edge) of training
    ``describe_norm(node)``         how a report names what configures ``MODEL.<node>.NORM``
    ==============================  =========================================================
    """

    #: the kind's training command (``d2bn <kind>``)
    kind: str = ""
    #: the file suffixes of this kind of config
    suffixes: Tuple[str, ...] = ()

    def __init__(self, cfg, world_size: int = 1):
        self.cfg, self.world_size = cfg, world_size

    def dataset_names(self) -> List[str]:
        """The datasets the config reads: training, test and PreciseBN's."""
        return self.train_datasets() + self.test_datasets() + list(self.get("TEST.PRECISE_BN.DATASETS"))

    def input_size(self) -> Tuple[int, int]:
        """(H, W) of a typical training image: the largest short edge, 4:3, capped by the long edge."""
        short, longest = self._edges()
        return short, min(round(short * 4 / 3), longest)

    def resolve_device(self) -> "ConfigKind":
        """
        This adapter when the config's device can be used here; on a machine without CUDA,
        one whose device is "cpu" instead of a CUDA device (logged), so a config written
        for GPUs runs as is.
        """
        device = self.get("MODEL.DEVICE")
        if torch.cuda.is_available() or not str(device).startswith("cuda"):
            return self
        logger.info("%s = %r but CUDA is not available: using 'cpu'", self.name("MODEL.DEVICE"), device)
        return self._with_device("cpu")  # a copy of a yacs config; a LazyConfig changed in place


class YacsConfig(ConfigKind):
    """A yacs ``CfgNode`` extended by :func:`~d2_batchnorm.config.add_batchnorm_config`."""

    kind = "train"
    suffixes = (".yaml", ".yml")

    @staticmethod
    def load(config_file: str, opts=(), world_size: int = 1):
        """
        Reads ``config_file`` and ``opts`` (``KEY VALUE`` pairs) into a frozen config, and
        validates it for ``world_size`` workers. Without CUDA, ``MODEL.DEVICE`` becomes "cpu".

        Raises:
            ValueError: a missing config file, an unknown key, or a bad value — the message
            names it.
        """
        cfg = get_bn_cfg()
        if config_file:
            _check_file(config_file)
            try:
                cfg = YacsConfig.read(config_file)
            except KeyError as e:
                raise ValueError(f"{config_file}: {e.args[0] if e.args else e}") from None
        if len(opts) % 2:
            raise ValueError(f"command-line opts must be KEY VALUE pairs; got {list(opts)}")
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise ValueError(f"command-line opts: {e.args[0] if e.args else e}") from None
        cfg = YacsConfig(cfg).resolve_device().cfg
        validate_batchnorm_config(cfg, world_size)
        cfg.freeze()
        return cfg

    @staticmethod
    def read(config_file):
        cfg = get_bn_cfg()
        cfg.merge_from_file(config_file)
        return cfg

    def get(self, key):
        return config_value(self.cfg, key)

    def _with_device(self, device):
        changed = self.copy()
        changed.cfg.MODEL.DEVICE = device
        if self.cfg.is_frozen():
            changed.cfg.freeze()
        return changed

    def set(self, key, value):
        *parents, last = key.split(".")
        node = self.cfg
        for part in parents:
            node = node[part]
        node[last] = value

    @classmethod
    def name(cls, key):
        return key

    @classmethod
    def fix(cls, *pairs):
        return " ".join(f"{k} {v if v != '' else repr('')}" for k, v in pairs)

    @classmethod
    def opts(cls, key, value):
        return [key, str(value)]

    @classmethod
    def given(cls, key, opts):
        return key in opts[::2]

    @classmethod
    def command_opts(cls, pairs, overrides):
        return list(pairs)  # overrides are for LazyConfigs

    def copy(self):
        cfg = self.cfg.clone()
        cfg.defrost()
        return YacsConfig(cfg, self.world_size)

    def train_datasets(self):
        return list(self.cfg.DATASETS.TRAIN)

    def test_datasets(self):
        return list(self.cfg.DATASETS.TEST)

    def has_test_set(self):
        return len(self.cfg.DATASETS.TEST) > 0

    def images_per_worker(self, world_size=0):
        return images_per_worker(self.cfg, world_size or self.world_size)

    def test_images_per_worker(self):
        return self.cfg.TEST.IMS_PER_BATCH

    def train_loader(self, datasets, ims_per_batch, world_size):
        cfg = self.copy().cfg
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.DATASETS.TRAIN = tuple(datasets)
        cfg.SOLVER.IMS_PER_BATCH = ims_per_batch * world_size
        cfg.SOLVER.REFERENCE_WORLD_SIZE = 0
        return build_detection_train_loader(cfg)

    def test_loader(self):
        return build_detection_test_loader(self.cfg, self.cfg.DATASETS.TEST[0])

    def test_transform(self):
        size = self.cfg.INPUT.MIN_SIZE_TEST
        return self.cfg.INPUT.FORMAT, [T.ResizeShortestEdge([size, size], self.cfg.INPUT.MAX_SIZE_TEST)]

    def _edges(self):
        return max(self.cfg.INPUT.MIN_SIZE_TRAIN), self.cfg.INPUT.MAX_SIZE_TRAIN

    def lr_steps(self):
        return list(self.cfg.SOLVER.STEPS)

    def describe_norm(self, node):
        return f"`MODEL.{node}.NORM` = {self.cfg.MODEL[node].NORM!r}"


class LazyConfig(ConfigKind):
    """
    A LazyConfig (an omegaconf ``DictConfig``) whose ``train`` went through
    :func:`~d2_batchnorm.lazy_config.add_batchnorm_train_config`.
    """

    kind = "lazy-train"
    suffixes = (".py",)

    @staticmethod
    def load(config_file: str, overrides=(), world_size: int = 1):
        """
        :meth:`YacsConfig.load` for a LazyConfig: reads ``config_file``, applies
        ``overrides`` (``key=value``), adds d2_batchnorm's settings to ``train``, picks the
        device and validates for ``world_size`` workers.

        Raises:
            ValueError: a missing file, a config that fails to load or lacks one of
            :data:`LAZY_CONFIG_PARTS`, a bad override or a bad value — the message names it.
        """
        _check_file(config_file)
        try:
            cfg = LazyConfig.read(config_file)
        except Exception as e:  # the config is Python: any error is the config's
            raise ValueError(f"{config_file}: {type(e).__name__}: {e}") from None
        missing = [part for part in LAZY_CONFIG_PARTS if part not in cfg]
        if missing:
            raise ValueError(f"{config_file} does not define {missing}; it must define {list(LAZY_CONFIG_PARTS)}")
        try:
            cfg = D2LazyConfig.apply_overrides(cfg, list(overrides))
        except Exception as e:
            raise ValueError(f"command-line overrides: {type(e).__name__}: {e}") from None
        add_batchnorm_train_config(cfg.train)
        LazyConfig(cfg).resolve_device()
        validate_lazy_config(cfg, world_size)
        return cfg

    @staticmethod
    def read(config_file):
        return D2LazyConfig.load(config_file)

    def get(self, key):
        return lazy_setting(self.cfg, key)

    def set(self, key, value):
        OmegaConf.update(self.cfg, self.name(key), value, merge=False)

    def _with_device(self, device):
        self.set("MODEL.DEVICE", device)
        return self

    @classmethod
    def name(cls, key):
        return lazy_name(key)

    @classmethod
    def fix(cls, *pairs):
        return " ".join(f"{cls.name(k)}={LAZY_TARGETS.get(v, v) if v != '' else repr('')}" for k, v in pairs)

    @classmethod
    def opts(cls, key, value):
        return [f"{cls.name(key)}={value}"]

    @classmethod
    def given(cls, key, opts):
        return any(o.startswith(f"{cls.name(key)}=") for o in opts)

    @classmethod
    def command_opts(cls, pairs, overrides):
        return list(overrides) + [o for k, v in zip(pairs[::2], pairs[1::2]) for o in cls.opts(k, v)]

    def copy(self):
        return LazyConfig(copy.deepcopy(self.cfg), self.world_size)

    def train_datasets(self):
        return _names(OmegaConf.select(self.cfg, "dataloader.train.dataset.names", default=None))

    def test_datasets(self):
        return _names(OmegaConf.select(self.cfg, "dataloader.test.dataset.names", default=None))

    def has_test_set(self):
        return "evaluator" in self.cfg.dataloader

    def images_per_worker(self, world_size=0):
        return split_batch(self.cfg.dataloader.train.total_batch_size, world_size or self.world_size, 0,
                           ("dataloader.train.total_batch_size", "reference_world_size"))

    def test_images_per_worker(self):
        return self.cfg.dataloader.test.batch_size

    def train_loader(self, datasets, ims_per_batch, world_size):
        loader = copy.deepcopy(self.cfg.dataloader.train)
        loader.num_workers = 0
        loader.dataset.names = list(datasets)
        loader.total_batch_size = ims_per_batch * world_size
        return instantiate(loader)

    def test_loader(self):
        return instantiate(self.cfg.dataloader.test)

    def test_transform(self):
        mapper = self.cfg.dataloader.test.mapper
        return mapper.image_format, list(instantiate(mapper.augmentations))

    def _edges(self):
        short, longest = 800, 1333  # detectron2's defaults, if no ResizeShortestEdge is found
        for aug in self.cfg.dataloader.train.mapper.get("augmentations", []):
            if "short_edge_length" in aug:
                edge = aug.short_edge_length
                short = edge if isinstance(edge, int) else max(edge)
                longest = aug.get("max_size", longest)
        return short, longest

    def lr_steps(self):
        return list(OmegaConf.select(self.cfg, "lr_multiplier.scheduler.milestones", default=[]) or [])

    def describe_norm(self, node):
        return f"`{self.name(f'MODEL.{node}.NORM')}`"


def adapt(cfg, world_size: int = 1) -> ConfigKind:
    """
    The adapter of ``cfg`` — a LazyConfig (omegaconf ``DictConfig``) or a yacs ``CfgNode`` —
    for ``world_size`` workers.
    """
    if isinstance(cfg, ConfigKind):
        return cfg
    return (LazyConfig if isinstance(cfg, DictConfig) else YacsConfig)(cfg, world_size)


def config_kind(config_file: str) -> type:
    """The adapter class of a config file: :class:`LazyConfig` for ``.py``, else :class:`YacsConfig`."""
    return LazyConfig if config_file.endswith(LazyConfig.suffixes) else YacsConfig


def describe_dump(cfg: Dict) -> Dict:
    """
    What a comparison reports of a run, from the ``config.yaml`` either training command
    writes (a plain mapping: a LazyConfig's has lowercase sections): its architecture, the
    box head's norm and leakage mitigations, the inference statistics and whether
    PreciseBN ran.
    """
    lazy = "model" in cfg

    def get(key, default=None):
        return _select(cfg, lazy_name(key) if lazy else key, default)

    if lazy:
        mask_on = isinstance(_select(cfg, "model.roi_heads.mask_head"), dict)
        arch = str(_select(cfg, "model._target_", "")).rsplit(".", 1)[-1]
    else:
        mask_on, arch = get("MODEL.MASK_ON"), get("MODEL.META_ARCHITECTURE", "GeneralizedRCNN")
    return {
        "arch": arch,
        "norm": get("MODEL.ROI_BOX_HEAD.NORM", ""),
        "mitigation": get("MODEL.ROI_BOX_HEAD.LEAKAGE_MITIGATION", "none"),
        "mask_mitigation": get("MODEL.ROI_MASK_HEAD.LEAKAGE_MITIGATION", "none") if mask_on else None,
        "bn_stats": get("TEST.BN_STATS"),
        "test_batch": get("TEST.IMS_PER_BATCH", 1),
        "precise_bn": get("TEST.PRECISE_BN.ENABLED"),
    }


def _select(mapping: Dict, path: str, default=None):
    """The value at dotted ``path`` of nested mappings, or ``default``."""
    for part in path.split("."):
        mapping = mapping.get(part) if isinstance(mapping, dict) else None
        if mapping is None:
            return default
    return mapping


def _check_file(config_file: str) -> None:
    if not os.path.isfile(config_file):
        raise ValueError(f"--config-file {config_file!r} does not exist")


def _names(node) -> List[str]:
    """A LazyConfig's dataset ``names``: one name, a list of names, or none."""
    if node is None:
        return []
    return [node] if isinstance(node, str) else list(node)

