"""
Half precision and channels_last: every norm works like ``nn.BatchNorm2d`` with
bfloat16 parameters (``model.to(torch.bfloat16)``), with bfloat16 inputs and float32
parameters (what autocast hands a BatchNorm), under ``torch.autocast``, and keeps the
channels_last memory format through forward and backward; synchronized norms in 2 real
gloo processes. References are float64 computations on the same (rounded) values.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2_batchnorm import distributed as d
from d2_batchnorm.gpu_check import randomize_affine_
from d2_batchnorm.layers import GhostBatchNorm, LevelBatchNorm, SyncBatchNorm

C = 3
CL = torch.channels_last
# "bf16 params": the model in bfloat16; "bf16 input": float32 parameters, bfloat16 input
PRECISIONS = ("float32", "bf16 params", "bf16 input")
BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # a few bfloat16 ulps of values of order 1


def _normalize64(parts, weight, bias, eps, joint=False):
    """Training-mode BN of each part (or of all parts together) in float64, with autograd."""
    flat = [p.transpose(0, 1).reshape(p.shape[1], -1) for p in parts]
    stats = [torch.cat(flat, 1)] * len(parts) if joint else flat
    outs = []
    for p, s in zip(parts, stats):
        var, mean = torch.var_mean(s, 1, correction=0)
        shape = (1, -1) + (1,) * (p.dim() - 2)
        outs.append((p - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape))
    return outs


def _prepare(module, precision):
    """(module in the precision, input dtype)."""
    if precision == "bf16 params":
        return module.to(torch.bfloat16), torch.bfloat16
    return module, torch.bfloat16 if precision == "bf16 input" else torch.float32


def _check_step(module, xs, dys, reference_parts, joint=False, channels_last=False):
    """
    Trains one step of ``module`` on ``xs`` (a list for LevelBatchNorm) and compares output,
    input and parameter gradients with the float64 reference over ``reference_parts(xs)``;
    then checks eval mode runs and keeps dtype and memory format.
    """
    level = isinstance(module, LevelBatchNorm)
    xs = [x.contiguous(memory_format=CL) if channels_last else x for x in xs]
    xs = [x.detach().requires_grad_() for x in xs]
    ys = module(xs) if level else [module(xs[0])]
    sum((y.float() * dy).sum() for y, dy in zip(ys, dys)).backward()

    w64 = module.weight.detach().double().requires_grad_()
    b64 = module.bias.detach().double().requires_grad_()
    x64 = [x.detach().double().requires_grad_() for x in xs]
    ref = _normalize64(reference_parts(x64), w64, b64, module.eps, joint)
    ref = torch.cat(ref) if not level else ref
    ref = ref if level else [ref]
    sum((r * dy.double()).sum() for r, dy in zip(ref, dys)).backward()

    tol = BF16_TOL if xs[0].dtype == torch.bfloat16 or module.weight.dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for x, y, r, x_ref in zip(xs, ys, ref, x64):
        assert y.dtype == x.dtype
        if channels_last:
            assert y.is_contiguous(memory_format=CL) and x.grad.is_contiguous(memory_format=CL)
        torch.testing.assert_close(y.double(), r.detach(), **tol)
        torch.testing.assert_close(x.grad.double(), x_ref.grad, **tol)
    assert module.weight.grad.dtype == module.weight.dtype
    torch.testing.assert_close(module.weight.grad.double(), w64.grad, **tol)
    torch.testing.assert_close(module.bias.grad.double(), b64.grad, **tol)

    module.eval()
    with torch.no_grad():
        outs = module(xs) if level else [module(xs[0])]
    for x, y in zip(xs, outs):
        assert y.dtype == x.dtype and torch.isfinite(y.float()).all()
        if channels_last:
            assert y.is_contiguous(memory_format=CL)
    module.train()


def _inputs(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(s, generator=g) * 2 + 1).to(dtype) for s in shapes]
    dys = [torch.randn(s, generator=g) for s in shapes]
    return xs, dys


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_ghost_bn(precision, channels_last):
    module, dtype = _prepare(randomize_affine_(GhostBatchNorm(C, ghost_batch_size=2)), precision)
    xs, dys = _inputs([(4, C, 3, 3)], dtype)
    _check_step(module, xs, dys, lambda x64: list(x64[0].split(2)), channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stats", ["per_level", "shared"])
def test_level_bn(stats, precision, channels_last):
    module, dtype = _prepare(randomize_affine_(LevelBatchNorm(C, 3, stats)), precision)
    xs, dys = _inputs([(2, C, 4, 4), (2, C, 2, 2), (2, C, 1, 1)], dtype)
    _check_step(module, xs, dys, lambda x64: x64, joint=stats == "shared", channels_last=channels_last)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sync_bn_single_worker(precision):
    module, dtype = _prepare(randomize_affine_(SyncBatchNorm(C)), precision)
    xs, dys = _inputs([(4, C, 3, 3)], dtype)
    _check_step(module, xs, dys, lambda x64: x64, channels_last=True)


@pytest.mark.parametrize("make", [lambda: SyncBatchNorm(C), lambda: GhostBatchNorm(C, 2)], ids=["sync", "ghost"])
def test_autocast_like_batch_norm(make):
    """Under bfloat16 autocast, conv + our norm computes what conv + nn.BatchNorm2d does."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 3, padding=1)
    ours, ref = nn.Sequential(conv, randomize_affine_(make())), nn.Sequential(conv, randomize_affine_(nn.BatchNorm2d(C)))
    x = torch.randn(2, 3, 4, 4)
    outs = []
    for net in (ours, ref):
        conv.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            y = net(x)
        y.float().square().sum().backward()
        outs.append((y.detach(), conv.weight.grad.clone(), net[1].running_var.clone()))
    (y, gw, rv), (y_ref, gw_ref, rv_ref) = outs
    assert y.dtype == y_ref.dtype == torch.bfloat16
    if isinstance(ours[1], SyncBatchNorm):  # one worker: torch's own BatchNorm, bitwise
        assert torch.equal(y, y_ref) and torch.equal(gw, gw_ref)
    else:  # ghost batches of 2 of the 2 images: the whole batch
        torch.testing.assert_close(y.float(), y_ref.float(), **BF16_TOL)
        torch.testing.assert_close(gw, gw_ref, **BF16_TOL)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- 2 real gloo processes

SIZES = (3, 2)


def _rank_inputs(dtype, level):
    shapes = [(4, 4), (2, 2), (1, 1)] if level else [(3, 3)]
    xs, dys = zip(*[_inputs([(n, C) + hw for hw in shapes], dtype, seed=10 + r) for r, n in enumerate(SIZES)])
    return xs, dys  # per rank: lists of levels


def _worker():
    out = {}
    for precision in ("bf16 params", "bf16 input"):
        for name, make in (("sync", lambda: SyncBatchNorm(C)), ("level", lambda: LevelBatchNorm(C, 3, "shared", sync_group_size=0))):
            module, dtype = _prepare(randomize_affine_(make()), precision)
            xs, dys = _rank_inputs(dtype, name == "level")
            rank = d.group_rank()
            x = [t.contiguous(memory_format=CL).requires_grad_() for t in xs[rank]]
            ys = module(x) if name == "level" else [module(x[0])]
            sum((y.float() * dy).sum() for y, dy in zip(ys, dys[rank])).backward()
            out[(precision, name)] = (
                [y.detach().float().numpy() for y in ys],
                [t.grad.float().numpy() for t in x],
                module.weight.grad.float().numpy(),
                all(y.is_contiguous(memory_format=CL) and y.dtype == dtype for y in ys),
                module.weight.detach().float().numpy(),
                module.bias.detach().float().numpy(),
            )
    return out


@pytest.fixture(scope="module")
def distributed():
    from workers import run_workers

    return run_workers(_worker)


@pytest.mark.parametrize("precision", ["bf16 params", "bf16 input"])
@pytest.mark.parametrize("name", ["sync", "level"])
def test_synchronized_half_precision_channels_last(distributed, precision, name):
    """The 2 ranks' outputs and gradients equal BN over their concatenated batch (float64)."""
    results = [r[(precision, name)] for r in distributed]
    dtype = torch.bfloat16
    xs, dys = _rank_inputs(dtype, name == "level")
    levels = len(xs[0])
    w64 = torch.as_tensor(results[0][4]).double().requires_grad_()
    b64 = torch.as_tensor(results[0][5]).double().requires_grad_()
    x64 = [torch.cat([xs[r][i] for r in range(2)]).double().requires_grad_() for i in range(levels)]
    ref = _normalize64(x64, w64, b64, 1e-5, joint=True)
    sum((r * torch.cat([dys[k][i] for k in range(2)]).double()).sum() for i, r in enumerate(ref)).backward()
    for i in range(levels):
        y = torch.cat([torch.as_tensor(r[0][i]) for r in results]).double()
        gx = torch.cat([torch.as_tensor(r[1][i]) for r in results]).double()
        torch.testing.assert_close(y, ref[i].detach(), **BF16_TOL)
        torch.testing.assert_close(gx, x64[i].grad, **BF16_TOL)
    gw = sum(torch.as_tensor(r[2]).double() for r in results)
    torch.testing.assert_close(gw, w64.grad, **BF16_TOL)
    assert all(r[3] for r in results), "outputs keep bfloat16 and channels_last"
