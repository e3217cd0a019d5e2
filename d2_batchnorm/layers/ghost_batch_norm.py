"""``GhostBatchNorm``: BatchNorm over virtual sub-batches ("ghost batches") of a worker's batch."""
from typing import Optional

import torch
import torch.nn.functional as F

from ..checks import check_int
from .batch_stats import BatchNormNd, ChannelMoments, channel_view, ema_factor, update_running_stats_, upcast

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

    and fed to torch's EMA with the unbiased correction n / (n - 1), n = N * M, as
    ``nn.BatchNorm2d`` does. Eval mode uses the running statistics.

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
        dtype, xf = x.dtype, upcast(x)
        n, g = x.shape[0], self.ghost_batch_size
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or n == 0 or g in (0, n):
            return self._plain(xf, use_batch_stats).to(dtype)
        if n % g != 0:
            raise ValueError(
                f"GhostBatchNorm: ghost_batch_size = {g} does not divide "
                f"the batch size {n} of this worker; use a divisor of {n}, or 0 for the whole batch"
            )
        k, c = n // g, x.shape[1]
        xs = xf.reshape(k, g, c, -1)
        var, mean = torch.var_mean(xs, dim=(1, 3), keepdim=True, correction=0)  # (k, 1, C, 1)
        if self.training and self.track_running_stats:  # equal splits: their pooled moments
            count = float(xs.shape[1] * xs.shape[3] * k)
            full_var = (var.detach().mean(0) + mean.detach().var(0, correction=0)).flatten().double()
            update_running_stats_(self, ChannelMoments(
                torch.tensor(count, dtype=torch.float64, device=x.device),
                mean.detach().mean(0).flatten().double(), full_var * count,
            ))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(xf.dtype).reshape(1, 1, c, 1)
        y = (xs - mean) * scale
        if self.bias is not None:
            y = y + self.bias.to(xf.dtype).reshape(1, 1, c, 1)
        return y.reshape(x.shape).to(dtype)

    def _plain(self, x: torch.Tensor, use_batch_stats: bool) -> torch.Tensor:
        if x.shape[0] == 0:
            y = x if self.weight is None else x * channel_view(self.weight, x)
            return y if self.bias is None else y + channel_view(self.bias, x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            use_batch_stats, ema_factor(self), self.eps,
        )
