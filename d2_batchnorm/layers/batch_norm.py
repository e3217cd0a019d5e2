"""
``get_norm``: detectron2's norm names plus d2_batchnorm's, resolved to modules; and the
conversions of the norms of a module tree: of one built by detectron2
(``convert_batchnorm``, ``convert_sync_batchnorm``) and of a trained model for export
(``convert_for_inference``), all through one tree walk (``_replace_norms``);
``set_ema_momentum``, the EMA momentum of all its BatchNorms.
"""
from typing import Callable, Optional, Tuple, Type, Union

from detectron2.layers.batch_norm import NaiveSyncBatchNorm
from detectron2.layers.batch_norm import get_norm as d2_get_norm
from torch import nn

from .batch_stats import row_of
from .ghost_batch_norm import GhostBatchNorm
from .level_norm import LevelBatchNorm, PerLevelNorms
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "get_norm",
    "norm_options_from_config",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "convert_for_inference",
    "INFERENCE_CONVERTED_NORMS",
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
    if norm == "SyncBN":
        return SyncBatchNorm(out_channels, sync_group_size=sync_group_size)
    if norm == "GhostBN":
        return GhostBatchNorm(out_channels, ghost_batch_size=ghost_batch_size)
    return d2_get_norm(norm, out_channels)  # every other name is detectron2's


def norm_options_from_config(cfg) -> dict:
    """The keyword options of :func:`get_norm` from a config's ``BN`` keys (its Args name them)."""
    return {
        "sync_group_size": cfg.BN.SYNC_GROUP_SIZE,
        "ghost_batch_size": cfg.BN.GHOST_BATCH_SIZE,
    }


def convert_batchnorm(module: nn.Module, norm: str, **options) -> nn.Module:
    """
    Replaces every ``nn.BatchNorm2d`` (exactly that type) in ``module`` by
    ``get_norm(norm, C, **options)`` (a BatchNorm subclass) that takes over its state (see
    :func:`_with_state_of`). Returns the converted module (a new one if ``module`` itself
    was converted).
    """
    return _replace_norms(
        module, (nn.BatchNorm2d,), lambda m: _with_state_of(m, get_norm(norm, m.num_features, **options))
    )


def convert_sync_batchnorm(module: nn.Module, sync_group_size: int = 0) -> nn.Module:
    """
    Replaces every ``torch.nn.SyncBatchNorm`` in ``module`` (detectron2's "SyncBN" and
    "nnSyncBN", which refuse CPU input) by :class:`SyncBatchNorm` with ``sync_group_size``
    that takes over its state (see :func:`_with_state_of`). Returns the converted module (a
    new one if ``module`` itself was a ``nn.SyncBatchNorm``).
    """
    return _replace_norms(
        module,
        (nn.SyncBatchNorm,),
        lambda m: _with_state_of(m, SyncBatchNorm(m.num_features, sync_group_size=sync_group_size)),
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
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = momentum
    return len(norms)


#: the norms :func:`convert_for_inference` replaces: in eval mode each of them is the
#: per-channel affine map of its running statistics, as ``nn.BatchNorm2d`` is
INFERENCE_CONVERTED_NORMS = (SyncBatchNorm, GhostBatchNorm, LevelBatchNorm, NaiveSyncBatchNorm, nn.SyncBatchNorm)


def convert_for_inference(module: nn.Module) -> nn.Module:
    """
    Replaces every norm of :data:`INFERENCE_CONVERTED_NORMS` in ``module`` by torch's
    ``nn.BatchNorm2d`` with the same eval-mode outputs, so that a model exported with
    TorchScript (scripted or traced) needs nothing from d2_batchnorm and never calls
    torch.distributed. In eval mode every one of them computes, per channel c::

        y = (x - running_mean[c]) / sqrt(running_var[c] + eps) * weight[c] + bias[c]

    ======================================  ===============================================
    ``SyncBatchNorm``, ``GhostBatchNorm``,  one ``nn.BatchNorm2d`` taking over its state
    detectron2's ``NaiveSyncBatchNorm``,    (:func:`_with_state_of`: the same parameter and
    torch's ``nn.SyncBatchNorm``            buffer tensors)
    ``LevelBatchNorm`` with shared          one ``nn.BatchNorm2d`` taking over its state,
    population statistics and affine       applied to each level in turn
    other ``LevelBatchNorm``                :class:`PerLevelNorms` of L ``nn.BatchNorm2d``,
                                            the one of level i with row i of the (L, C)
                                            statistics and affine (copies; a (C,) tensor
                                            is copied into every level)
    ======================================  ===============================================

    Every other module is kept: ``nn.BatchNorm2d``, ``FrozenBatchNorm2d``, GN, LN, and
    detectron2's ``CycleBatchNormList``, whose members are converted. Train/eval mode is
    kept. The converted norms compile with ``torch.jit.script``; a scripted or traced
    model keeps no reference to d2_batchnorm's classes. They normalize (N, C, H, W) maps,
    as a detection model's norms do; trained further, they use per-worker batch statistics.

    Returns:
        the converted module (a new one if ``module`` itself was converted).
    Raises:
        ValueError: for a norm without running statistics (``track_running_stats=False``),
            whose inference uses batch statistics that no standard module reproduces.
    """
    return _replace_norms(module, INFERENCE_CONVERTED_NORMS, _inference_norm)


def _inference_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """The standard module(s) computing ``norm``'s eval-mode output (:func:`convert_for_inference`)."""
    if norm.running_mean is None:
        raise ValueError(
            f"convert_for_inference: {type(norm).__name__}({norm.num_features}) has "
            "track_running_stats = False; it normalizes with batch statistics at inference, "
            "which no standard module reproduces; allowed: norms with running statistics"
        )
    if not isinstance(norm, LevelBatchNorm) or (norm.population_stats == "shared" and norm.share_affine):
        return _with_state_of(norm, nn.BatchNorm2d(norm.num_features))
    levels = []
    for i in range(norm.num_levels):
        level = nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum, norm.affine)
        for name in ("weight", "bias"):
            if norm.affine:
                level.register_parameter(name, nn.Parameter(row_of(getattr(norm, name), i).detach().clone()))
        for name in ("running_mean", "running_var"):
            level.register_buffer(name, row_of(getattr(norm, name), i).clone())
        level.register_buffer("num_batches_tracked", norm.num_batches_tracked.clone())
        levels.append(level)
    return PerLevelNorms(levels).train(norm.training)


def _with_state_of(old: nn.Module, new: nn.Module) -> nn.Module:
    """
    ``new``, a BatchNorm, with old's hyper-parameters (eps, momentum, affine,
    track_running_stats), train/eval mode, parameters and buffers. These are shared, not
    copied: the same tensors, on their device and in their dtype, so an optimizer holding
    them keeps working.
    """
    for name in ("eps", "momentum", "affine", "track_running_stats"):
        setattr(new, name, getattr(old, name))
    for name in list(new._parameters):
        new.register_parameter(name, getattr(old, name, None))
    for name in list(new._buffers):
        new.register_buffer(name, getattr(old, name, None))
    return new.train(old.training)


def _replace_norms(
    module: nn.Module, kinds: Tuple[Type[nn.Module], ...], build: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """
    Replaces every module whose type is exactly one of ``kinds`` in the tree of ``module``
    by ``build(old)``; the modules it replaces are not searched further. Returns ``module``,
    or ``build(module)`` if ``module`` itself is of one of ``kinds``.
    """
    if type(module) in kinds:
        return build(module)
    for name, child in module.named_children():
        converted = _replace_norms(child, kinds, build)
        if converted is not child:
            setattr(module, name, converted)
    return module
