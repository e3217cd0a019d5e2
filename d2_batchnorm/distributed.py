"""
The one place where d2_batchnorm calls torch.distributed for its own collectives.

Everything here is a no-op (or the identity) when torch.distributed is not initialized or
the group has a single member, so callers never branch on the world size themselves.
Rank/world helpers come from :mod:`detectron2.utils.comm`; object gathers use
``comm.all_gather``. Tensors stay on their device: CPU tensors under gloo, CUDA tensors
under NCCL.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from detectron2.utils import comm

__all__ = [
    "is_distributed",
    "group_size",
    "group_rank",
    "all_reduce_sum_",
    "differentiable_all_reduce_sum",
    "all_gather_counts",
    "broadcast_",
    "differentiable_all_to_all",
    "get_sync_group",
]


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialized and ``group`` has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def group_size(group=None) -> int:
    """Number of processes in ``group`` (1 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    """Rank of this process inside ``group`` (0 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """
    Sums ``tensor`` over ``group`` in place (no autograd) and returns it. All ranks end
    with bitwise-identical values.
    """
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def differentiable_all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """
    ``y = sum_r x_r`` over the ranks of ``group``, with autograd: the gradient of each
    rank's input is the sum over ranks of the gradients of ``y``. Returns a new tensor.
    """
    if not is_distributed(group):
        return tensor
    return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def all_gather_counts(count: int, device: torch.device, group=None) -> List[int]:
    """Every rank's ``count`` (an int), in rank order of ``group``."""
    if not is_distributed(group):
        return [int(count)]
    local = torch.tensor([int(count)], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return [int(t.item()) for t in gathered]


def broadcast_(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """Overwrites ``tensor`` in place with rank ``src``'s (no autograd) and returns it."""
    if is_distributed(group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


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


def get_sync_group(size: int):
    """
    The process group of ``size`` consecutive ranks that this rank belongs to, for
    synchronizing statistics over K < W workers (0 or W: the whole world, returned as
    ``None``). Every rank must call this with the same ``size`` (torch requires every rank
    to take part in creating every group); the groups are created once and cached.

    Raises:
        ValueError: if ``size`` is negative or does not divide the world size.
    """
    world = comm.get_world_size()
    if size < 0 or (size > 0 and world % size != 0):
        raise ValueError(
            f"sync group size must be 0 (all workers) or divide the world size {world}; "
            f"got {size}"
        )
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
