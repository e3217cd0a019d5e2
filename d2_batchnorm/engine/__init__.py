"""Training: BNTrainer, launching, config set-up, BatchNorm hooks."""
from . import hooks
from .defaults import get_bn_cfg, load_config, setup
from .hooks import FrozenBNLate, PreciseBN, mini_batch_statistics
from .launch import launch, launched_by_torchrun, run_on_local_workers
from .trainer import BNTrainer, create_ddp_model

__all__ = [k for k in globals() if not k.startswith("_")]
