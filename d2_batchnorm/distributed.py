"""
The one place where d2_batchnorm calls torch.distributed for its own collectives, and the
home of sync groups (the rule for their size, their creation, the group a norm reduces over).

Everything here is a no-op (or the identity) when torch.distributed is not initialized,
so callers never branch on it themselves (a group of one process still runs the sums'
collective: :func:`sum_over_ranks`).
Rank/world helpers come from :mod:`detectron2.utils.comm`; object gathers use
``comm.all_gather``. Tensors stay on their device: CPU tensors under gloo, CUDA tensors
under NCCL.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from detectron2.utils import comm

from .checks import check_int

__all__ = [
    "is_distributed",
    "group_size",
    "group_rank",
    "all_reduce_sum_",
    "all_reduce_max_",
    "sum_over_ranks",
    "GATHER_SUM_MAX_BYTES",
    "all_gather_counts",
    "differentiable_all_to_all",
    "check_sync_group_size",
    "get_sync_group",
    "active_sync_group",
]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialized and ``group`` has more than one member."""
    return _initialized() and dist.get_world_size(group) > 1


def group_size(group=None) -> int:
    """Number of processes in ``group`` (1 without torch.distributed)."""
    if not _initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    """Rank of this process inside ``group`` (0 without torch.distributed)."""
    if not _initialized():
        return 0
    return dist.get_rank(group)


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """
    Sums ``tensor`` over ``group`` in place (no autograd) and returns it. All ranks end
    with bitwise-identical values. Runs whenever torch.distributed is initialized, also for
    a group of one process (see :func:`sum_over_ranks`).
    """
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """
    The element-wise maximum of ``tensor`` over ``group``, in place (no autograd), returned;
    for a minimum, reduce the negated values (``-max(-x) = min(x)``), so that maxima and
    minima travel in ONE collective. The identity without torch.distributed.
    """
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


#: One collective gathering every rank's tensor into one output tensor: torch 2.12 named it
#: ``all_gather_single`` and deprecated ``all_gather_into_tensor``, which older releases
#: (2.11, the oldest we support) have alone.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: Sums whose gathered copies (world size x the tensor's bytes) fit in this many bytes are
#: all-gathered and added locally (one round of latency); larger ones are all-reduced.
GATHER_SUM_MAX_BYTES = 1 << 16


def sum_over_ranks(tensor: torch.Tensor, group=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """
    The sum of ``tensor`` (D, *) over the ranks of ``group`` (no autograd), accumulated in
    ``dtype`` (default: the tensor's; e.g. float32 values sent, float64 sum); all ranks
    end with bitwise-identical values. Without torch.distributed: ``tensor`` in ``dtype``.
    A group of one process still runs its collective (how ``tools/check_gpu.py`` puts the
    synchronized norms' path through NCCL on one GPU); callers with nothing to synchronize
    do not call it (the norms pass ``group=False``, :func:`active_sync_group`).

    * Small, latency-bound tensors (per-channel statistics and their gradients: W x bytes
      <= :data:`GATHER_SUM_MAX_BYTES`) are all-gathered, ONE round of latency where a ring
      all-reduce takes two (reduce-scatter, then all-gather), and every rank adds the W
      copies in rank order, at (W - 1) x the tensor's bytes per worker and in its own
      precision (the copies are converted to ``dtype`` only to be added).
    * Larger ones are converted to ``dtype`` and all-reduced (2 (W - 1) / W x the bytes of
      the converted tensor per worker).
    """
    if not _initialized():
        return tensor if dtype is None else tensor.to(dtype)
    world = dist.get_world_size(group)
    if world * tensor.nbytes > GATHER_SUM_MAX_BYTES:
        return all_reduce_sum_(tensor.to(dtype or tensor.dtype, copy=True), group)
    rows = tensor.new_empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]))
    _all_gather_single(rows, tensor.contiguous(), group=group)
    return rows.view((world,) + tuple(tensor.shape)).sum(0, dtype=dtype)


def all_gather_counts(count: int, device: torch.device, group=None) -> List[int]:
    """Every rank's ``count`` (an int), in rank order of ``group``."""
    if not is_distributed(group):
        return [int(count)]
    local = torch.tensor([int(count)], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return [int(t.item()) for t in gathered]


def differentiable_all_to_all(
    x: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group=None,
) -> torch.Tensor:
    """
    Uneven all-to-all along dim 0, with autograd.

    Args:
        x: (sum(send_counts), *F) rows, grouped by destination rank: the first
            ``send_counts[0]`` rows go to rank 0, the next ``send_counts[1]`` to rank 1, ...
        send_counts: W ints, rows sent to each rank (zeros allowed).
        recv_counts: W ints, rows received from each rank, i.e. what every other rank's
            ``send_counts`` holds for this rank.
    Returns:
        (sum(recv_counts), *F) rows grouped by source rank. The backward pass sends each
        row's gradient back to the rank it came from.
    """
    if not is_distributed(group):
        return x
    if x.shape[0] != sum(send_counts):
        raise ValueError(
            f"differentiable_all_to_all: x has {x.shape[0]} rows but send_counts sum to "
            f"{sum(send_counts)}"
        )
    out = x.new_empty((int(sum(recv_counts)),) + tuple(x.shape[1:]))
    return dist_fn.all_to_all_single(
        out,
        x.contiguous(),
        output_split_sizes=[int(c) for c in recv_counts],
        input_split_sizes=[int(c) for c in send_counts],
        group=group,
    )


_SYNC_GROUPS: Dict[int, object] = {}


def check_sync_group_size(size, world_size: Optional[int] = None, name: str = "sync_group_size") -> int:
    """
    Returns ``size`` if it is 0 (all workers) or a positive divisor of the number of workers
    ``world_size`` (default: the current one, 1 without torch.distributed); raises
    ``ValueError`` naming ``name`` otherwise. With a single worker every size >= 0 is
    accepted: synchronized norms then degrade to plain BatchNorm.
    """
    check_int(name, size, 0)
    world = comm.get_world_size() if world_size is None else world_size
    if world > 1 and size > 0 and world % size != 0:
        raise ValueError(
            f"{name} = {size!r} is not allowed; it must be 0 (all workers) or a positive "
            f"divisor of the number of workers ({world})"
        )
    return size


def get_sync_group(size: int):
    """
    The process group of ``size`` consecutive ranks that this rank belongs to, for
    synchronizing statistics over K < W workers (0 or W: the whole world, returned as
    ``None``). Every rank must call this with the same ``size`` (torch requires every rank
    to take part in creating every group); the groups are created once and cached.

    Raises:
        ValueError: see :func:`check_sync_group_size`.
    """
    world = comm.get_world_size()
    check_sync_group_size(size, world)
    if size in (0, world) or world == 1:
        return None
    if size not in _SYNC_GROUPS:
        rank, mine = comm.get_rank(), None
        for start in range(0, world, size):
            ranks = list(range(start, start + size))
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        _SYNC_GROUPS[size] = mine
    return _SYNC_GROUPS[size]


def active_sync_group(size: int):
    """
    The process group a synchronized norm with sync group size ``size`` reduces over
    (``None``: the whole world), or ``False`` when there is nothing to synchronize (no
    torch.distributed, one worker, or groups of one worker).
    """
    if not is_distributed():
        return False
    if size == 0:  # the world, the common case: no group lookup
        return None
    group = get_sync_group(size)
    return group if is_distributed(group) else False
