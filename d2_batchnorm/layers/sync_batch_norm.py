"""
``SyncBatchNorm``: BatchNorm whose training statistics are those of the batch of all
workers of a sync group, weighted by each worker's count, on CPU (gloo) and CUDA (NCCL).
"""
from typing import Optional

import torch

from ..distributed import active_sync_group, check_sync_group_size
from .batch_stats import BatchNormNd, batch_norm_kernel_ema, batch_norm_over_parts, update_running_stats_

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(BatchNormNd):
    """
    BatchNorm over the union of the batches of the workers of a sync group.

    Training statistics (per channel c, over the samples of all workers r of the group,
    with n_r values per channel on worker r, n_r = 0 allowed)::

        n = sum_r n_r,   mean = sum_r S_r / n,   var = sum_r Q_r / n - mean^2   (biased)
        y = (x - mean) / sqrt(var + eps) * weight + bias

    The float64 power sums ``[n_r, S_r, Q_r]`` (:mod:`.batch_stats`) are summed over the
    workers by one collective in forward, and ``[sum dy, sum dy (x - mean)]`` by one in
    backward (:func:`.batch_stats.batch_norm_over_parts`; how, in rank order with
    bitwise-equal sums on all workers: :func:`d2_batchnorm.distributed.sum_over_ranks`), so
    the input and weight gradients are those of BatchNorm over the concatenated batch (the
    weight/bias gradient of each worker is its share; their sum, as DDP forms it, is the
    full gradient).

    * A worker with no samples still takes part: its output is empty, it contributes
      zeros to the collectives, and its weight/bias still get (zero) gradients, so DDP does
      not hang. If the whole group has no samples the running statistics are not updated.
    * ``running_var`` keeps torch's convention, the *unbiased* variance ``var * n/(n-1)``
      of the global batch, so on one worker this module is exactly ``nn.BatchNorm2d``
      (detectron2's NaiveSyncBatchNorm keeps the biased one). PreciseBN overwrites both
      running buffers with population statistics (biased variance).
    * ``sync_group_size`` K > 0 normalizes over groups of K consecutive workers
      (:func:`d2_batchnorm.distributed.get_sync_group`); 0 uses all workers.
    * ``sync_stats`` (default True): when False, or with a single worker, or outside
      torch.distributed, the module is plain per-worker BatchNorm (``F.batch_norm``).
    * Inputs of shape (N, C, *) with any number of trailing dims, in any memory format
      (channels_last is kept); float16/bfloat16 inputs (autocast, or a model in
      half precision) are normalized by torch's kernels in float32, with float32
      statistics, and returned in their own dtype, as ``nn.BatchNorm2d`` does.
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

    def extra_repr(self):
        return super().extra_repr() + f", sync_group_size={self.sync_group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, *) tensor (N may be 0).
        Returns:
            (N, C, *) tensor of x's dtype.
        """
        self._check_input_dim(x)
        if not (self.training or self.running_mean is None):
            return batch_norm_kernel_ema(self, x, use_batch_stats=False)  # the running statistics
        group = active_sync_group(self.sync_group_size) if self.sync_stats else False
        if group is not False or x.numel() == 0:
            return self.normalize_over(x, group)
        # one worker: exactly torch's BatchNorm (non-finite batches left out of the EMA)
        return batch_norm_kernel_ema(self, x)

    def normalize_over(self, x: torch.Tensor, group) -> torch.Tensor:
        """
        The training step of the synchronized path: x (N, C, *) normalized by the statistics
        of all workers of ``group`` (a process group, also of one process; None: the world;
        False: this worker), running statistics updated. ``forward`` calls it whenever there
        is something to synchronize; ``d2_batchnorm.gpu_check`` calls it with a 1-process
        NCCL group to put this path through NCCL on one GPU.
        """
        (y,), _, moments = batch_norm_over_parts([x], self.weight, self.bias, self.eps, group)
        update_running_stats_(self, moments)
        return y
