"""
No poisoned population statistics: a batch whose statistics are not finite (a NaN or inf
value) leaves the running statistics of d2_batchnorm's norms exactly as a run without that
batch, on every path (torch's kernel EMA on one worker, the synchronized, ghost and level
paths, in 1 and 2 gloo processes), and is counted in ``num_nonfinite_batches``.
"""
import pytest
import torch

from d2_batchnorm.layers import GhostBatchNorm, LevelBatchNorm, SyncBatchNorm

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

NORMS = {
    "sync_one_worker": lambda: SyncBatchNorm(3),
    "sync_cumulative": lambda: SyncBatchNorm(3, momentum=None),
    "ghost": lambda: GhostBatchNorm(3, ghost_batch_size=2),
    "ghost_plain": lambda: GhostBatchNorm(3, ghost_batch_size=0),
    "level_per_level": lambda: LevelBatchNorm(3, 2, "per_level"),
    "level_shared": lambda: LevelBatchNorm(3, 2, "shared"),
    "level_mixed": lambda: LevelBatchNorm(3, 2, "per_level", "shared", momentum=None),
}


def _batches(seed, levels, poison=None):
    """Three training batches (4, 3, 5, 5) (a list of 2 levels for a LevelBatchNorm); ``poison``
    puts that value into one element of the second batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):
        xs = [torch.randn(4, 3, 5 - k, 5 - k, generator=g) * 2 + 1 for k in range(2 if levels else 1)]
        if i == 1 and poison is not None:
            xs[-1][1, 2, 0, 0] = poison
        out.append(xs if levels else xs[0])
    return out


def _train(norm, batches):
    norm.train()
    for x in batches:
        norm(x)
    return {k: getattr(norm, k).clone() for k in BUFFERS}


def _assert_same(a, b):
    for k in BUFFERS:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_nonfinite_batch_leaves_running_statistics_as_without_it(name, poison):
    levels = name.startswith("level")
    torch.manual_seed(0)
    guarded = NORMS[name]()
    reference = NORMS[name]()
    reference.load_state_dict(guarded.state_dict())
    with_bad = _batches(1, levels, poison)
    without = [b for i, b in enumerate(_batches(1, levels)) if i != 1]
    _assert_same(_train(guarded, with_bad), _train(reference, without))
    assert int(guarded.num_nonfinite_batches) == 1 and int(reference.num_nonfinite_batches) == 0
    assert torch.isfinite(guarded.running_mean).all() and torch.isfinite(guarded.running_var).all()


def test_nonfinite_counter_is_not_in_state_dict():
    for make in NORMS.values():
        norm = make()
        assert "num_nonfinite_batches" in dict(norm.named_buffers())
        assert not any(k.endswith("num_nonfinite_batches") for k in norm.state_dict())


def _synced_run(name):
    """In each of 2 workers: a synced norm fed 3 batches, rank 1's second one with a NaN,
    and a copy fed the two others only."""
    from detectron2.utils import comm

    rank = comm.get_rank()
    make = {
        "sync": lambda: SyncBatchNorm(3),
        "level_per_level": lambda: LevelBatchNorm(3, 2, "per_level", sync_group_size=0),
        "level_shared": lambda: LevelBatchNorm(3, 2, "shared", sync_group_size=0),
    }[name]
    levels = name.startswith("level")
    torch.manual_seed(0)
    guarded, reference = make(), make()
    reference.load_state_dict(guarded.state_dict())
    with_bad = _batches(10 + rank, levels, float("nan") if rank == 1 else None)
    without = [b for i, b in enumerate(_batches(10 + rank, levels)) if i != 1]
    return _train(guarded, with_bad), _train(reference, without), int(guarded.num_nonfinite_batches)


@pytest.mark.parametrize("name", ["sync", "level_per_level", "level_shared"])
def test_nonfinite_batch_on_one_rank_is_skipped_by_all(run_workers, name):
    ranks = run_workers(_synced_run, name)
    for guarded, reference, skipped in ranks:
        _assert_same(guarded, reference)
        assert skipped == 1
    _assert_same(ranks[0][0], ranks[1][0])  # the workers' buffers agree
