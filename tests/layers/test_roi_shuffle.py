"""
Tests of d2_batchnorm.layers.roi_shuffle in real 2- and 3-process gloo groups.

Every RoI is tagged with (source rank, local index), so the tests check the data movement
independently of the code's own bookkeeping: the union of the shuffled rows over all ranks
must be every RoI exactly once, per-rank counts must be preserved, and unshuffling must
return each rank's rows in their original order, with their gradients.
"""
import collections

import pytest
import torch

from d2_batchnorm.layers.roi_shuffle import RoIShuffleState, shuffle_rois, unshuffle_rois

# RoIs per rank, uneven and with an empty rank.
COUNTS_2 = [7, 0]
COUNTS_3 = [5, 0, 9]


def _tagged(rank, n, width=3):
    """(n, width, 2, 2) features whose entries encode (rank, index) uniquely."""
    tag = rank * 1000.0 + torch.arange(n, dtype=torch.float64)
    x = tag.view(n, 1, 1, 1).expand(n, width, 2, 2).clone()
    x += torch.arange(width, dtype=torch.float64).view(1, width, 1, 1) * 0.001
    return x


def _shuffle_roundtrip(counts, seed):
    from detectron2.utils import comm

    rank = comm.get_rank()
    x = _tagged(rank, counts[rank]).requires_grad_(True)
    y, state = shuffle_rois(x, seed=seed)
    # a per-RoI "head" whose output shape differs from its input's, as after fc layers
    z = y.flatten(1)[:, :5] * 2.0
    out = unshuffle_rois(z, state)
    weights = torch.arange(out.numel(), dtype=torch.float64).view_as(out) + 1.0
    (out * weights).sum().backward()
    # Tensors cross the process boundary as numpy arrays (torch's shared-memory pickling
    # does not outlive the worker).
    return {
        "x": x.detach().numpy(),
        "y": y.detach().numpy(),
        "out": out.detach().numpy(),
        "grad": x.grad.numpy(),
        "weights": weights.numpy(),
        "permutation": state.permutation.numpy(),
        "counts": state.counts,
    }


def _as_tensors(results):
    return [{k: torch.as_tensor(v) if hasattr(v, "dtype") else v for k, v in r.items()} for r in results]


@pytest.mark.parametrize("counts", [COUNTS_2, [4, 6]])
def test_roundtrip_is_identity_on_values_and_gradients(run_workers, counts):
    results = _as_tensors(run_workers(_shuffle_roundtrip, counts, 11, world_size=2))
    for rank, r in enumerate(results):
        assert r["y"].shape == r["x"].shape, "per-rank counts must be preserved"
        expected = r["x"].flatten(1)[:, :5] * 2.0
        assert torch.equal(r["out"], expected)
        # d/dx of sum(2 * x[:, :5] * w): 2 * w on the first 5 flattened entries, 0 elsewhere
        grad = torch.zeros_like(r["x"]).flatten(1)
        grad[:, :5] = 2.0 * r["weights"]
        assert torch.equal(r["grad"], grad.view_as(r["x"]))


def test_three_workers_with_an_empty_one(run_workers):
    results = _as_tensors(run_workers(_shuffle_roundtrip, COUNTS_3, 5, world_size=3))
    _check_bijection(results, COUNTS_3)
    for r in results:
        assert torch.equal(r["out"], r["x"].flatten(1)[:, :5] * 2.0)


def _check_bijection(results, counts):
    every = torch.cat([r["x"][:, 0, 0, 0] for r in results]).sort().values
    received = torch.cat([r["y"][:, 0, 0, 0] for r in results])
    assert [r["y"].shape[0] for r in results] == counts
    assert torch.equal(received.sort().values, every), "every RoI exactly once"
    return received


def test_rois_cross_workers_and_permutation_is_shared(run_workers):
    counts = [40, 40]
    results = _as_tensors(run_workers(_shuffle_roundtrip, counts, 3, world_size=2))
    received = _check_bijection(results, counts)
    assert torch.equal(results[0]["permutation"], results[1]["permutation"])
    assert results[0]["counts"] == results[1]["counts"] == (40, 40)
    # Independent reading of the permutation: global id g = o_s + i has tag s*1000 + i,
    # and shuffled position j (rank 0: 0..39, rank 1: 40..79) must hold RoI pi[j].
    tags = torch.tensor([1000.0 * (g // 40) + g % 40 for g in range(80)], dtype=torch.float64)
    assert torch.equal(received, tags[results[0]["permutation"]])
    # RoIs actually moved: each rank holds RoIs of the other (20 expected of 40).
    for rank, r in enumerate(results):
        from_other = (r["y"][:, 0, 0, 0] // 1000 != rank).sum().item()
        assert 5 <= from_other <= 35


def _successive_shuffles(n):
    from detectron2.utils import comm

    x = _tagged(comm.get_rank(), n)
    perms = []
    for _ in range(3):
        _, state = shuffle_rois(x)
        perms.append(state.permutation.numpy())
    return perms


def test_successive_calls_draw_new_permutations_identically_on_all_ranks(run_workers):
    a, b = run_workers(_successive_shuffles, 30, world_size=2)
    a, b = [torch.as_tensor(p) for p in a], [torch.as_tensor(p) for p in b]
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])


def test_single_worker_is_a_noop_with_one_warning(caplog, monkeypatch):
    # the warning is detectron2's log_first_n: count from a fresh counter (other tests may have warned)
    monkeypatch.setattr("detectron2.utils.logger._LOG_COUNTER", collections.Counter())
    x = torch.randn(4, 3, requires_grad=True)
    with caplog.at_level("WARNING"):
        y, state = shuffle_rois(x)
        y2, _ = shuffle_rois(x)
    assert y is x and y2 is x and state.is_identity
    assert unshuffle_rois(y, state) is y
    assert sum("no-op" in rec.getMessage() for rec in caplog.records) == 1


def test_bad_input():
    with pytest.raises(ValueError, match="torch.Tensor"):
        shuffle_rois([1, 2, 3])
    with pytest.raises(ValueError, match="0-dim"):
        shuffle_rois(torch.tensor(1.0))
    with pytest.raises(ValueError, match="seed"):
        shuffle_rois(torch.zeros(2, 3), seed="abc")
    with pytest.raises(ValueError, match="RoIShuffleState"):
        unshuffle_rois(torch.zeros(2, 3), {"counts": (2,)})
    with pytest.raises(ValueError, match="rows"):
        unshuffle_rois(torch.zeros(3, 3), RoIShuffleState(counts=(2,)))
