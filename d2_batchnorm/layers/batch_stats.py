"""
Batch statistics shared by d2_batchnorm's normalization layers, written once.

A batch of a BN layer's input ``x`` of shape (N, C, *) is summarized per channel by its
*power sums* ``[n, S_c, Q_c]`` with ``n = N * prod(*)`` values per channel,
``S_c = sum x`` and ``Q_c = sum x^2``. Power sums of disjoint batches add, so the
statistics of a batch spread over workers (or FPN levels) are one sum (one all-reduce)
away, weighted by every part's count::

    mean = S / n,    var = Q / n - mean^2      (biased, i.e. population, variance)

``Q / n - mean^2`` cancels catastrophically in float32 when |mean| >> std. To stay exact,
each part is first reduced in the input's precision (>= float32) to sums of values
*shifted* by a per-channel constant near the mean (see :func:`local_power_sums`), and
only then turned into power sums in float64; the cancellation then happens in float64
and loses nothing measurable unless |mean| / std > 1e6. Everything is differentiable, so
gradients flow through the pooled statistics.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .. import distributed as d2bn_dist

__all__ = [
    "shifted_channel_sums",
    "local_power_sums",
    "moments_from_power_sums",
    "update_running_stats_",
    "batch_norm_over_parts",
]


def _channel_dims(x: torch.Tensor):
    return [0] + list(range(2, x.dim()))


def shifted_channel_sums(x: torch.Tensor, shift: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """
    Per-channel sums of ``x`` (N, C, *) shifted by ``shift`` (C,), no autograd::

        n = N * prod(*),   s1 = sum (x - shift),   s2 = sum (x - shift)^2

    reduced in x's precision (>= float32 advised) and returned as float64 (C,) tensors.
    With a shift near the mean both sums stay small, so the moments formed from them in
    float64 keep full precision even when |mean| >> std — the one place this is computed,
    for the training-mode norms and for PreciseBN alike.
    """
    channels = x.shape[1]
    count = x.numel() // channels if channels > 0 else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=x.device)
        return 0, zeros, zeros.clone()
    dims = _channel_dims(x)
    d = x.detach() - shift.reshape((1, -1) + (1,) * (x.dim() - 2))
    s1, s2 = torch.stack([d.sum(dims), (d * d).sum(dims)]).double()
    return count, s1, s2


def _shifted_power_sums(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(2C + 1,) float64 ``[n, S, Q]`` of x (no autograd) and the (C,) shift K used."""
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device), x.new_zeros(channels)
    shift = x[0].detach().reshape(channels, -1).mean(1)  # (C,): the first sample's mean
    count, s1, s2 = shifted_channel_sums(x, shift)
    k = shift.double()
    n = torch.full((1,), float(count), dtype=torch.float64, device=x.device)
    return torch.cat([n, s1 + count * k, s2 + k * (2 * s1 + count * k)]), shift


class _PowerSums(torch.autograd.Function):
    """
    ``[n, S, Q]`` of x (see :func:`local_power_sums`). Autograd saves only ``x`` itself
    (no temporary of its size): the backward pass is ``dx = gS + 2 gQ x``, evaluated as
    ``(gS + 2 gQ K) + 2 gQ (x - K)`` with the forward's shift K so that it stays precise
    when |mean| >> std.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        sums, shift = _shifted_power_sums(x)
        ctx.save_for_backward(x, shift)
        return sums

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, shift = ctx.saved_tensors
        channels = x.shape[1]
        view = (1, -1) + (1,) * (x.dim() - 2)
        g_s, g_q = grad[1 : 1 + channels], grad[1 + channels :]
        offset = (g_s + 2 * g_q * shift.double()).to(x.dtype)
        return torch.addcmul(offset.reshape(view), x - shift.reshape(view), (2 * g_q).to(x.dtype).reshape(view))


def local_power_sums(x: torch.Tensor) -> torch.Tensor:
    """
    Args:
        x: (N, C, *) float tensor; N may be 0.
    Returns:
        (2C + 1,) float64 tensor ``[n, S_1..S_C, Q_1..Q_C]``, differentiable w.r.t. ``x``
        (an empty ``x`` gives zeros that are still connected to the graph).

    Shifted sums: with a per-channel shift K (the mean of the first sample, a constant for
    autograd) and d = x - K, the float32 sums ``s1 = sum d``, ``s2 = sum d^2`` lose only
    ~1e-7 * (1 + (mean - K)^2 / var) of the variance (K lies within a few standard
    deviations of the mean), then ``S = s1 + n K`` and ``Q = s2 + 2 K s1 + n K^2`` are
    formed in float64. Two streaming passes, as fast as plain sums and sums of squares;
    autograd keeps no tensor of x's size besides x.
    """
    return _PowerSums.apply(x)


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
    dtype = running_mean.dtype
    if count.dim() == 0 and count.device.type == "cpu":  # host scalar: no small-op overhead
        n = float(count)
        if n <= 0:
            return
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
        running_mean.lerp_(mean.to(dtype), factor)
        running_var.lerp_(var.to(dtype) * (n / max(n - 1, 1)), factor)
        return
    count = count.to(dtype)
    valid = (count > 0).to(dtype)
    num_batches_tracked.add_((valid.max() if valid.dim() else valid).to(num_batches_tracked.dtype))
    if momentum is None:
        factor = valid / num_batches_tracked.clamp(min=1).to(dtype)
    else:
        factor = valid * momentum
    factor = factor.unsqueeze(-1)
    unbiased = var.to(dtype) * (count / (count - 1).clamp(min=1)).unsqueeze(-1)
    running_mean.lerp_(mean.to(dtype), factor)
    running_var.lerp_(unbiased, factor)


def batch_norm_over_parts(
    xs: Sequence[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    group=False,
    joint: bool = False,
) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Training-mode BatchNorm of L parts ``xs`` (e.g. FPN levels), each x_i of shape
    (N, C, *_i), with statistics summed over the workers of ``group`` (a process group,
    None for the world, False for this worker alone):

    * ``joint=False``: part i is normalized by its own statistics (over all workers);
    * ``joint=True``: every part by the statistics of all parts together, i.e. of BN over
      their concatenation (no tensor is concatenated).

    ``weight``/``bias``: None, (C,) shared by the parts, or (L, C), one row per part.
    Returns the L normalized tensors, the (L, 2C + 1) float64 power sums of the parts
    summed over workers, and the count (R,), mean (R, C) and biased variance (R, C) the
    parts were normalized with (R = 1 if ``joint`` else L); these carry no gradient.

    One all-reduce of (L, 2C + 1) float64 in forward, one of (L or 1, 2C) in backward;
    autograd saves only the inputs and per-channel vectors. The backward pass, with the
    sums ``Sdy = sum dy`` and ``Sdyx = sum dy (x - mean)`` over the values sharing the
    statistics (mean, invstd, count n)::

        dx = w * invstd * (dy - Sdy / n - (x - mean) * invstd^2 * Sdyx / n)
        dw = sum_local dy (x - mean) * invstd,   db = sum_local dy
    """
    out = _BatchNormOverParts.apply(weight, bias, eps, group, joint, *xs)
    return list(out[: len(xs)]), *out[len(xs) :]


def _row(t: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    return t[i] if t is not None and t.dim() == 2 else t


class _BatchNormOverParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, eps, group, joint, *xs):
        channels = xs[0].shape[1]
        with torch.no_grad():
            sums = torch.stack([_shifted_power_sums(x)[0] for x in xs])  # (L, 2C+1)
            if group is not False:
                d2bn_dist.all_reduce_sum_(sums, group)
        rows = sums.sum(0, keepdim=True) if joint else sums
        count, mean64, var64 = moments_from_power_sums(rows)  # (R,), (R, C), (R, C)
        invstd64 = torch.rsqrt(var64 + eps)
        ys, means, invstds = [], [], []
        for i, x in enumerate(xs):
            r = 0 if joint else i
            mean, invstd = mean64[r].to(x.dtype), invstd64[r].to(x.dtype)
            w, b = _row(weight, i), _row(bias, i)
            scale = invstd if w is None else w.to(x.dtype) * invstd
            shift = -mean * scale if b is None else b.to(x.dtype) - mean * scale
            view = (1, -1) + (1,) * (x.dim() - 2)
            ys.append(torch.addcmul(shift.reshape(view), x, scale.reshape(view)))
            means.append(mean)
            invstds.append(invstd)
        ctx.save_for_backward(weight, count, *xs, *means, *invstds)
        ctx.group, ctx.joint, ctx.num_parts, ctx.channels = group, joint, len(xs), channels
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.bias_per_part = bias is not None and bias.dim() == 2
        ctx.mark_non_differentiable(sums, count, mean64, var64)
        return (*ys, sums, count, mean64, var64)

    @staticmethod
    def backward(ctx, *grads):
        num, channels = ctx.num_parts, ctx.channels
        weight, count, *rest = ctx.saved_tensors
        xs, means, invstds = rest[:num], rest[num : 2 * num], rest[2 * num :]
        dys = grads[:num]  # the gradients of the statistics outputs are ignored
        local = []
        for x, dy, mean in zip(xs, dys, means):
            view = (1, -1) + (1,) * (x.dim() - 2)
            dims = [0] + list(range(2, x.dim()))
            xmu = x - mean.reshape(view)  # recomputed below rather than kept: lower peak memory
            local.append(torch.cat([dy.sum(dims), (dy * xmu).sum(dims)]))
            del xmu
        local = torch.stack(local)  # (L, 2C): [sum dy, sum dy (x - mean)] per part
        rows = local.double().sum(0, keepdim=True) if ctx.joint else local.double()
        if ctx.group is not False:
            d2bn_dist.all_reduce_sum_(rows, ctx.group)
        rows = rows / count.clamp(min=1).unsqueeze(1)
        dxs, dws, dbs = [], [], []
        for i, (x, dy, mean, invstd) in enumerate(zip(xs, dys, means, invstds)):
            view = (1, -1) + (1,) * (x.dim() - 2)
            xmu = x - mean.reshape(view)
            mean_dy, mean_dy_xmu = rows[0 if ctx.joint else i].to(x.dtype).split(channels)
            w = _row(weight, i)
            scale = invstd if w is None else w.to(x.dtype) * invstd
            coef = (mean_dy_xmu * invstd * invstd).reshape(view)
            dxs.append((dy - mean_dy.reshape(view)).sub_(xmu.mul_(coef)).mul_(scale.reshape(view)))
            dws.append(local[i, channels:] * invstd)
            dbs.append(local[i, :channels])
        dw = db = None
        if ctx.has_weight:
            dw = torch.stack(dws) if weight.dim() == 2 else sum(dws)
            dw = dw.to(weight.dtype)
        if ctx.has_bias:
            db = torch.stack(dbs) if ctx.bias_per_part else sum(dbs)
        return (dw, db, None, None, None, *dxs)
