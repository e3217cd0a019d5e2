"""
Per-channel batch statistics, written once: for d2_batchnorm's norms and for PreciseBN.

:class:`ChannelMoments` is the one type: per channel, the count ``n``, the mean ``m`` and
``M2``, the sum of squared deviations from ``m`` (biased variance ``M2 / n``), in float64.

* Measured from a batch ``x`` (N, C, *) with sums of ``d = x - K`` in the statistics
  dtype of x (:func:`statistics_dtype`: float32 for float16/bfloat16; ``sum d`` and
  ``sum d^2`` in one pass of torch's batch-norm backward reduction), for a per-channel
  shift ``K`` near the mean, then in float64::

      m = K + sum(d) / n,      M2 = sum(d^2) - sum(d)^2 / n

  The shift rule, one rule with one knob: ``K`` is the rounded mean of the first
  ``shift_samples`` samples of x. Any K within a few standard deviations of the mean keeps
  the float32 sums small, losing only ~1e-7 * (1 + (m - K)^2 / var) of the variance, so
  the result stays exact when |mean| >> std (where ``E[x^2] - E[x]^2`` would lose every
  digit). The knob is there because the two users weigh cost differently. The training
  norms run at every step and take one sample: 1/N of a pass over x (the batch mean would
  cost a whole extra pass). PreciseBN takes all N, the batch mean, which removes the
  (m - K)^2 term; its cost is the model's forward, not this pass.
* Pooled exactly (Chan et al., 1979, for k sets at once; what PreciseBN does with the
  calls of a module it has collected, and with the ranks' rows), for k sets stacked along
  a leading dim::

      n = sum_i n_i,   m = sum_i n_i m_i / n,   M2 = sum_i M2_i + sum_i n_i (m_i - m)^2

* Carried as *power sums* ``[n, S, Q] = [n, n m, M2 + n m^2]`` (a (..., 2C+1) float64
  tensor; :meth:`~ChannelMoments.power_sums`, :meth:`~ChannelMoments.from_power_sums`)
  where parts are added by one collective: power sums of disjoint batches add. The
  cancellation ``Q - S^2 / n`` then happens in float64 and loses nothing measurable
  unless |mean| / std > 1e6.

:func:`batch_norm_over_parts` is the training-mode BatchNorm of the synchronized and level
norms on top of it; :func:`update_running_stats_` and :func:`ema_factor` are torch's EMA
of the running buffers, and :func:`batch_norm_kernel_ema` the single-worker path through
torch's kernel EMA. Both skip a batch whose statistics are not finite (the one home of that
rule: a NaN or inf batch would otherwise poison the running buffers for good, pytorch#88474),
without a host synchronization, and count it in the non-persistent int64 buffer
``num_nonfinite_batches`` that :class:`BatchNormNd` registers. The small helpers every norm shares live here too:
:func:`statistics_dtype`, :func:`channel_view`, :func:`row_of` and the base class
:class:`BatchNormNd`.

CUDA-safe by construction: torch's private batch-norm kernels are called only with the
arguments torch's autograd passes them (``tools/autograd/derivatives.yaml``), because the
CUDA kernels assert what the CPU ones accept (``aten/src/ATen/native/cuda/Normalization.cu``):

* ``native_batch_norm_backward`` always gets defined ``save_mean``/``save_invstd`` of shape
  (C,) (or native_batch_norm's own, possibly empty, results) and a defined weight whenever
  a weight or bias gradient is asked for (a ones weight for ``affine=False``);
* the parameters and statistics handed to a kernel are all in x's dtype, or all float32
  for float16/bfloat16 x (the one mixed case CUDA and CPU take): :func:`statistics_dtype`.

``tests/test_cuda_contract.py`` records every aten op our layers dispatch and checks this.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as d2bn_dist

__all__ = [
    "ChannelMoments",
    "BatchNormNd",
    "batch_norm_over_parts",
    "update_running_stats_",
    "batch_norm_kernel_ema",
    "ema_factor",
    "statistics_dtype",
    "channel_view",
    "row_of",
]


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """
    The dtype of the statistics and parameters torch's batch-norm kernels take for an
    input of ``dtype``: float32 for float16/bfloat16 (CUDA's accumulation type; the only
    mixed case its kernels and the CPU's accept), else ``dtype`` itself.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The per-channel tensor ``t`` (C,) viewed to broadcast over ``x`` (N, C, *)."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def row_of(t: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    """Row i of an (L, C) parameter or buffer; a (C,) one (or None) is shared by all rows."""
    return t[i] if t is not None and t.dim() == 2 else t


class BatchNormNd(nn.BatchNorm2d):
    """
    ``nn.BatchNorm2d`` that accepts inputs (N, C, *) with any number of trailing dims, with
    ``num_nonfinite_batches``: an int64 scalar buffer counting the training batches whose
    statistics were not finite and were left out of the running statistics (non-persistent:
    state dicts and checkpoints are those of ``nn.BatchNorm2d``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer(
            "num_nonfinite_batches",
            torch.zeros((), dtype=torch.long, device=self.weight.device if self.weight is not None else None),
            persistent=False,
        )

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expects an input of shape (N, C, *); got {tuple(x.shape)}"
            )


def _sum_and_sum_of_squares(d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Per channel ``sum d`` and ``sum d^2`` of d (N, C, *) (float32 or float64), in ONE pass:
    torch's training-mode batch-norm backward reduction with grad_out = input = d,
    save_mean = 0 and save_invstd = 1 returns grad_bias = sum d and
    grad_weight = sum d (d - 0) * 1. The arguments are the kinds autograd passes (defined
    (C,) saved statistics and weight of d's dtype), so CUDA runs its reduction kernel.
    """
    ones = d.new_ones(d.shape[1])
    _, sum_d2, sum_d = torch.ops.aten.native_batch_norm_backward(
        d, d, ones, None, None, torch.zeros_like(ones), ones, True, 0.0, [False, True, True]
    )
    return sum_d, sum_d2


def _shifted_sums(xs: Sequence[torch.Tensor], shift_samples: Optional[int]):
    """
    Per x (N, C, *): the count n, the shift K (the mean of its first ``shift_samples``
    samples; None: all) and ``sum d``, ``sum d^2`` of ``d = x - K``, summed in x's
    statistics dtype, returned in float64: count (L, 1), K, s1, s2 (L, C).
    """
    counts, sums = [], []  # per x: [n], and (3, C) float64 [shift, sum d, sum d^2]
    for x in xs:
        x, dtype = x.detach(), statistics_dtype(x.dtype)
        channels = x.shape[1]
        counts.append([x.numel() // channels if channels > 0 else 0])
        if counts[-1][0] == 0:
            sums.append(x.new_zeros(3, channels, dtype=torch.float64))
            continue
        shift = (x if shift_samples is None else x[:shift_samples]).mean([0, *range(2, x.dim())], dtype=dtype)
        d = x - channel_view(shift, x)  # in the statistics dtype: float16/bfloat16 x is promoted
        sums.append(torch.stack([shift, *_sum_and_sum_of_squares(d)]).double())
    k, s1, s2 = torch.stack(sums).unbind(1)
    return k.new_tensor(counts), k, s1, s2


class ChannelMoments(NamedTuple):
    """``count`` (...,), ``mean`` and ``m2`` (..., C): float64 moments (module docstring)."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def zeros(cls, shape: Tuple[int, ...], channels: int, device=None) -> "ChannelMoments":
        """No samples: ``count`` of ``shape``, ``mean`` and ``m2`` of ``shape + (channels,)``."""
        count = torch.zeros(shape, dtype=torch.float64, device=device)
        rows = tuple(shape) + (channels,)
        return cls(count, count.new_zeros(rows), count.new_zeros(rows))

    @classmethod
    def of(cls, *xs: torch.Tensor, shift_samples: Optional[int] = 1) -> "ChannelMoments":
        """
        Moments of each x (N, C, *) (N may be 0), no autograd: one row per x, i.e. count
        (L,), mean and m2 (L, C). The shift is the mean of the first ``shift_samples``
        samples of x (None: all of them), the shift rule of the module docstring.
        """
        count, k, s1, s2 = _shifted_sums(xs, shift_samples)
        n = count.clamp(min=1)
        return cls(count.squeeze(-1), k + s1 / n, (s2 - s1.square() / n).clamp_(min=0))

    @staticmethod
    def power_sums_of(*xs: torch.Tensor, shift_samples: Optional[int] = 1) -> torch.Tensor:
        """
        ``ChannelMoments.of(*xs, shift_samples=...).power_sums()`` in fewer operations, from
        the same shifted sums: (L, 2C + 1) ``[n, S, Q]`` with, per channel,
        ``S = n K + sum d`` and ``Q = sum d^2 + K (sum d + S)`` (= sum x^2), in float64.
        """
        n, k, s1, s2 = _shifted_sums(xs, shift_samples)
        s = torch.addcmul(s1, n, k)
        return torch.cat([n, s, torch.addcmul(s2, k, s1 + s)], -1)

    def pooled(self) -> "ChannelMoments":
        """
        The moments of all k sets of a leading dim (count (k, ...), mean and m2 (k, ..., C))
        together: count (...), mean and m2 (..., C), by the formula of the module
        docstring: a fixed number of float64 operations for any k; empty sets add nothing.
        """
        n_i = self.count.unsqueeze(-1)
        count = self.count.sum(0)
        mean = (n_i * self.mean).sum(0) / count.clamp(min=1).unsqueeze(-1)
        m2 = self.m2.sum(0) + (n_i * (self.mean - mean).square()).sum(0)
        return ChannelMoments(count, mean, m2)

    @property
    def var(self) -> torch.Tensor:
        """Biased (population) variance ``M2 / n`` (0 for no samples)."""
        return self.m2 / self.count.clamp(min=1).unsqueeze(-1)

    def power_sums(self) -> torch.Tensor:
        """(..., 2C + 1) ``[n, S, Q]``: these add over disjoint batches (one collective)."""
        count = self.count.unsqueeze(-1)
        s = count * self.mean
        return torch.cat([count, s, torch.addcmul(self.m2, s, self.mean)], -1)

    @classmethod
    def from_power_sums(cls, sums: torch.Tensor) -> "ChannelMoments":
        """The moments of (..., 2C + 1) power sums, e.g. summed over workers or parts."""
        channels = (sums.shape[-1] - 1) // 2
        count, s, q = sums[..., 0], sums[..., 1 : 1 + channels], sums[..., 1 + channels :]
        mean = s / count.clamp(min=1).unsqueeze(-1)
        return cls(count, mean, torch.addcmul(q, s, mean, value=-1).clamp_(min=0))


def ema_factor(module) -> float:
    """
    torch's BatchNorm EMA factor for one more batch of ``module``: counts the batch in
    ``num_batches_tracked`` and returns ``momentum``, or 1 / num_batches_tracked for
    ``momentum=None`` (cumulative average); 0.0 (nothing counted) unless the module is
    training and tracks running statistics.
    """
    if not (module.training and module.track_running_stats):
        return 0.0
    module.num_batches_tracked.add_(1)
    return 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum


def _count_nonfinite_(module, skipped: torch.Tensor) -> None:
    """Adds ``skipped`` (a 0-dim bool/int tensor) to ``num_nonfinite_batches`` where there is one."""
    counter = getattr(module, "num_nonfinite_batches", None)
    if counter is not None:
        counter.add_(skipped.to(counter.dtype))


@torch.no_grad()
def update_running_stats_(module, moments: ChannelMoments) -> None:
    """
    torch's BatchNorm update of ``module``'s running statistics from the batch ``moments``,
    in place, when the module is training and tracks them: ``running_var`` receives the
    *unbiased* batch variance ``M2 / (n - 1)``, as in torch. Moments with a leading row
    dimension of 1 update (C,) buffers; (L,) rows update (L, C) buffers row by row. Empty
    batches (rows) are skipped without a host synchronization; ``num_batches_tracked``
    grows by one if any row had samples.

    A batch whose moments are not all finite (any row with samples) is skipped as a whole,
    also without a host synchronization (``torch.where``: ``lerp_`` with a factor of 0 would
    still propagate NaN): the buffers and ``num_batches_tracked`` stay as they were and
    ``num_nonfinite_batches`` grows by one.
    """
    if not (module.training and module.track_running_stats):
        return
    running_mean, running_var = module.running_mean, module.running_var
    dtype, shape = running_mean.dtype, running_mean.shape
    count = moments.count.reshape(shape[:-1])
    mean, m2 = moments.mean.reshape(shape), moments.m2.reshape(shape)
    finite = torch.isfinite(mean).all(-1) & torch.isfinite(m2).all(-1)  # per row
    if count.dim() == 0 and count.device.type == "cpu":  # host scalar: no small-op overhead
        n = float(count)
        if n <= 0:
            return
        if not bool(finite):  # a host tensor: no device synchronization
            _count_nonfinite_(module, finite.logical_not())
            return
        factor = ema_factor(module)
        var = m2 / max(n - 1, 1)
        running_mean.lerp_(mean.to(dtype), factor)
        running_var.lerp_(var.to(dtype), factor)
        return
    # ema_factor's rule per row, without a host synchronization
    filled = count > 0
    ok = (finite | ~filled).all()  # the whole batch is skipped if a row with samples is not finite
    _count_nonfinite_(module, filled.any() & ~ok)
    valid = (filled & ok).to(dtype)
    tracked = module.num_batches_tracked
    tracked.add_(valid.max().to(tracked.dtype))
    if module.momentum is None:
        factor = (valid / tracked.clamp(min=1).to(dtype)).unsqueeze(-1)
    else:
        factor = (valid * module.momentum).unsqueeze(-1)
    var = m2 / (count - 1).clamp(min=1).unsqueeze(-1)
    keep = (valid > 0).unsqueeze(-1)
    running_mean.copy_(torch.where(keep, running_mean.lerp(mean.to(dtype), factor), running_mean))
    running_var.copy_(torch.where(keep, running_var.lerp(var.to(dtype), factor), running_var))


def batch_norm_kernel_ema(module, x: torch.Tensor, use_batch_stats: bool = True) -> torch.Tensor:
    """
    ``F.batch_norm`` of ``module`` (a BatchNorm with (C,) buffers) on x (N, C, *), N > 0:
    with ``use_batch_stats`` the batch's statistics, and torch's kernel updating the
    running buffers by :func:`ema_factor`'s rule when the module is training and tracks
    them; otherwise the running statistics. A batch whose statistics are not finite is
    undone without a host synchronization: the kernel's update is kept only where it
    leaves finite buffers finite (the kernel updates a 2C-value copy); otherwise the buffers
    stay as they were, ``num_batches_tracked`` is decremented and ``num_nonfinite_batches`` incremented.
    (A channel already non-finite before the batch cannot tell; the BN monitor reports it.)
    """
    if not (use_batch_stats and module.training and module.track_running_stats):
        return F.batch_norm(
            x, module.running_mean, module.running_var, module.weight, module.bias,
            use_batch_stats, 0.0, module.eps,
        )
    # the kernel updates copies (autograd saves them: the buffers may change after it)
    mean, var = module.running_mean.clone(), module.running_var.clone()
    y = F.batch_norm(x, mean, var, module.weight, module.bias, True, ema_factor(module), module.eps)
    with torch.no_grad():
        before = torch.stack([module.running_mean, module.running_var])
        after = torch.stack([mean, var])
        skipped = (torch.isfinite(before) & ~torch.isfinite(after)).any()
        kept = torch.where(skipped, before, after)
        module.running_mean.copy_(kept[0])
        module.running_var.copy_(kept[1])
        module.num_batches_tracked.sub_(skipped.to(module.num_batches_tracked.dtype))
        _count_nonfinite_(module, skipped)
    return y


def batch_norm_over_parts(
    xs: Sequence[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    group=False,
    joint: bool = False,
) -> Tuple[List[torch.Tensor], torch.Tensor, ChannelMoments]:
    """
    Training-mode BatchNorm of L parts ``xs`` (e.g. FPN levels), each x_i of shape
    (N, C, *_i), with statistics summed over the workers of ``group`` (a process group,
    None for the world, False for this worker alone):

    * ``joint=False``: part i is normalized by its own statistics (over all workers);
    * ``joint=True``: every part by the statistics of all parts together, i.e. of BN over
      their concatenation (no tensor is concatenated).

    ``weight``/``bias``: None, (C,) shared by the parts, or (L, C), one row per part.
    Returns the L normalized tensors, the (L, 2C + 1) float64 power sums of the parts
    summed over workers, and the :class:`ChannelMoments` (R rows, R = 1 if ``joint`` else
    L) the parts were normalized with; these carry no gradient.

    One collective for the (L, 2C + 1) float64 power sums in forward and one for the
    (L, 2C) gradient sums in backward (sent in x's precision, added in float64), both
    :func:`d2_batchnorm.distributed.sum_over_ranks`: for the usual sizes an all-gather, one
    round of latency where an all-reduce takes two. Autograd saves only the inputs and
    per-channel vectors. The backward pass, with the
    sums ``Sdy = sum dy`` and ``Sdyx = sum dy (x - mean)`` over the values sharing the
    statistics (mean, invstd, count n)::

        dx = w * invstd * (dy - Sdy / n - (x - mean) * invstd^2 * Sdyx / n)
        dw = sum_local dy (x - mean) * invstd,   db = sum_local dy
    """
    with torch.no_grad():  # the statistics: no autograd (the backward pass is analytic)
        sums = ChannelMoments.power_sums_of(*xs)  # (L, 2C+1)
        if group is not False:
            sums = d2bn_dist.sum_over_ranks(sums, group)
        pooled = ChannelMoments.from_power_sums(sums.sum(0, keepdim=True) if joint else sums)
    ys = _BatchNormOverParts.apply(weight, bias, eps, group, joint, pooled.count, pooled.mean, pooled.var, *xs)
    return list(ys), sums, pooled


def _kernel_args(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """``tensors`` (parameters, statistics; None stays None) in x's :func:`statistics_dtype`."""
    dtype = statistics_dtype(x.dtype)
    return [None if t is None else t.to(dtype) for t in tensors]


class _BatchNormOverParts(torch.autograd.Function):
    """
    ``y_i = (x_i - mean) / sqrt(var + eps) * w + b`` with the statistics given (R rows,
    float64), through torch's own fused inference-mode batch-norm kernels, called as
    autograd calls them: ``native_batch_norm(x, w, b, mean, var, training=False)`` for the
    forward, whose saved mean/invstd go back into ``native_batch_norm_backward``, which in
    one pass gives ``w invstd dy`` with the local ``sum dy`` and ``sum dy (x - mean) invstd``;
    once those sums are summed over workers the terms of the statistics' gradient are added
    (formula of :func:`batch_norm_over_parts`) in a second pass of the inference kernel.
    Float16/bfloat16 parts are computed by the kernels in float32 with float32 statistics
    and parameters, and returned in their own dtype and memory format.
    """

    @staticmethod
    def forward(ctx, weight, bias, eps, group, joint, count, mean64, var64, *xs):
        ys, saved = [], []
        for i, x in enumerate(xs):
            r = 0 if joint else i
            mean, var, w, b = _kernel_args(x, mean64[r], var64[r], row_of(weight, i), row_of(bias, i))
            if x.numel() == 0:  # no samples (torch's kernel cannot take them)
                y, save_mean, save_invstd = x.new_empty(x.shape), mean.new_empty(0), mean.new_empty(0)
            else:
                y, save_mean, save_invstd = torch.native_batch_norm(x, w, b, mean, var, False, 0.0, eps)
            ys.append(y)
            saved += [mean, var, save_mean, save_invstd]
        ctx.save_for_backward(weight, bias, count, *xs, *saved)
        ctx.eps, ctx.group, ctx.joint, ctx.num_parts = eps, group, joint, len(xs)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        num = ctx.num_parts
        weight, bias, count, *rest = ctx.saved_tensors
        xs, saved = rest[:num], rest[num:]
        parts = []  # per part: weight row, mean, var, [w invstd dy, sum dy (x - mean) invstd, sum dy]
        for i, (x, dy) in enumerate(zip(xs, dys)):
            mean, var, save_mean, save_invstd = saved[4 * i : 4 * i + 4]
            # a weight is always passed (ones without affine): the sums are needed either way
            (w,) = _kernel_args(x, mean.new_ones(x.shape[1]) if weight is None else row_of(weight, i))
            if x.numel() == 0:
                zero = mean.new_zeros(x.shape[1])
                grads = (x.new_empty(x.shape), zero, zero)
            else:
                grads = torch.ops.aten.native_batch_norm_backward(
                    dy, x, w, mean, var, save_mean, save_invstd, False, ctx.eps, [True, True, True]
                )
            parts.append((w, mean, var, grads))
        local = torch.stack([torch.cat([g[2], g[1]]) for *_, g in parts])  # (L, 2C), statistics dtype
        if ctx.group is False:
            rows = local.double()
        else:  # sent in the statistics dtype, summed in float64
            rows = d2bn_dist.sum_over_ranks(local, ctx.group, torch.float64)
        if ctx.joint:
            rows = rows.sum(0, keepdim=True)
        rows = rows / count.clamp(min=1).unsqueeze(1)
        dxs = []
        for i, (x, (w, mean, var, (dx, _, _))) in enumerate(zip(xs, parts)):
            if x.numel() == 0:
                dxs.append(dx)
                continue
            scale = torch.rsqrt(var + ctx.eps) * w  # w invstd, as the kernels compute it
            # [scale mean_dy, scale mean_dyx] (2, C)
            coef = rows[0 if ctx.joint else i].to(scale.dtype).view(2, -1) * scale
            # dx = scale dy - scale mean_dy - (x - mean) invstd (scale mean_dyx): the last two
            # terms in one fused pass of the inference kernel, (x - mean) invstd w' + b'
            dxs.append(dx.sub_(torch.native_batch_norm(x, coef[1], coef[0], mean, var, False, 0.0, ctx.eps)[0]))
        return (_parameter_grad(weight, parts, 1), _parameter_grad(bias, parts, 2), None, None, None, None, None, None, *dxs)


def _parameter_grad(param: Optional[torch.Tensor], parts, index: int) -> Optional[torch.Tensor]:
    """
    The gradient of a weight (``index`` 1: sum_local dy (x - mean) invstd) or bias (2:
    sum_local dy) from the parts' backward results: one row per part for an (L, C)
    parameter, their sum for a (C,) one; in the parameter's dtype. None without one.
    """
    if param is None:
        return None
    grads = [g[index] for *_, g in parts]
    grad = torch.stack(grads) if param.dim() == 2 else sum(grads[1:], grads[0])
    return grad.to(param.dtype)
