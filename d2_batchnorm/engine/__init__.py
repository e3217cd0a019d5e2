"""Training: BNTrainer, launching, config set-up, BatchNorm hooks."""
from . import hooks
from .defaults import check_checkpoint, check_weights, get_bn_cfg, load_config, resolve_device, setup
from .hooks import FrozenBNLate, PreciseBN
from .launch import check_launch_args, launch, launched_by_torchrun, run_on_local_workers
from .trainer import BNTrainer, create_ddp_model

__all__ = [k for k in globals() if not k.startswith("_")]
