"""Training: BNTrainer and the LazyConfig trainer, launching, config set-up, BatchNorm hooks."""
from . import hooks
from .defaults import (
    check_checkpoint,
    check_weights,
    get_bn_cfg,
    load_any_config,
    load_config,
    load_lazy_config,
    resolve_device,
    setup,
    setup_lazy,
)
from .bn_guard import NonFiniteGuard
from .bn_monitor import BNMonitor, leakage_losses
from .hooks import FrozenBNLate, PreciseBN, build_batchnorm_hooks
from .launch import check_launch_args, launch, launch_cli, launched_by_torchrun, run_on_local_workers, uses_cuda
from .lazy import build_any_model, build_lazy_model, build_lazy_trainer, lazy_test, test_any
from .trainer import BNTrainer, create_ddp_model

__all__ = [k for k in globals() if not k.startswith("_")]
