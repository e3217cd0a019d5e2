"""
Batch statistics shared by d2_batchnorm's normalization layers, written once.

A batch of a BN layer's input ``x`` of shape (N, C, *) is summarized per channel by its
*power sums* ``[n, S_c, Q_c]`` with ``n = N * prod(*)`` values per channel,
``S_c = sum x`` and ``Q_c = sum x^2``. Power sums of disjoint batches add, so the
statistics of a batch spread over workers (or FPN levels) are one sum (one all-reduce)
away, weighted by every part's count::

    mean = S / n,    var = Q / n - mean^2      (biased, i.e. population, variance)

``Q / n - mean^2`` cancels catastrophically in float32 when |mean| >> std. To stay exact,
each part is first reduced in the input's precision (>= float32) to its *centered*
moments with ``torch.var_mean`` (a Welford-style reduction), and only then turned into
power sums in float64 (``S = n * mu``, ``Q = n * (var + mu^2)``); the cancellation then
happens in float64 and loses nothing measurable unless |mean| / std > 1e6. Everything is
differentiable, so gradients flow through the pooled statistics.
"""
from typing import Tuple

import torch

__all__ = ["local_power_sums", "moments_from_power_sums", "update_running_stats_"]


def _channel_dims(x: torch.Tensor):
    return [0] + list(range(2, x.dim()))


def local_power_sums(x: torch.Tensor) -> torch.Tensor:
    """
    Args:
        x: (N, C, *) float tensor; N may be 0.
    Returns:
        (2C + 1,) float64 tensor ``[n, S_1..S_C, Q_1..Q_C]``, differentiable w.r.t. ``x``
        (an empty ``x`` gives zeros that are still connected to the graph).
    """
    channels = x.shape[1]
    count = x.numel() // channels if channels > 0 else 0
    n = torch.full((1,), float(count), dtype=torch.float64, device=x.device)
    dims = _channel_dims(x)
    if count == 0:
        s = x.sum(dims).double()
        q = (x * x).sum(dims).double()
    else:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        mean = mean.double()
        s = mean * count
        q = (var.double() + mean * mean) * count
    return torch.cat([n, s, q])


def moments_from_power_sums(sums: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Args:
        sums: (..., 2C + 1) power sums as returned by :func:`local_power_sums` (summed over
            any number of parts).
    Returns:
        ``count`` (...,), ``mean`` (..., C), ``var`` (..., C): float64 count, mean and biased
        variance. An empty batch (count 0) gives mean 0 and variance 0 instead of NaN.
    """
    channels = (sums.shape[-1] - 1) // 2
    count = sums[..., 0]
    denom = count.clamp(min=1).unsqueeze(-1)
    mean = sums[..., 1 : 1 + channels] / denom
    var = (sums[..., 1 + channels :] / denom - mean * mean).clamp(min=0)
    return count, mean, var


@torch.no_grad()
def update_running_stats_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    momentum,
    count: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> None:
    """
    torch's BatchNorm update of the running statistics, in place, skipped for empty batches
    without a host synchronization.

    ``running_var`` follows torch's convention and receives the *unbiased* batch variance
    ``var * n / (n - 1)`` (``var`` is biased); ``momentum=None`` is torch's cumulative
    average. Rows of (L, C) buffers are updated independently from (L,) counts and (L, C)
    statistics; ``num_batches_tracked`` grows by one if any row had samples.

    Args:
        running_mean, running_var: (C,) or (L, C) buffers.
        num_batches_tracked: scalar int64 buffer.
        momentum: float or None.
        count: () or (L,) number of values per channel in the batch.
        mean, var: (C,) or (L, C) batch mean and biased variance.
    """
    count = count.to(running_mean.dtype)
    valid = (count > 0).to(running_mean.dtype)
    num_batches_tracked.add_((valid.max() if valid.dim() else valid).to(num_batches_tracked.dtype))
    if momentum is None:
        factor = valid / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
    else:
        factor = valid * momentum
    factor = factor.unsqueeze(-1)
    unbiased = var.to(running_var.dtype) * (count / (count - 1).clamp(min=1)).unsqueeze(-1)
    running_mean.add_(factor * (mean.to(running_mean.dtype) - running_mean))
    running_var.add_(factor * (unbiased - running_var))
