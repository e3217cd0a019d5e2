"""
Every aten op our layers dispatch, in one training step and one eval step, keeps the
contract of torch's CUDA batch-norm kernels (tests/cuda_contract.py): the class of bug a
CPU test cannot see by running the kernels, since the CPU kernels accept more.

Covered: SyncBatchNorm and LevelBatchNorm synchronized over 2 real gloo processes
(per-level and shared statistics, channels_last, a 1x1 level, affine=False, float32,
bfloat16 autocast and bfloat16 parameters), GhostBatchNorm, the RoI shuffle round trip
and PreciseBN over our norms.
"""
import pytest
import torch
from torch import nn

from d2_batchnorm.layers import GhostBatchNorm, LevelBatchNorm, SyncBatchNorm
from d2_batchnorm.layers.roi_shuffle import shuffle_rois, unshuffle_rois
from d2_batchnorm.precise_bn import update_bn_stats

from cuda_contract import CudaKernelContract

C = 4
# (N, C, H, W) of the levels: the last is 1x1, like P7 of a 128 px image
LEVEL_SHAPES = [(2, C, 4, 4), (2, C, 2, 2), (2, C, 1, 1)]


def _inputs(shapes, channels_last, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(s, generator=g) * 2 + 1).to(dtype) for s in shapes]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    return [x.requires_grad_() for x in xs]


def _step(module, xs, autocast: bool):
    """One training step (forward + backward) and one eval step of ``module`` on ``xs``."""
    module.train()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        ys = module(xs if isinstance(module, LevelBatchNorm) else xs[0])
    ys = ys if isinstance(ys, list) else [ys]
    sum(y.float().square().sum() for y in ys).backward()
    module.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        module(xs if isinstance(module, LevelBatchNorm) else xs[0])


def _norm_cases():
    """(name, module factory, input shapes) of every norm configuration checked."""
    cases = []
    for affine in (True, False):
        cases.append((f"SyncBN affine={affine}", lambda a=affine: SyncBatchNorm(C, affine=a), [(3, C, 3, 3)]))
        cases.append((f"GhostBN affine={affine}", lambda a=affine: GhostBatchNorm(C, 2, affine=a), [(4, C, 3, 3)]))
        for stats in ("per_level", "shared"):
            for sync in (None, 0):
                cases.append((
                    f"LevelBN {stats} sync={sync} affine={affine}",
                    lambda s=stats, g=sync, a=affine: LevelBatchNorm(C, len(LEVEL_SHAPES), s, sync_group_size=g, affine=a),
                    LEVEL_SHAPES,
                ))
    return cases


def _violations_of_norms():
    """Runs every norm case in every precision and layout; returns the violations found."""
    found, ops = [], set()
    for name, make, shapes in _norm_cases():
        for channels_last in (False, True):
            for precision in ("float32", "bf16 autocast", "bf16 parameters"):
                module = make()
                dtype = torch.float32
                if precision == "bf16 parameters":
                    module, dtype = module.to(torch.bfloat16), torch.bfloat16
                case = f"{name} channels_last={channels_last} {precision}"
                with CudaKernelContract() as contract:
                    try:
                        _step(module, _inputs(shapes, channels_last, dtype), precision == "bf16 autocast")
                    except RuntimeError as e:  # a failure on CPU already: reported with the rest
                        found.append(f"{case}: raised {str(e).splitlines()[0]}")
                ops |= set(contract.ops)
                found += [f"{case}: {v}" for v in contract.violations]
    return found, sorted(ops)


def _shuffle_and_precise_bn():
    """The RoI shuffle round trip and PreciseBN over our norms, under the contract."""
    with CudaKernelContract() as contract:
        x = torch.randn(5, C, 2, 2, requires_grad=True)
        y, state = shuffle_rois(x, seed=3)
        unshuffle_rois(SyncBatchNorm(C)(y), state).sum().backward()

        model = nn.Sequential(nn.Conv2d(3, C, 1), SyncBatchNorm(C), nn.ReLU(), nn.Conv2d(C, C, 1), GhostBatchNorm(C, 2))
        batches = [torch.randn(4, 3, 3, 3) for _ in range(2)]
        update_bn_stats(model, batches, num_iters=2)
    return contract.violations


def _worker():
    norms, ops = _violations_of_norms()
    return norms + _shuffle_and_precise_bn(), ops


@pytest.fixture(scope="module")
def results():
    from workers import run_workers

    return run_workers(_worker)


def test_norms_keep_the_cuda_kernels_contract(results):
    violations = sorted({v for rank_violations, _ in results for v in rank_violations})
    assert not violations, f"{len(violations)} calls break the CUDA kernels' contract:\n" + "\n".join(violations[:40])


def test_the_checks_ran_on_batch_norm_kernels(results):
    """The contract is only worth something if the layers' kernels went through the mode."""
    ops = set(results[0][1])
    assert {"native_batch_norm", "native_batch_norm_backward"} <= ops, ops


def test_the_contract_catches_what_the_cpu_kernel_accepts():
    """The recorder itself: calls the CPU kernels accept but CUDA's assert on are flagged."""
    x, dy = torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 3)
    mean, var = torch.zeros(C), torch.ones(C)
    with CudaKernelContract() as contract:
        torch.ops.aten.native_batch_norm_backward(dy, x, None, mean, var, None, None, False, 1e-5, [True, True, True])
        with pytest.raises(RuntimeError):  # the CPU kernel refuses this one too, after the check
            torch.native_batch_norm(x.bfloat16(), torch.ones(C).bfloat16(), None, mean, var, False, 0.0, 1e-5)
    text = "\n".join(contract.violations)
    assert "undefined save_mean" in text and "undefined save_invstd" in text
    assert "undefined weight" in text and "dtypes" in text
