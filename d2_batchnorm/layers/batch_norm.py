"""
``get_norm``: detectron2's norm names plus d2_batchnorm's, resolved to modules; and the
conversions of the norms of a module tree built by detectron2 (``convert_batchnorm``,
``convert_sync_batchnorm``); ``set_ema_momentum``, the EMA momentum of all its BatchNorms.
"""
from typing import Callable, Optional, Type, Union

from detectron2.layers.batch_norm import FrozenBatchNorm2d, LayerNorm, NaiveSyncBatchNorm
from torch import nn

from .ghost_batch_norm import GhostBatchNorm
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "get_norm",
    "norm_options_from_config",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "set_ema_momentum",
    "NORM_NAMES",
    "D2BN_NORM_NAMES",
]

#: names known to d2_batchnorm but not to detectron2's ``get_norm``
D2BN_NORM_NAMES = ("GhostBN",)

#: every norm name :func:`get_norm` accepts ("" means no norm)
NORM_NAMES = (
    "",
    "BN",
    "SyncBN",
    "FrozenBN",
    "GN",
    "nnSyncBN",
    "naiveSyncBN",
    "naiveSyncBN_N",
    "LN",
) + D2BN_NORM_NAMES


def _build(name: str, channels: int, sync_group_size: int, ghost_batch_size: int) -> nn.Module:
    if name == "BN":
        return nn.BatchNorm2d(channels)
    if name == "SyncBN":
        return SyncBatchNorm(channels, sync_group_size=sync_group_size)
    if name == "GhostBN":
        return GhostBatchNorm(channels, ghost_batch_size=ghost_batch_size)
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if name == "GN":
        return nn.GroupNorm(32, channels)
    if name == "nnSyncBN":
        return nn.SyncBatchNorm(channels)
    if name == "naiveSyncBN":
        return NaiveSyncBatchNorm(channels)
    if name == "naiveSyncBN_N":
        return NaiveSyncBatchNorm(channels, stats_mode="N")
    return LayerNorm(channels)  # "LN"


def get_norm(
    norm: Union[str, Callable[[int], nn.Module], None],
    out_channels: int,
    *,
    sync_group_size: int = 0,
    ghost_batch_size: int = 0,
) -> Optional[nn.Module]:
    """
    Like :func:`detectron2.layers.get_norm`, with d2_batchnorm's layers:

    ====================  =================================================================
    ``"BN"``              ``nn.BatchNorm2d`` (per-worker statistics)
    ``"SyncBN"``          :class:`SyncBatchNorm` (count-weighted over the workers of a sync
                          group of ``sync_group_size``, 0: all; CPU/gloo and CUDA/NCCL)
    ``"GhostBN"``         :class:`GhostBatchNorm` over virtual batches of ``ghost_batch_size``
    ``"FrozenBN"``        detectron2's ``FrozenBatchNorm2d``
    ``"GN"``              ``nn.GroupNorm(32, C)``
    ``"LN"``              detectron2's channel ``LayerNorm``
    ``"nnSyncBN"``        torch's ``nn.SyncBatchNorm`` (CUDA only; models built by
                          :func:`d2_batchnorm.modeling.build_model` convert it to
                          :class:`SyncBatchNorm`)
    ``"naiveSyncBN"``     detectron2's ``NaiveSyncBatchNorm`` (workers weighted equally)
    ``"naiveSyncBN_N"``   detectron2's ``NaiveSyncBatchNorm(stats_mode="N")``
    ``""`` / None         no norm (returns None)
    ====================  =================================================================

    Args:
        norm: a name above, or a callable ``channels -> nn.Module``.
        out_channels: C, the number of channels.
        sync_group_size: for "SyncBN" (``BN.SYNC_GROUP_SIZE``).
        ghost_batch_size: for "GhostBN" (``BN.GHOST_BATCH_SIZE``).
    Raises:
        ValueError: for an unknown name, listing the allowed ones.
    """
    if norm is None:
        return None
    if not isinstance(norm, str):
        if callable(norm):
            return norm(out_channels)
        raise ValueError(f"norm = {norm!r} is not allowed; allowed values: {list(NORM_NAMES)} or a callable")
    if norm not in NORM_NAMES:
        raise ValueError(f"norm = {norm!r} is not allowed; allowed values: {list(NORM_NAMES)}")
    if norm == "":
        return None
    return _build(norm, out_channels, sync_group_size, ghost_batch_size)


def norm_options_from_config(cfg) -> dict:
    """
    The keyword options of :func:`get_norm` from a config extended by
    ``add_batchnorm_config``: ``{"sync_group_size": BN.SYNC_GROUP_SIZE,
    "ghost_batch_size": BN.GHOST_BATCH_SIZE}``.
    """
    return {
        "sync_group_size": cfg.BN.SYNC_GROUP_SIZE,
        "ghost_batch_size": cfg.BN.GHOST_BATCH_SIZE,
    }


def convert_batchnorm(module: nn.Module, norm: str, **options) -> nn.Module:
    """
    Replaces every ``nn.BatchNorm2d`` (exactly that type) in ``module`` by
    ``get_norm(norm, C, **options)`` (a BatchNorm subclass) that takes over its state (see
    :func:`_replace_norms`). Returns the converted module (a new one if ``module`` itself
    was converted).
    """
    return _replace_norms(module, nn.BatchNorm2d, lambda m: get_norm(norm, m.num_features, **options))


def convert_sync_batchnorm(module: nn.Module, sync_group_size: int = 0) -> nn.Module:
    """
    Replaces every ``torch.nn.SyncBatchNorm`` in ``module`` (detectron2's "SyncBN" and
    "nnSyncBN", which refuse CPU input) by :class:`SyncBatchNorm` with ``sync_group_size``
    that takes over its state (see :func:`_replace_norms`). Returns the converted module (a
    new one if ``module`` itself was a ``nn.SyncBatchNorm``).
    """
    return _replace_norms(
        module, nn.SyncBatchNorm, lambda m: SyncBatchNorm(m.num_features, sync_group_size=sync_group_size)
    )


def set_ema_momentum(module: nn.Module, momentum: float) -> int:
    """
    Sets the EMA momentum ``m`` of every BatchNorm in ``module``'s tree (torch's
    ``_BatchNorm`` subclasses: ``nn.BatchNorm1d/2d/3d`` and every batch-statistics norm of
    this package and of detectron2; FrozenBN, GN and LN keep no EMA). In training, each
    forward updates the running statistics as

        running = (1 - m) * running + m * batch statistic,

    an exponential average whose weights fall to 1/e after about 1/m updates: m = 0.1
    (torch's and detectron2's default) averages over roughly the last 10 iterations, so
    the statistics lag behind the weights by a few iterations; m = 0.01, by about 100.
    Training outputs do not depend on m (training normalizes by batch statistics); only
    the population statistics used at inference do.

    Returns the number of modules set.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
            count += 1
    return count


def _replace_norms(module: nn.Module, kind: Type[nn.Module], build: Callable[[nn.Module], nn.Module]):
    """
    Replaces every module of exactly type ``kind`` in the tree of ``module`` by
    ``build(old)``, which takes over old's hyper-parameters (eps, momentum, affine,
    track_running_stats), train/eval mode, parameters and buffers. These are shared, not
    copied: the same tensors, on their device and in their dtype, so an optimizer holding
    them keeps working.
    """
    if type(module) is kind:
        new = build(module)
        for name in ("eps", "momentum", "affine", "track_running_stats"):
            setattr(new, name, getattr(module, name))
        for name in list(new._parameters):
            new.register_parameter(name, getattr(module, name, None))
        for name in list(new._buffers):
            new.register_buffer(name, getattr(module, name, None))
        return new.train(module.training)
    for name, child in module.named_children():
        converted = _replace_norms(child, kind, build)
        if converted is not child:
            setattr(module, name, converted)
    return module
