"""
Standard errors of PreciseBN's population statistics (d2_batchnorm.standard_errors) and
the adaptive stop (``update_bn_stats(..., target_rel_error=...)``), against direct
computations from the units (one worker's batch each), against the spread of the estimate
over repeated draws, and over 2 real gloo ranks.
"""
import itertools
import math

import pytest
import torch
from torch import nn

from d2_batchnorm import update_bn_stats
from d2_batchnorm.layers import LevelBatchNorm
from d2_batchnorm.precise_bn import summarize_errors
from d2_batchnorm.standard_errors import MIN_UNITS


def _images(seed, k, n=2, c=3, size=6, image_sd=2.0):
    """k batches of n images (n, c, size, size): values share a per-image offset (correlated)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, size, size, generator=g) + image_sd * torch.randn(n, c, 1, 1, generator=g) + 5
            for _ in range(k)]


def _direct(units, eps):
    """Relative SEs of the pooled mean and std from per-unit moments, written out (float64)."""
    xs = [u.double().transpose(0, 1).reshape(u.shape[1], -1) for u in units]  # (C, n_i)
    n_i = torch.tensor([x.shape[1] for x in xs], dtype=torch.float64).unsqueeze(1)
    m_i = torch.stack([x.mean(1) for x in xs])
    v_i = torch.stack([x.var(1, unbiased=False) for x in xs])
    allx = torch.cat(xs, 1)
    mean, var = allx.mean(1), allx.var(1, unbiased=False)
    k, n = len(units), n_i.sum()
    se_mean = (k / (k - 1) * (n_i**2 * (m_i - mean) ** 2).sum(0)).sqrt() / n
    se_var = (k / (k - 1) * (n_i**2 * (v_i + (m_i - mean) ** 2 - var) ** 2).sum(0)).sqrt() / n
    return se_mean / (var + eps).sqrt(), se_var / (2 * (var + eps))


def test_torch_bn_errors_equal_the_unit_formula():
    bn = nn.BatchNorm2d(3)
    data = _images(0, 12)
    res = update_bn_stats(bn, data, num_iters=12)
    mean, std = _direct(data, bn.eps)
    err = res.errors[""]
    torch.testing.assert_close(err.mean.flatten(), mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(err.std.flatten(), std, rtol=1e-6, atol=1e-9)
    assert err.units.tolist() == [12]


def test_a_bn_called_twice_per_forward_has_one_unit_per_forward():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x) + self.bn(x * 2)

    model = Twice()
    data = _images(1, 10)
    res = update_bn_stats(model, data, num_iters=10)
    # the unit of a batch holds both calls (the same images): 10 units, not 20
    units = [torch.cat([x, 2 * x]) for x in data]
    mean, std = _direct(units, 1e-5)
    assert res.errors["bn"].units.tolist() == [10]
    torch.testing.assert_close(res.errors["bn"].mean.flatten(), mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res.errors["bn"].std.flatten(), std, rtol=1e-6, atol=1e-9)


def test_per_level_rows_have_their_own_errors():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = LevelBatchNorm(3, num_levels=2, stats="per_level")

        def forward(self, levels):
            return self.norm(list(levels))

    data = list(zip(_images(2, 11), _images(3, 11, size=3, image_sd=0.5)))
    res = update_bn_stats(Head(), data, num_iters=11)
    err = res.errors["norm"]
    for level in range(2):
        mean, std = _direct([d[level] for d in data], 1e-5)
        torch.testing.assert_close(err.mean[level], mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(err.std[level], std, rtol=1e-6, atol=1e-9)


def test_error_matches_the_spread_of_the_estimate_and_a_per_value_formula_does_not():
    # population: 4 channels, strong per-image offsets; 40 draws of 30 batches of 2 images
    bn = nn.BatchNorm2d(4)
    means, predicted = [], []
    for draw in range(40):
        res = update_bn_stats(bn, _images(1000 + draw, 30, c=4), num_iters=30)
        means.append(bn.running_mean.double().clone())
        predicted.append(res.errors[""].mean.flatten() * (bn.running_var.double() + bn.eps).sqrt())
    spread = torch.stack(means).std(0)  # the actual sampling sd of the estimated mean
    se = torch.stack(predicted).mean(0)
    ratio = se / spread
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio
    # a per-value formula (sd / sqrt(all values)) would claim ~10x too small an error
    per_value = (bn.running_var.double() / (30 * 2 * 36)).sqrt()
    assert (per_value < spread / 4).all()


def test_summaries_per_group():
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    model.add_module("head", nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    res = update_bn_stats(model, _images(4, 12), num_iters=12)
    s = summarize_errors(res.errors)
    assert set(s) == {f"precise_bn/rel_error_{w}/{g}/{a}" for w in ("mean", "std") for g in ("backbone", "head")
                      for a in ("max", "median")} | {"precise_bn/rel_error/max", "precise_bn/rel_error/min_units"}
    assert s["precise_bn/rel_error/max"] == max(v for k, v in s.items() if k.endswith("/max") and "/" in k[20:])
    assert s["precise_bn/rel_error/min_units"] == 12
    assert s["precise_bn/rel_error_mean/head/median"] <= s["precise_bn/rel_error_mean/head/max"]


# ---------------------------------------------------------------- adaptive stop

def test_adaptive_stops_at_the_target_with_the_statistics_of_a_fixed_run():
    data = _images(5, 400)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    res = update_bn_stats(model, data, num_iters=400, target_rel_error=0.05)
    assert res.reached_target and MIN_UNITS <= res.num_iters < 400
    assert res.errors["1"].largest() <= 0.05
    adaptive = model[1].running_mean.clone(), model[1].running_var.clone()
    fixed = update_bn_stats(model, data, num_iters=res.num_iters)
    assert torch.equal(model[1].running_mean, adaptive[0]) and torch.equal(model[1].running_var, adaptive[1])
    assert all(torch.equal(a, b) for a, b in zip(fixed.errors["1"], res.errors["1"]))
    # a target out of reach stops at the cap
    capped = update_bn_stats(model, data, num_iters=30, target_rel_error=1e-4)
    assert capped.num_iters == 30 and not capped.reached_target


def test_adaptive_needs_min_units_and_rejects_bad_targets():
    bn = nn.BatchNorm2d(3)
    # identical batches: zero error, but no stop before MIN_UNITS units
    res = update_bn_stats(bn, itertools.repeat(_images(6, 1)[0]), num_iters=50, target_rel_error=0.5)
    assert res.reached_target and res.num_iters == MIN_UNITS
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="target_rel_error"):
            update_bn_stats(bn, _images(6, 2), num_iters=2, target_rel_error=bad)


def _two_rank_adaptive(target):
    from detectron2.utils import comm

    rank = comm.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    # different data (and different spreads) per rank
    data = _images(50 + rank, 300, image_sd=1.0 + 2 * rank)
    res = update_bn_stats(model, data, num_iters=300, target_rel_error=target)
    return res.num_iters, res.reached_target, [t.numpy() for t in res.errors["1"]], model[1].running_mean.numpy()


def _one_process_union(iters):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    # the units of both ranks, one per batch
    units = [x for pair in zip(_images(50, iters, image_sd=1.0), _images(51, iters, image_sd=3.0)) for x in pair]
    return update_bn_stats(model, units, num_iters=len(units))


def test_two_ranks_stop_together_with_identical_errors_equal_to_one_process(run_workers):
    (i0, r0, e0, m0), (i1, r1, e1, m1) = run_workers(_two_rank_adaptive, 0.05)
    assert (i0, r0) == (i1, r1) and r0 and i0 < 300
    assert all((a == b).all() for a, b in zip(e0, e1)) and (m0 == m1).all()
    one = _one_process_union(i0)
    for mine, theirs in zip(e0, one.errors["1"]):
        torch.testing.assert_close(torch.from_numpy(mine), theirs, rtol=1e-6, atol=1e-9)
