"""
d2_batchnorm.layers: SyncBatchNorm, GhostBatchNorm, LevelBatchNorm and get_norm, against
independent computations (torch's BatchNorm on the concatenated batch / per virtual
batch / per level), with 2 real gloo processes where statistics are synchronized.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2_batchnorm import distributed as d
from d2_batchnorm.gpu_check import randomize_affine_
from d2_batchnorm.layers import (
    NORM_NAMES,
    ChannelMoments,
    GhostBatchNorm,
    LevelBatchNorm,
    SyncBatchNorm,
    convert_sync_batchnorm,
    get_norm,
)

C = 4
TOL = dict(atol=1e-5, rtol=1e-5)


def _to_numpy(obj):
    """Tensors travel between processes as numpy arrays (no shared-memory handles)."""
    if torch.is_tensor(obj):
        return obj.detach().numpy()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    return obj


def _to_torch(obj):
    if hasattr(obj, "__array__") and not isinstance(obj, (list, tuple, dict)):
        return torch.as_tensor(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    return obj


def _distributed_cases():
    """Every 2-process case of this module, in ONE pair of gloo processes (spawns are slow)."""
    return _to_numpy(
        {
            "uneven": _sync_bn_worker((3, 5), True, 0, torch.float32),
            "empty_rank": _sync_bn_worker((4, 0), True, 0, torch.float32),
            "no_sync": _sync_bn_worker((3, 5), False, 0, torch.float32),
            "group_1": _sync_bn_worker((3, 5), True, 1, torch.float32),
            "fp16": _sync_bn_worker((3, 5), True, 0, torch.float16),
            "all_empty": _all_empty_worker(),
            "large_mean": _large_mean_worker(),
            "level_per_level": _level_worker((2, 3), "per_level", "per_level", True),
            "level_shared": _level_worker((2, 3), "shared", "shared", True),
        }
    )


@pytest.fixture(scope="module")
def distributed_results():
    from workers import run_workers

    results = [_to_torch(r) for r in run_workers(_distributed_cases)]
    return {key: [r[key] for r in results] for key in results[0]}


def _data(sizes, seed=0, shift=3.0, hw=(3, 5)):
    """Per-rank inputs and upstream gradients, identical on every process."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, C, *hw, generator=g) * 2 + shift for n in sizes]
    dys = [torch.randn(n, C, *hw, generator=g) for n in sizes]
    return xs, dys


def _run_bn(module, xs, dys, iters=2):
    """Trains ``module`` ``iters`` steps on inputs; returns outputs and grads of the last."""
    for _ in range(iters):
        module.zero_grad()
        x = xs.clone().requires_grad_() if torch.is_tensor(xs) else [t.clone().requires_grad_() for t in xs]
        y = module(x)
        if torch.is_tensor(y):
            (y * dys).sum().backward()
        else:
            sum((a * b).sum() for a, b in zip(y, dys)).backward()
    grads = x.grad if torch.is_tensor(x) else [t.grad for t in x]
    out = y.detach() if torch.is_tensor(y) else [t.detach() for t in y]
    return out, grads, module.weight.grad.clone(), module.bias.grad.clone()


def _reference(xs, dys):
    """BatchNorm on the concatenated batch of all ranks."""
    x, dy = torch.cat(xs), torch.cat(dys)
    bn = randomize_affine_(nn.BatchNorm2d(C))
    y, gx, gw, gb = _run_bn(bn, x, dy)
    return y, gx, gw, gb, bn.running_mean, bn.running_var


def _sync_bn_worker(sizes, sync_stats, group_size, dtype):
    rank = d.group_rank()
    xs, dys = _data(sizes)
    bn = randomize_affine_(SyncBatchNorm(C, sync_group_size=group_size))
    bn.sync_stats = sync_stats
    y, gx, gw, gb = _run_bn(bn, xs[rank].to(dtype), dys[rank].to(dtype))
    return y.float(), gx.float(), gw, gb, bn.running_mean, bn.running_var, int(bn.num_batches_tracked)


@pytest.mark.parametrize("sizes,case", [((3, 5), "uneven"), ((4, 0), "empty_rank")])
def test_sync_bn_equals_bn_on_concatenated_batch(distributed_results, sizes, case):
    results = distributed_results[case]
    ry, rgx, rgw, rgb, rmean, rvar = _reference(*_data(sizes))
    y = torch.cat([r[0] for r in results])
    gx = torch.cat([r[1] for r in results])
    torch.testing.assert_close(y, ry, **TOL)
    torch.testing.assert_close(gx, rgx, **TOL)
    # each worker holds its share of the weight gradient; DDP sums them
    torch.testing.assert_close(sum(r[2] for r in results), rgw, **TOL)
    torch.testing.assert_close(sum(r[3] for r in results), rgb, **TOL)
    for r in results:
        torch.testing.assert_close(r[4], rmean, **TOL)
        torch.testing.assert_close(r[5], rvar, **TOL)
        assert r[6] == 2


def test_sync_bn_per_worker_modes(distributed_results):
    """sync_stats=False and sync groups of one worker are plain per-worker BN."""
    xs, dys = _data((3, 5))
    for results in (distributed_results["no_sync"], distributed_results["group_1"]):
        for rank, r in enumerate(results):
            ry, rgx, rgw, rgb, rmean, rvar = _reference([xs[rank]], [dys[rank]])
            torch.testing.assert_close(r[0], ry, **TOL)
            torch.testing.assert_close(r[1], rgx, **TOL)
            torch.testing.assert_close(r[2], rgw, **TOL)
            torch.testing.assert_close(r[4], rmean, **TOL)
            torch.testing.assert_close(r[5], rvar, **TOL)


def test_sync_bn_fp16_is_upcast(distributed_results):
    results = distributed_results["fp16"]
    xs, dys = _data((3, 5))
    ry, *_ = _reference([x.half().float() for x in xs], [dy.half().float() for dy in dys])
    torch.testing.assert_close(torch.cat([r[0] for r in results]), ry, atol=1e-2, rtol=1e-2)


def _all_empty_worker():
    bn = SyncBatchNorm(C)
    x = torch.zeros(0, C, 3, 3, requires_grad=True)
    bn(x).sum().backward()
    return bn.running_mean.clone(), bn.running_var.clone(), bn.weight.grad.clone()


def _large_mean_data():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, C, 4, 4, generator=g) * 1e-2 + 1e3 for n in (3, 2)]


def _large_mean_grads():
    g = torch.Generator().manual_seed(6)
    return [torch.randn(n, C, 4, 4, generator=g) for n in (3, 2)]


def _large_mean_worker():
    bn = randomize_affine_(SyncBatchNorm(C))
    x = _large_mean_data()[d.group_rank()].requires_grad_()
    y = bn(x)
    (y * _large_mean_grads()[d.group_rank()]).sum().backward()
    return y.detach(), bn.running_var.clone(), x.grad, bn.weight.grad


def test_sync_bn_is_precise_when_mean_dominates(distributed_results):
    """|mean| / std = 1e5 in float32: E[x^2] - E[x]^2 would lose every digit of the variance."""
    x = torch.cat(_large_mean_data()).double().requires_grad_()
    ref = randomize_affine_(nn.BatchNorm2d(C)).double()
    y = ref(x)
    (y * torch.cat(_large_mean_grads()).double()).sum().backward()
    results = distributed_results["large_mean"]
    # the float32 mean is off by up to half an ulp of 1e3 (3e-5 = 3e-3 std): that bounds the
    # output (w < 1.5) and the input gradient (relative to its largest value)
    torch.testing.assert_close(torch.cat([r[0] for r in results]).double(), y.detach(), atol=6e-3, rtol=0)
    gx = torch.cat([r[2] for r in results]).double()
    assert (gx - x.grad).abs().max() < 2e-3 * x.grad.abs().max()
    torch.testing.assert_close(sum(r[3] for r in results).double(), ref.weight.grad, atol=0, rtol=1e-2)
    for r in results:
        torch.testing.assert_close(r[1].double(), ref.running_var, rtol=1e-4, atol=0)


def test_sync_bn_global_empty_batch_skips_update(distributed_results):
    for mean, var, gw in distributed_results["all_empty"]:
        assert torch.equal(mean, torch.zeros(C)) and torch.equal(var, torch.ones(C))
        assert torch.equal(gw, torch.zeros(C))


def test_sync_bn_single_process_is_plain_bn():
    xs, dys = _data((6,))
    bn, ref = randomize_affine_(SyncBatchNorm(C, sync_group_size=2)), randomize_affine_(nn.BatchNorm2d(C))
    a, b = _run_bn(bn, xs[0], dys[0]), _run_bn(ref, xs[0], dys[0])
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(bn.running_var, ref.running_var)
    bn.eval(), ref.eval()
    assert torch.equal(bn(xs[0]), ref(xs[0]))
    # 1-D (N, C) and 3-D (N, C, D, H, W) inputs
    for shape in ((7, C), (2, C, 3, 2, 2)):
        bn.train()
        x = torch.randn(shape)
        torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, bn.weight, bn.bias, True, eps=bn.eps))


def test_sync_bn_precision_with_large_mean():
    """Centered moments keep the variance exact when |mean| >> std (naive E[x^2] fails)."""
    x = torch.randn(4, C, 8, 8, dtype=torch.float64) * 1e-2 + 1e3
    bn = SyncBatchNorm(C).double()
    ref = nn.BatchNorm2d(C).double()
    torch.testing.assert_close(bn(x), ref(x))
    # the float32 statistics of the synchronized norms: moments -> power sums -> moments
    var = ChannelMoments.from_power_sums(ChannelMoments.of(x.float()).power_sums()).var[0]
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), correction=0), rtol=1e-3, atol=0)


def test_convert_sync_batchnorm_keeps_state():
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.SyncBatchNorm(C))
    model[1].running_mean.fill_(2.0)
    weight = model[1].weight
    model = convert_sync_batchnorm(model, sync_group_size=0)
    assert type(model[1]) is SyncBatchNorm
    assert model[1].weight is weight and torch.equal(model[1].running_mean, torch.full((C,), 2.0))
    assert model[1](torch.randn(2, C, 2, 2)).shape == (2, C, 2, 2)  # CPU works


def test_ghost_bn_equals_bn_per_virtual_batch():
    xs, dys = _data((6,))
    x, dy = xs[0], dys[0]
    ghost = randomize_affine_(GhostBatchNorm(C, ghost_batch_size=2))
    y, gx, gw, gb = _run_bn(ghost, x, dy)
    ref = [randomize_affine_(nn.BatchNorm2d(C)) for _ in range(3)]
    outs = [_run_bn(bn, x[2 * i : 2 * i + 2], dy[2 * i : 2 * i + 2]) for i, bn in enumerate(ref)]
    torch.testing.assert_close(y, torch.cat([o[0] for o in outs]), **TOL)
    torch.testing.assert_close(gx, torch.cat([o[1] for o in outs]), **TOL)
    torch.testing.assert_close(gw, sum(o[2] for o in outs), **TOL)
    torch.testing.assert_close(gb, sum(o[3] for o in outs), **TOL)
    # population statistics: those of the whole batch, as plain BN would track them
    *_, rmean, rvar = _reference([x], [dy])
    torch.testing.assert_close(ghost.running_mean, rmean, **TOL)
    torch.testing.assert_close(ghost.running_var, rvar, **TOL)
    ghost.eval()
    torch.testing.assert_close(
        ghost(x), F.batch_norm(x, rmean, rvar, ghost.weight, ghost.bias, False, eps=ghost.eps), **TOL
    )


def test_ghost_bn_bad_divisor():
    with pytest.raises(ValueError, match="does not divide the batch size 5"):
        GhostBatchNorm(C, ghost_batch_size=2)(torch.randn(5, C, 2, 2))
    with pytest.raises(ValueError, match=r"ghost_batch_size = -1 is not allowed; it must be an integer >= 0"):
        GhostBatchNorm(C, ghost_batch_size=-1)


def _levels(sizes, seed=0):
    """Per-rank lists of 3 FPN levels (N, C, H_i, W_i) and upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 6), (3, 3), (2, 1)]
    xs = [[torch.randn(n, C, *hw, generator=g) * (i + 1) + i for i, hw in enumerate(shapes)] for n in sizes]
    dys = [[torch.randn(n, C, *hw, generator=g) for hw in shapes] for n in sizes]
    return xs, dys


def _flat(t):
    """(N, C, H, W) -> (1, C, N*H*W): every value of the level as one batch of values."""
    return t.transpose(0, 1).reshape(1, C, -1)


def _level_reference(xs, dys, stats, population):
    """BN over each level (per_level) or over the concatenation of all levels (shared)."""
    levels = [torch.cat([x[i] for x in xs]) for i in range(3)]
    grads = [torch.cat([dy[i] for dy in dys]) for i in range(3)]
    out = {}
    for mode in {stats, population}:
        if mode == "per_level":
            bns = [randomize_affine_(nn.BatchNorm1d(C)) for _ in range(3)]
            res = [_run_bn(bn, _flat(x), _flat(dy)) for bn, x, dy in zip(bns, levels, grads)]
            out[mode] = (
                [r[0] for r in res], [r[1] for r in res], sum(r[2] for r in res),
                torch.stack([bn.running_mean for bn in bns]), torch.stack([bn.running_var for bn in bns]),
            )
        else:
            bn = randomize_affine_(nn.BatchNorm1d(C))
            cat = torch.cat([_flat(x) for x in levels], dim=2)
            dcat = torch.cat([_flat(dy) for dy in grads], dim=2)
            y, gx, gw, _ = _run_bn(bn, cat, dcat)
            splits = [_flat(x).shape[2] for x in levels]
            out[mode] = (list(y.split(splits, 2)), list(gx.split(splits, 2)), gw, bn.running_mean, bn.running_var)
    y, gx, gw = out[stats][:3]
    return y, gx, gw, out[population][3], out[population][4]


def _unflat(t, like):
    return t.reshape(C, like.shape[0], *like.shape[2:]).transpose(0, 1)


def _level_worker(sizes, stats, population, sync):
    xs, dys = _levels(sizes)
    rank = d.group_rank()
    norm = randomize_affine_(LevelBatchNorm(C, 3, stats, population, sync_group_size=0 if sync else None))
    y, gx, gw, _ = _run_bn(norm, xs[rank], dys[rank])
    return y, gx, gw, norm.running_mean, norm.running_var


def _check_levels(results, xs, dys, stats, population):
    ry, rgx, rgw, rmean, rvar = _level_reference(xs, dys, stats, population)
    for i in range(3):
        level = torch.cat([x[i] for x in xs])
        torch.testing.assert_close(torch.cat([r[0][i] for r in results]), _unflat(ry[i], level), **TOL)
        torch.testing.assert_close(torch.cat([r[1][i] for r in results]), _unflat(rgx[i], level), **TOL)
    torch.testing.assert_close(sum(r[2] for r in results), rgw, **TOL)
    for r in results:
        torch.testing.assert_close(r[3], rmean, **TOL)
        torch.testing.assert_close(r[4], rvar, **TOL)


@pytest.mark.parametrize(
    "stats,population",
    [("per_level", "per_level"), ("shared", "shared"), ("per_level", "shared"), ("shared", "per_level")],
)
def test_level_norm_single_process(stats, population):
    """per_level: separate BNs per level; shared: BN over the concatenation of all levels."""
    xs, dys = _levels((5,))
    _check_levels([_level_worker((5,), stats, population, False)], xs, dys, stats, population)


def test_level_norm_synchronized(distributed_results):
    for stats in ("per_level", "shared"):
        results = distributed_results["level_" + stats]
        xs, dys = _levels((2, 3))
        _check_levels(results, xs, dys, stats, stats)


def test_level_norm_inference_and_affine_per_level():
    xs, _ = _levels((4,))
    norm = LevelBatchNorm(C, 3, "per_level", share_affine=False)
    assert norm.weight.shape == (3, C) and norm.running_mean.shape == (3, C)
    norm(xs[0])
    norm.eval()
    for i, (x, y) in enumerate(zip(xs[0], norm(xs[0]))):
        ref = F.batch_norm(x, norm.running_mean[i], norm.running_var[i], norm.weight[i], norm.bias[i], False)
        torch.testing.assert_close(y, ref)
    shared = LevelBatchNorm(C, 3, "per_level", "shared")
    assert shared.running_mean.shape == (C,)
    shared(xs[0])
    shared.eval()
    torch.testing.assert_close(shared(xs[0])[2], F.batch_norm(xs[0][2], shared.running_mean, shared.running_var, shared.weight, shared.bias, False))


def test_level_norm_bad_input():
    with pytest.raises(ValueError, match=r"^stats = 'joint' is not allowed; allowed values: \['per_level', 'shared'\]"):
        LevelBatchNorm(C, 3, "joint")
    with pytest.raises(ValueError, match=r"^population_stats = 'levels' is not allowed; allowed values"):
        LevelBatchNorm(C, 3, "shared", "levels")
    with pytest.raises(ValueError, match="list of num_levels = 3 tensors"):
        LevelBatchNorm(C, 3)([torch.randn(2, C, 2, 2)] * 2)


def test_get_norm_names():
    for name in NORM_NAMES:
        module = get_norm(name, 32)
        assert (module is None) == (name == "")
    assert isinstance(get_norm("SyncBN", 8, sync_group_size=2), SyncBatchNorm)
    assert get_norm("GhostBN", 8, ghost_batch_size=2).ghost_batch_size == 2
    assert isinstance(get_norm(lambda c: nn.GroupNorm(2, c), 8), nn.GroupNorm)
    with pytest.raises(ValueError, match=r"'SynBN' is not allowed; allowed values: \[.*'SyncBN'.*'GhostBN'\]"):
        get_norm("SynBN", 8)


def test_level_norm_affine_per_level_equals_separate_bns():
    xs, dys = _levels((4,))
    norm = LevelBatchNorm(C, 3, "per_level", share_affine=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(3, C, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(3, C, generator=g))
    y, gx, gw, gb = _run_bn(norm, xs[0], dys[0])
    for i in range(3):
        bn = nn.BatchNorm2d(C)
        with torch.no_grad():
            bn.weight.copy_(norm.weight[i])
            bn.bias.copy_(norm.bias[i])
        ry, rgx, rgw, rgb = _run_bn(bn, xs[0][i], dys[0][i])
        torch.testing.assert_close(y[i], ry, **TOL)
        torch.testing.assert_close(gx[i], rgx, **TOL)
        torch.testing.assert_close(gw[i], rgw, **TOL)
        torch.testing.assert_close(gb[i], rgb, **TOL)
        torch.testing.assert_close(norm.running_var[i], bn.running_var, **TOL)


@pytest.mark.parametrize("momentum", [0.01, 0.5])
def test_set_ema_momentum_sets_every_batch_norm_and_the_ema_follows_it(momentum):
    from detectron2.layers.batch_norm import FrozenBatchNorm2d, NaiveSyncBatchNorm

    from d2_batchnorm.layers import set_ema_momentum

    norms = [nn.BatchNorm2d(C), SyncBatchNorm(C), GhostBatchNorm(C, ghost_batch_size=2), NaiveSyncBatchNorm(C)]
    model = nn.Sequential(*norms, FrozenBatchNorm2d(C), nn.GroupNorm(2, C))
    assert set_ema_momentum(model, momentum) == len(norms)
    x = torch.randn(4, C, 3, 3) * 3 + 2
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = x.var(dim=(0, 2, 3), unbiased=True)
    for norm in norms[:2]:  # one batch, one update: running = (1 - m) running + m batch
        norm(x)
        torch.testing.assert_close(norm.running_mean, momentum * batch_mean, **TOL)
        torch.testing.assert_close(norm.running_var, (1 - momentum) + momentum * batch_var, **TOL)
    for norm in norms[2:]:
        assert norm.momentum == momentum
