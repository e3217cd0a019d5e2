"""Config set-up shared by tools/train_net.py, tools/lazyconfig_train_net.py and the other tools."""
import logging
import os
import zipfile

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config_kinds import LazyConfig, YacsConfig, adapt, config_kind, get_bn_cfg

__all__ = ["get_bn_cfg", "load_config", "load_lazy_config", "load_any_config", "resolve_device", "check_checkpoint",
           "check_weights", "setup", "setup_lazy"]

logger = logging.getLogger(__name__)


#: a validated config read from a file, with its command-line options (``config_kinds``)
load_config, load_lazy_config = YacsConfig.load, LazyConfig.load


def load_any_config(config_file: str, opts=(), world_size: int = 1):
    """
    A validated config of the kind of ``config_file`` (:func:`~d2_batchnorm.config_kinds.config_kind`):
    ``opts`` are ``key=value`` overrides for a LazyConfig ``.py``, ``KEY VALUE`` pairs for a
    yacs ``.yaml``.
    """
    return config_kind(config_file).load(config_file, opts, world_size)


def resolve_device(cfg):
    """:meth:`~d2_batchnorm.config_kinds.ConfigKind.resolve_device` of ``cfg``, as a config."""
    return adapt(cfg).resolve_device().cfg


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
    kind = adapt(cfg)
    output_dir = kind.get("OUTPUT_DIR")
    last = os.path.join(output_dir, "last_checkpoint")
    if resume and os.path.isfile(last):
        with open(last) as f:
            name = f.read().strip()
        check_checkpoint(os.path.join(output_dir, name), f"the checkpoint named by {last}")
    else:
        check_checkpoint(kind.get("MODEL.WEIGHTS"), kind.name("MODEL.WEIGHTS"))


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
    setup_logger(adapt(cfg).get("OUTPUT_DIR"), distributed_rank=comm.get_rank(), name="d2_batchnorm")
    return cfg
