"""
Standard errors of BatchNorm population statistics, from the variation between sampling
units: how precisely PreciseBN's ``running_mean`` / ``running_var`` estimate the population's.

The unit. Values of one channel are not independent samples: the H x W values of an image
(and the RoIs of an image in an R-CNN head) are strongly correlated, so a per-value formula
(``std / sqrt(N H W)``) understates the error by orders of magnitude. Images are drawn
independently, so any group of whole images is a valid unit. The finest such group PreciseBN
sees for every module is **one worker's batch**: everything a module was called with in
one forward on one worker (all its calls pooled — a module reused across FPN levels is
called several times with the same images). A row of the input is an image only in the
backbone; in a head it is a RoI, whose siblings come from the same image. With
``IMS_PER_BATCH`` = 1 per worker the units are images.

The math. Unit i brings, per channel, n_i values with mean m_i and sum of squared
deviations M2_i. PreciseBN's estimates are ratio estimators over k units (Cochran,
*Sampling Techniques*, Sec. 6.4; linearization)::

    mean  = sum_i n_i m_i / n                                         n = sum_i n_i
    var   = sum_i y_i / n,    y_i = M2_i + n_i (m_i - mean)^2         (biased, population)

    SE(mean)^2 = k / (k - 1) * sum_i n_i^2 (m_i - mean)^2 / n^2
    SE(var)^2  = k / (k - 1) * sum_i n_i^2 (y_i / n_i - var)^2 / n^2

reported relative to the population standard deviation, i.e. as what they do to a
normalized value ``(x - mean) / sqrt(var + eps)``::

    rel_mean = SE(mean) / sqrt(var + eps)             (a shift of the normalized output)
    rel_std  = SE(var) / (2 (var + eps))              (~ SE(std) / std: its scale)

Accumulated without keeping the units, as float64 sums weighted by n_i^2 about per-module
shifts K (the first unit's mean) and U (its variance), with ``e_i = m_i - K`` and
``f_i = v_i + e_i^2 - U`` (``v_i = M2_i / n_i``)::

    [k, sum n^2, sum n^2 e, sum n^2 e^2, sum n^2 f, sum n^2 f^2, sum n^2 e f]

(:class:`UnitSums`). Once ``mean`` and ``var`` of all workers are known, with
``d = mean - K`` and ``g = U + d^2 - var``::

    sum n^2 (m - mean)^2       = S_ee - 2 d S_e + d^2 S_1
    sum n^2 (y / n - var)^2    = S_ff + 4 d^2 S_ee + g^2 S_1 - 4 d S_ef + 2 g S_f - 4 d g S_e

Each worker turns its own sums into these two centered sums (:meth:`UnitSums.centered`),
which add over workers (one collective); every worker then computes the same errors
(:func:`relative_errors`).
"""
from typing import Dict, NamedTuple

import torch

from .layers.batch_stats import ChannelMoments

__all__ = ["UnitSums", "RelativeErrors", "relative_errors", "largest_error", "MIN_UNITS"]

#: the fewest units a standard error is trusted from (an adaptive PreciseBN stops no earlier)
MIN_UNITS = 10


class UnitSums(NamedTuple):
    """
    One worker's sums over its units, per row (R rows: 1 for (C,) buffers, L for (L, C)):
    ``units`` and ``n2`` (R,); the shifts ``shift_mean``, ``shift_var`` and the weighted
    sums ``s_e``, ``s_ee``, ``s_f``, ``s_ff``, ``s_ef`` (R, C); float64 (module docstring).
    """

    units: torch.Tensor
    n2: torch.Tensor
    shift_mean: torch.Tensor
    shift_var: torch.Tensor
    s_e: torch.Tensor
    s_ee: torch.Tensor
    s_f: torch.Tensor
    s_ff: torch.Tensor
    s_ef: torch.Tensor

    @classmethod
    def start(cls, first: ChannelMoments) -> "UnitSums":
        """No units yet, shifted by the moments of a first unit (count (R,), mean (R, C))."""
        zeros, zero_rows = torch.zeros_like(first.mean), torch.zeros_like(first.count)
        return cls(zero_rows, zero_rows, first.mean.clone(), first.var, zeros, zeros, zeros, zeros, zeros)

    def add(self, units: ChannelMoments) -> "UnitSums":
        """These sums and k more ``units`` (count (k, R), mean and m2 (k, R, C)) together."""
        n = units.count.unsqueeze(-1)
        w = n.square()
        e = units.mean - self.shift_mean
        f = units.m2 / n.clamp(min=1) + e.square() - self.shift_var
        f = f * (n > 0)  # a unit without values adds nothing (w = 0 too)
        return self._replace(
            units=self.units + (units.count > 0).sum(0),
            n2=self.n2 + w.squeeze(-1).sum(0),
            s_e=self.s_e + (w * e).sum(0),
            s_ee=self.s_ee + (w * e.square()).sum(0),
            s_f=self.s_f + (w * f).sum(0),
            s_ff=self.s_ff + (w * f.square()).sum(0),
            s_ef=self.s_ef + (w * e * f).sum(0),
        )

    def centered(self, population: ChannelMoments) -> torch.Tensor:
        """
        (R, 2C + 1) ``[k, sum n^2 (m - mean)^2, sum n^2 (y / n - var)^2]`` about the
        ``population`` moments (all workers'): these add over workers.
        """
        d = population.mean - self.shift_mean
        g = self.shift_var + d.square() - population.var
        s1 = self.n2.unsqueeze(-1)
        mean_sq = self.s_ee - 2 * d * self.s_e + d.square() * s1
        var_sq = (self.s_ff + 4 * d.square() * self.s_ee + g.square() * s1 - 4 * d * self.s_ef
                  + 2 * g * self.s_f - 4 * d * g * self.s_e)
        return torch.cat([self.units.unsqueeze(-1), mean_sq.clamp(min=0), var_sq.clamp(min=0)], -1)


class RelativeErrors(NamedTuple):
    """Relative standard errors of one module's population statistics (module docstring)."""

    mean: torch.Tensor  # (R, C) SE(mean) / sqrt(var + eps)
    std: torch.Tensor  # (R, C) SE(var) / (2 (var + eps))
    units: torch.Tensor  # (R,) units over all workers

    def largest(self) -> float:
        """
        The largest relative error over rows, channels and both statistics; inf while a
        row has fewer than :data:`MIN_UNITS` units (too few to trust its error).
        """
        if float(self.units.min()) < MIN_UNITS:
            return float("inf")
        return float(torch.maximum(self.mean, self.std).max())


def relative_errors(centered: torch.Tensor, population: ChannelMoments, eps: float) -> RelativeErrors:
    """
    The relative standard errors of ``population`` (the moments of all workers together)
    from ``centered``, the workers' :meth:`UnitSums.centered` summed over workers; NaN in
    rows with fewer than 2 units (no variation to estimate them from).
    """
    channels = population.mean.shape[-1]
    k = centered[:, 0]
    mean_sq, var_sq = centered[:, 1 : 1 + channels], centered[:, 1 + channels :]
    scale = (k / (k - 1).clamp(min=1)).unsqueeze(-1) / population.count.clamp(min=1).unsqueeze(-1).square()
    scale = scale.masked_fill(k.unsqueeze(-1) < 2, float("nan"))
    var = population.var + eps
    return RelativeErrors((mean_sq * scale).sqrt() / var.sqrt(), (var_sq * scale).sqrt() / (2 * var), k)


def largest_error(errors: Dict[str, RelativeErrors]) -> float:
    """
    The largest :meth:`RelativeErrors.largest` over the modules that received values
    (a module no worker called has no statistics to estimate); inf if none did.
    """
    return max((e.largest() for e in errors.values() if float(e.units.max()) > 0), default=float("inf"))
