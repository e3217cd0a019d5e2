"""``GhostBatchNorm``: BatchNorm over virtual sub-batches ("ghost batches") of a worker's batch."""
from typing import Optional

import torch

from ..checks import check_int
from .batch_stats import (
    BatchNormNd, ChannelMoments, batch_norm_kernel_ema, batch_norm_over_parts, channel_view, update_running_stats_,
)

__all__ = ["GhostBatchNorm"]


class GhostBatchNorm(BatchNormNd):
    """
    Splits a batch of N samples into N / G consecutive virtual batches of G samples
    (``ghost_batch_size``) and normalizes each by its own statistics; 0 (or G = N) is
    plain BatchNorm. For input x of shape (N, C, *) viewed as (k, G, C, M) with k = N / G::

        mean_j, var_j = mean and biased variance of x[j] over (G, M)   per channel
        y[j] = (x[j] - mean_j) / sqrt(var_j + eps) * weight + bias

    Population statistics stay those of the whole batch (the statistics a model with
    ghost BN must be evaluated with, as the EMA then estimates the population's), computed
    exactly from the splits (equal sizes)::

        mean = mean_j(mean_j),   var = mean_j(var_j) + var_j(mean_j)     (biased)

    (the parts' power sums added, :mod:`.batch_stats`) and fed to torch's EMA with the
    unbiased correction n / (n - 1), n = N * M, as ``nn.BatchNorm2d`` does. Eval mode uses
    the running statistics. The ghost batches are normalized by
    :func:`.batch_stats.batch_norm_over_parts` (torch's kernels, analytic backward): any
    memory format, float16/bfloat16 computed in float32, like ``nn.BatchNorm2d``.

    Raises:
        ValueError: in training, if G does not divide the batch size N.
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int = 0,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, 0)

    def extra_repr(self):
        return super().extra_repr() + f", ghost_batch_size={self.ghost_batch_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, *) tensor.
        Returns:
            (N, C, *) tensor of x's dtype.
        """
        self._check_input_dim(x)
        n, g = x.shape[0], self.ghost_batch_size
        if n == 0:  # the affine map alone: torch's kernels cannot take an empty batch
            y = x if self.weight is None else x * channel_view(self.weight, x)
            return y if self.bias is None else y + channel_view(self.bias, x)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or g in (0, n):
            return batch_norm_kernel_ema(self, x, use_batch_stats)
        if n % g != 0:
            raise ValueError(
                f"GhostBatchNorm: ghost_batch_size = {g} does not divide "
                f"the batch size {n} of this worker; use a divisor of {n}, or 0 for the whole batch"
            )
        # the ghost batches are parts normalized by their own statistics (views of x, in
        # its memory format); their power sums add up to the whole batch's moments
        ys, sums, _ = batch_norm_over_parts(x.split(g), self.weight, self.bias, self.eps)
        update_running_stats_(self, ChannelMoments.from_power_sums(sums.sum(0, keepdim=True)))
        return torch.cat(ys)
