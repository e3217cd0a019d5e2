"""Config set-up shared by tools/train_net.py and the other tools."""
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_batchnorm_config, validate_batchnorm_config

__all__ = ["get_bn_cfg", "load_config", "resolve_device", "setup"]

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


def resolve_device(cfg):
    """
    ``cfg`` itself when ``MODEL.DEVICE`` can be used here; on a machine without CUDA, a
    copy whose ``MODEL.DEVICE`` is "cpu" instead of a CUDA device (logged), so a config
    written for GPUs runs as is. The one place where the device is chosen:
    :func:`load_config` and :class:`~d2_batchnorm.engine.BNTrainer` both call it.
    """
    if torch.cuda.is_available() or not str(cfg.MODEL.DEVICE).startswith("cuda"):
        return cfg
    logger.info("MODEL.DEVICE = %r but CUDA is not available: using 'cpu'", cfg.MODEL.DEVICE)
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    if frozen:
        cfg.freeze()
    return cfg


def setup(args):
    """
    ``load_config`` from detectron2's command-line ``args`` plus ``default_setup``, and a
    logger for d2_batchnorm's own messages (to the console and OUTPUT_DIR/log.txt).
    """
    cfg = load_config(args.config_file, args.opts, comm.get_world_size())
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_batchnorm")
    return cfg
