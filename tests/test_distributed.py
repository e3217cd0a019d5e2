"""d2_batchnorm.distributed with 2 real gloo processes."""
import torch

from d2_batchnorm import distributed as d


def _collectives():
    rank = d.group_rank()
    summed = d.all_reduce_sum_(torch.tensor([1.0, float(rank)], dtype=torch.float64))
    counts = d.all_gather_counts(rank + 3, torch.device("cpu"))
    # rank r sends r+1 rows to rank 0 and 2-r rows to rank 1 (rank 1 sends 1 to itself)
    send = [rank + 1, 2 - rank] if rank == 0 else [2, 1]
    recv = [[1, 2][rank], 2 if rank == 0 else 1]
    x = torch.arange(sum(send), dtype=torch.float32).add(100 * rank).unsqueeze(1).requires_grad_()
    y = d.differentiable_all_to_all(x, send, recv)
    (y * torch.arange(1, y.shape[0] + 1).unsqueeze(1)).sum().backward()
    return summed, counts, y.detach().squeeze(1).tolist(), x.grad.squeeze(1).tolist()


def _sums_over_ranks():
    """sum_over_ranks on both of its paths: all-gather (small) and all-reduce (large)."""
    rank = d.group_rank()
    # float32 values whose float32 sum rounds: 1 + 2^-30 is not a float32, but is a float64
    local = torch.tensor([[1.0, 3.0]]) if rank == 0 else torch.tensor([[2.0 ** -30, 4.0]])
    results = []
    for limit in (d.GATHER_SUM_MAX_BYTES, 0):  # 0: every tensor is "large"
        d.GATHER_SUM_MAX_BYTES, saved = limit, d.GATHER_SUM_MAX_BYTES
        try:
            results += [d.sum_over_ranks(local, dtype=torch.float64), d.sum_over_ranks(local)]
        finally:
            d.GATHER_SUM_MAX_BYTES = saved
    return results, local


def test_sum_over_ranks_gathers_small_and_reduces_large_tensors(run_workers):
    (r0, local0), (r1, _) = run_workers(_sums_over_ranks)
    for a, b in zip(r0, r1):
        assert a.dtype == b.dtype and torch.equal(a, b)  # bitwise equal on every rank
    gathered64, gathered32, reduced64, reduced32 = r0
    assert gathered64.dtype == reduced64.dtype == torch.float64
    assert gathered64.tolist() == reduced64.tolist() == [[1.0 + 2.0 ** -30, 7.0]]
    assert gathered32.dtype == reduced32.dtype == torch.float32
    assert gathered32.tolist() == reduced32.tolist() == [[1.0, 7.0]]
    assert local0.tolist() == [[1.0, 3.0]]  # the input is not modified


def test_collectives_on_two_gloo_ranks(run_workers):
    (s0, c0, y0, g0), (s1, c1, y1, g1) = run_workers(_collectives)
    assert s0.tolist() == s1.tolist() == [2.0, 1.0]
    assert c0 == c1 == [3, 4]
    # rank 0 sends [0] to itself and [1, 2] to rank 1; rank 1 sends [100, 101] to 0, [102] to 1
    assert y0 == [0.0, 100.0, 101.0]
    assert y1 == [1.0, 2.0, 102.0]
    # gradient of each row = its position (1-based) on the receiving rank
    assert g0 == [1.0, 1.0, 2.0]
    assert g1 == [2.0, 3.0, 3.0]


def _sync_group_of_world():
    return d.get_sync_group(2) is None, d.get_sync_group(1) is not None


def test_sync_groups(run_workers):
    assert run_workers(_sync_group_of_world) == [(True, True), (True, True)]


def test_sync_group_size_must_divide_world():
    import pytest

    with pytest.raises(ValueError, match=r"sync_group_size = -1 is not allowed"):
        d.get_sync_group(-1)
    with pytest.raises(ValueError, match=r"= 3 is not allowed; it must be 0 \(all workers\) or a positive divisor of the number of workers \(2\)"):
        d.check_sync_group_size(3, world_size=2)


def _tensor_result():
    return {"rank": d.group_rank(), "x": torch.full((3, 2), float(d.group_rank()))}


def test_workers_return_tensors(run_workers):
    r0, r1 = run_workers(_tensor_result)
    assert r0["rank"] == 0 and r1["rank"] == 1
    assert torch.equal(r1["x"], torch.ones(3, 2)) and torch.equal(r0["x"], torch.zeros(3, 2))
