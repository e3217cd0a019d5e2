"""Config set-up shared by tools/train_net.py, tools/lazyconfig_train_net.py and the other tools."""
import logging
import os
import zipfile

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_batchnorm_config, validate_batchnorm_config
from ..lazy_config import (
    add_batchnorm_train_config,
    is_lazy_config,
    set_setting,
    setting,
    setting_name,
    validate_lazy_config,
)

__all__ = ["get_bn_cfg", "load_config", "load_lazy_config", "resolve_device", "check_checkpoint",
           "check_weights", "setup", "setup_lazy"]

logger = logging.getLogger(__name__)


def get_bn_cfg():
    """detectron2's default config extended with d2_batchnorm's keys."""
    return add_batchnorm_config(get_cfg())


def load_config(config_file: str, opts=(), world_size: int = 1):
    """
    Reads ``config_file`` and ``opts`` (``KEY VALUE`` pairs) into a frozen config, and
    validates it for ``world_size`` workers. Without CUDA, ``MODEL.DEVICE`` becomes "cpu"
    (:func:`resolve_device`).

    Raises:
        ValueError: a missing config file, an unknown key, or a bad value — the message
        names it.
    """
    cfg = get_bn_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise ValueError(f"--config-file {config_file!r} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise ValueError(f"{config_file}: {e.args[0] if e.args else e}") from None
    if len(opts) % 2:
        raise ValueError(f"command-line opts must be KEY VALUE pairs; got {list(opts)}")
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"command-line opts: {e.args[0] if e.args else e}") from None
    cfg = resolve_device(cfg)
    validate_batchnorm_config(cfg, world_size)
    cfg.freeze()
    return cfg


def is_lazy_config_file(config_file: str) -> bool:
    """A LazyConfig (detectron2's Python config, ``.py``) rather than a yacs ``.yaml``."""
    return config_file.endswith(".py")


def load_any_config(config_file: str, opts=(), world_size: int = 1):
    """
    :func:`load_lazy_config` for a ``.py`` file (``opts``: ``key=value`` overrides),
    :func:`load_config` otherwise (``opts``: ``KEY VALUE`` pairs), for tools that take
    either kind of config.
    """
    load = load_lazy_config if is_lazy_config_file(config_file) else load_config
    return load(config_file, opts, world_size)


#: what a LazyConfig for tools/lazyconfig_train_net.py defines (detectron2's convention)
LAZY_CONFIG_PARTS = ("model", "dataloader", "optimizer", "lr_multiplier", "train")


def load_lazy_config(config_file: str, overrides=(), world_size: int = 1):
    """
    :func:`load_config` for a LazyConfig (a detectron2 Python config): reads
    ``config_file``, applies ``overrides`` (``key=value``), adds d2_batchnorm's settings to
    ``train`` (:func:`~d2_batchnorm.lazy_config.add_batchnorm_train_config`), picks the
    device (:func:`resolve_device`) and validates for ``world_size`` workers.

    Raises:
        ValueError: a missing file, a config that fails to load or lacks one of
        :data:`LAZY_CONFIG_PARTS`, a bad override or a bad value — the message names it.
    """
    from detectron2.config import LazyConfig

    if not os.path.isfile(config_file):
        raise ValueError(f"--config-file {config_file!r} does not exist")
    try:
        cfg = LazyConfig.load(config_file)
    except Exception as e:  # the config is Python: any error is the config's
        raise ValueError(f"{config_file}: {type(e).__name__}: {e}") from None
    missing = [part for part in LAZY_CONFIG_PARTS if part not in cfg]
    if missing:
        raise ValueError(f"{config_file} does not define {missing}; it must define {list(LAZY_CONFIG_PARTS)}")
    try:
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    except Exception as e:
        raise ValueError(f"command-line overrides: {type(e).__name__}: {e}") from None
    add_batchnorm_train_config(cfg.train)
    cfg = resolve_device(cfg)
    validate_lazy_config(cfg, world_size)
    return cfg


def resolve_device(cfg):
    """
    ``cfg`` itself when its device (``MODEL.DEVICE``; a LazyConfig's ``train.device``) can
    be used here; on a machine without CUDA, a config whose device is "cpu" instead of a
    CUDA device (logged), so a config written for GPUs runs as is: a copy of a yacs config,
    a LazyConfig changed in place. The one place where the device is chosen:
    :func:`load_config`, :func:`load_lazy_config` and
    :class:`~d2_batchnorm.engine.BNTrainer` call it.
    """
    device = setting(cfg, "MODEL.DEVICE")
    if torch.cuda.is_available() or not str(device).startswith("cuda"):
        return cfg
    logger.info("%s = %r but CUDA is not available: using 'cpu'", setting_name(cfg, "MODEL.DEVICE"), device)
    if is_lazy_config(cfg):
        set_setting(cfg, "MODEL.DEVICE", "cpu")
        return cfg
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    if frozen:
        cfg.freeze()
    return cfg


def check_checkpoint(path: str, what: str = "MODEL.WEIGHTS") -> None:
    """
    Raises ``ValueError`` naming ``what`` and ``path`` unless the local file ``path`` looks
    like a checkpoint detectron2 can load: a ``torch.save`` zip archive (with its
    ``data.pkl`` record) or a pickle (detectron2's ``.pkl`` weights, legacy ``torch.save``;
    a ``.pkl`` must also end with pickle's STOP opcode, i.e. not be cut short). Reads a few
    bytes, not the weights. Empty paths and URLs (``detectron2://``, ``https://``, ...)
    are left to detectron2.
    """
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise ValueError(f"{what} = {path!r} does not exist (a checkpoint file or a URL is allowed)")
    problem = ""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist()):
                problem = "a zip archive without torch's data.pkl record"
    else:
        with open(path, "rb") as f:
            head = f.read(1)
            f.seek(-1 if os.path.getsize(path) else 0, os.SEEK_END)
            tail = f.read(1)
        if head != b"\x80":  # pickle protocol >= 2
            problem = "neither a torch.save zip archive nor a pickle"
        elif path.endswith(".pkl") and tail != b".":
            problem = "a pickle cut short (no STOP opcode at its end)"
    if problem:
        raise ValueError(f"{what} = {path!r} is not a readable checkpoint: {problem}")


def check_weights(cfg, resume: bool = False) -> None:
    """
    :func:`check_checkpoint` on what ``DetectionCheckpointer.resume_or_load(cfg.MODEL.WEIGHTS,
    resume=resume)`` will load: with ``resume`` and an ``OUTPUT_DIR/last_checkpoint``, the
    checkpoint it names, otherwise ``MODEL.WEIGHTS`` (a LazyConfig: ``train.output_dir``,
    ``train.init_checkpoint``).
    """
    output_dir = setting(cfg, "OUTPUT_DIR")
    last = os.path.join(output_dir, "last_checkpoint")
    if resume and os.path.isfile(last):
        with open(last) as f:
            name = f.read().strip()
        check_checkpoint(os.path.join(output_dir, name), f"the checkpoint named by {last}")
    else:
        check_checkpoint(setting(cfg, "MODEL.WEIGHTS"), setting_name(cfg, "MODEL.WEIGHTS"))


def setup(args):
    """
    ``load_config`` from detectron2's command-line ``args`` plus ``default_setup``, and a
    logger for d2_batchnorm's own messages (to the console and OUTPUT_DIR/log.txt).
    """
    return _setup(load_config(args.config_file, args.opts, comm.get_world_size()), args)


def setup_lazy(args):
    """:func:`setup` for a LazyConfig: :func:`load_lazy_config` with ``args.opts`` as overrides."""
    return _setup(load_lazy_config(args.config_file, args.opts, comm.get_world_size()), args)


def _setup(cfg, args):
    default_setup(cfg, args)  # writes config.yaml, seeds, logs (either kind of config)
    setup_logger(setting(cfg, "OUTPUT_DIR"), distributed_rank=comm.get_rank(), name="d2_batchnorm")
    return cfg
