"""
``SyncBatchNorm``: BatchNorm whose training statistics are those of the batch of all
workers of a sync group, weighted by each worker's count, on CPU (gloo) and CUDA (NCCL).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn

from .. import distributed as d2bn_dist
from .batch_stats import batch_norm_over_parts, update_running_stats_

__all__ = ["SyncBatchNorm", "active_sync_group", "check_sync_group_size", "convert_sync_batchnorm", "upcast"]


def check_sync_group_size(sync_group_size: int, world_size: Optional[int] = None) -> None:
    """
    Raises ``ValueError`` unless ``sync_group_size`` is 0 (all workers) or a positive
    divisor of the world size (default: the current one, 1 without torch.distributed).
    With a single worker every non-negative size is accepted: synchronized norms then
    degrade to plain BatchNorm.
    """
    world = comm.get_world_size() if world_size is None else world_size
    if (
        isinstance(sync_group_size, bool)
        or not isinstance(sync_group_size, int)
        or sync_group_size < 0
        or (world > 1 and sync_group_size > 0 and world % sync_group_size != 0)
    ):
        raise ValueError(
            f"sync_group_size (BN.SYNC_GROUP_SIZE) = {sync_group_size!r} is not allowed; it must "
            f"be 0 (all workers) or a positive divisor of the number of workers ({world})"
        )


def active_sync_group(sync_group_size: int):
    """
    The process group a synchronized norm reduces over (``None``: the whole world), or
    ``False`` when there is nothing to synchronize (no torch.distributed, one worker, or
    groups of one worker).
    """
    if not d2bn_dist.is_distributed():
        return False
    if sync_group_size == 0:  # the world, the common case: no group lookup
        return None
    group = d2bn_dist.get_sync_group(sync_group_size)
    return group if d2bn_dist.is_distributed(group) else False


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32 (their reductions are not precise enough); else ``x``."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _channel_shape(x: torch.Tensor):
    return (1, -1) + (1,) * (x.dim() - 2)


class SyncBatchNorm(nn.BatchNorm2d):
    """
    BatchNorm over the union of the batches of the workers of a sync group.

    Training statistics (per channel c, over the samples of all workers r of the group,
    with n_r values per channel on worker r, n_r = 0 allowed)::

        n = sum_r n_r,   mean = sum_r S_r / n,   var = sum_r Q_r / n - mean^2   (biased)
        y = (x - mean) / sqrt(var + eps) * weight + bias

    The power sums ``[n_r, S_r, Q_r]`` come from shifted float32 sums turned into
    float64 and are summed with ONE all-reduce of 2C + 1 float64 values; the backward
    pass all-reduces ``[sum dy, sum dy (x - mean)]`` once
    (:func:`.batch_stats.batch_norm_over_parts`), so the
    input and weight gradients are those of BatchNorm over the concatenated batch (the
    weight/bias gradient of each worker is its share; their sum, as DDP forms it, is the
    full gradient).

    * A worker with no samples still takes part: its output is empty, it contributes
      zeros to the all-reduce, and its weight/bias still get (zero) gradients, so DDP does
      not hang. If the whole group has no samples the running statistics are not updated.
    * ``running_var`` keeps torch's convention, the *unbiased* variance ``var * n/(n-1)``
      of the global batch, so on one worker this module is exactly ``nn.BatchNorm2d``
      (detectron2's NaiveSyncBatchNorm keeps the biased one). PreciseBN overwrites both
      running buffers with population statistics (biased variance).
    * ``sync_group_size`` K > 0 normalizes over groups of K consecutive workers
      (:func:`d2_batchnorm.distributed.get_sync_group`); 0 uses all workers.
    * ``sync_stats`` (default True): when False, or with a single worker, or outside
      torch.distributed, the module is plain per-worker BatchNorm (``F.batch_norm``).
    * Inputs of shape (N, C, *) with any number of trailing dims; float16/bfloat16 inputs
      are normalized in float32 and returned in their own dtype.
    * In eval mode (with ``track_running_stats``) the running statistics are used, as in
      ``nn.BatchNorm2d``; no communication happens.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        sync_group_size: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        check_sync_group_size(sync_group_size)
        self.sync_group_size = sync_group_size
        self.sync_stats = True

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input of shape (N, C, *); got {tuple(x.shape)}")

    def extra_repr(self):
        return super().extra_repr() + f", sync_group_size={self.sync_group_size}"

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _ema_factor(self) -> float:
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, *) tensor (N may be 0).
        Returns:
            (N, C, *) tensor of x's dtype.
        """
        self._check_input_dim(x)
        dtype, xf = x.dtype, upcast(x)
        if not self._uses_batch_stats():
            return F.batch_norm(
                xf, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            ).to(dtype)
        group = active_sync_group(self.sync_group_size) if self.sync_stats else False
        if group is not False or xf.numel() == 0:
            (y,), _, count, mean, var = batch_norm_over_parts(
                [xf], self.weight, self.bias, self.eps, group
            )
            if self.training and self.track_running_stats:
                update_running_stats_(
                    self.running_mean, self.running_var, self.num_batches_tracked, self.momentum,
                    count[0], mean[0], var[0],
                )
            return y.to(dtype)
        # one worker: exactly torch's BatchNorm
        return F.batch_norm(
            xf, self.running_mean, self.running_var, self.weight, self.bias, True,
            self._ema_factor(), self.eps,
        ).to(dtype)


def convert_sync_batchnorm(module: nn.Module, sync_group_size: int = 0) -> nn.Module:
    """
    Replaces every ``torch.nn.SyncBatchNorm`` in ``module`` (detectron2's "SyncBN" and
    "nnSyncBN", which refuse CPU input) by :class:`SyncBatchNorm` with the same
    hyper-parameters, parameters and buffers (shared, not copied, so optimizers built
    later see them). Returns the converted module (a new one if ``module`` itself was a
    ``nn.SyncBatchNorm``).
    """
    if type(module) is nn.SyncBatchNorm:
        new = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, sync_group_size=sync_group_size,
        )
        _move_state(module, new)
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, sync_group_size)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Gives ``dst`` the parameters and buffers of ``src`` (same names), and its mode."""
    for name, param in src.named_parameters(recurse=False):
        setattr(dst, name, param)
    for name, buf in src.named_buffers(recurse=False):
        setattr(dst, name, buf)
    dst.train(src.training)
