"""
Cross-worker shuffling of RoI features, against information leakage through per-worker
BatchNorm statistics in R-CNN heads ("Rethinking 'Batch' in BatchNorm", Sec. 6).

With per-worker BN in a box or mask head, the RoIs a worker normalizes together come
from its own one or two images, so the batch statistics carry per-image information the
head learns to exploit; population statistics at test time take it away. Shuffling the
RoIs of all W workers with one random global permutation before the head, and restoring
the original order after it, makes each worker normalize a random sample of the whole
global batch, while everything outside the head (losses, box decoding) sees its own RoIs.

Algorithm (rank r holds n_r RoIs; N = sum_r n_r; o_r = n_0 + ... + n_{r-1}):

1. ``all_gather_counts`` gives every rank [n_0, ..., n_{W-1}] (one tiny collective, which
   any uneven all-to-all needs anyway).
2. Every rank draws the same permutation pi of {0..N-1} from a ``torch.Generator``
   seeded with a hash of (seed, call counter, counts): information all ranks already
   share, so no broadcast is needed. Global RoI g = o_s + i is local RoI i of rank s.
3. Shuffled position j in [o_d, o_d + n_d) belongs to rank d, which receives the RoI
   pi[j] there. So rank d ends with exactly n_d RoIs: shapes and the per-worker batch
   size of the head are preserved.
4. Rank s sends its RoIs, ordered by destination position pi^{-1}(o_s + i), with ONE
   uneven all-to-all; rank d reorders what it received (grouped by source) into
   position order. :func:`unshuffle_rois` runs the exact inverse (one all-to-all back).

Bytes sent per worker and iteration, for n RoIs per worker with F bytes of features in
and G bytes of head output per RoI (shuffle + unshuffle, forward + backward):
``2 * (W - 1) / W * n * (F + G)`` in expectation (a row stays local with probability
1/W), plus 8 (W - 1) bytes of counts. detectron2's reference (pad + all-gather, randperm
broadcast, all-gather again; the backward of each all-gather is an all-reduce of the
gathered tensor) sends ``3 * (W - 1) * max_r n_r * (F + G)``: ours is about
``2 / (3 W)`` of it. ``tools/bench_shuffle.py`` measures both.
"""
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from detectron2.utils.logger import log_first_n

from .. import distributed as d2bn_dist
from ..rng import derive_seed, next_shared_count

__all__ = ["RoIShuffleState", "shuffle_rois", "unshuffle_rois"]

_DEFAULT_SEED = 0x5EED_B0A7


@dataclass(frozen=True)
class RoIShuffleState:
    """
    What :func:`unshuffle_rois` needs to undo :func:`shuffle_rois` on this rank.

    Attributes:
        counts: RoIs per rank before (and after) the shuffle, in rank order.
        send_counts: rows this rank sent to each rank.
        recv_counts: rows this rank received from each rank.
        send_index: (n,) local rows in the order they were sent (grouped by destination).
        send_inverse: (n,) inverse of ``send_index``.
        recv_index: (n,) received row that lands at each shuffled local position.
        recv_inverse: (n,) inverse of ``recv_index``.
        permutation: (N,) the global permutation pi (CPU int64): shuffled global
            position j holds the RoI with global index pi[j]. ``None`` with one worker.
        group: the process group the shuffle ran over (``None``: the default group).
    """

    counts: Tuple[int, ...]
    send_counts: Tuple[int, ...] = ()
    recv_counts: Tuple[int, ...] = ()
    send_index: Optional[torch.Tensor] = None
    send_inverse: Optional[torch.Tensor] = None
    recv_index: Optional[torch.Tensor] = None
    recv_inverse: Optional[torch.Tensor] = None
    permutation: Optional[torch.Tensor] = None
    group: object = None

    @property
    def is_identity(self) -> bool:
        """True when nothing moved (a single worker)."""
        return self.permutation is None


def _check_input(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (R, ...); got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (R, ...); got a 0-dim tensor")


def _plan(counts: List[int], rank: int, permutation: torch.Tensor):
    """
    Index bookkeeping for rank ``rank``, all on CPU.

    Returns (send_index, send_counts, recv_index, recv_counts):
      * send_index: local rows ordered by their shuffled global position;
      * send_counts[d]: how many of them land on rank d;
      * recv_index[m]: which received row (grouped by source rank, each source's rows in
        position order) holds shuffled local position m;
      * recv_counts[s]: rows received from rank s.
    """
    world = len(counts)
    # position_of[g]: shuffled global position of global RoI g (pi^{-1}, the argsort of pi).
    position_of = torch.argsort(permutation)
    # owner[g]: the rank that holds global index / position g (positions use the same ranges).
    owner = torch.repeat_interleave(torch.arange(world), torch.tensor(counts))

    start, end = sum(counts[:rank]), sum(counts[:rank + 1])
    my_positions = position_of[start:end]  # destination position of each local RoI
    send_index = torch.argsort(my_positions)  # positions are unique: no ties
    send_counts = torch.bincount(owner[my_positions], minlength=world)

    sources = owner[permutation[start:end]]  # source rank of each shuffled local position
    # Received rows are grouped by source, each group in position order: a stable sort of
    # the local positions by source gives, for received row k, its local position.
    position_of_received = torch.sort(sources, stable=True).indices
    recv_index = torch.argsort(position_of_received)
    recv_counts = torch.bincount(sources, minlength=world)
    return send_index, send_counts.tolist(), recv_index, recv_counts.tolist()


def shuffle_rois(
    x: torch.Tensor, *, seed: Optional[int] = None, group=None
) -> Tuple[torch.Tensor, RoIShuffleState]:
    """
    Moves RoI features to the ranks of a random global permutation (see module docstring).

    Args:
        x: (n_r, *F) features of this rank's RoIs; n_r may differ between ranks and be 0.
            Every rank of ``group`` must call this together with the same trailing shape.
        seed: an integer shared by all ranks; ``None`` uses a per-group call counter
            (:func:`d2_batchnorm.rng.next_shared_count`), so successive calls draw
            different permutations without any broadcast.
        group: the process group to shuffle over (``None``: all workers).

    Returns:
        y: (n_r, *F) — the same number of rows as ``x``, holding a random sample of all
            workers' RoIs; differentiable (gradients flow back to the source rows).
        state: a :class:`RoIShuffleState` for :func:`unshuffle_rois`.

    With a single worker this is the identity (and warns once).
    """
    _check_input(x, "shuffle_rois: x")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"shuffle_rois: seed must be an int or None; got {seed!r}")
    if not d2bn_dist.is_distributed(group):
        log_first_n(
            logging.WARNING,
            "shuffle_rois: only one worker, so RoIs cannot be shuffled across workers; "
            "the RoI shuffle is a no-op (per-worker BN statistics as without it).",
            name=__name__,
        )
        return x, RoIShuffleState(counts=(int(x.shape[0]),), group=group)

    counts = d2bn_dist.all_gather_counts(x.shape[0], x.device, group)
    rank = d2bn_dist.group_rank(group)
    if seed is None:
        # all members of a group take part in every shuffle of that group: the counts agree
        seed = derive_seed(_DEFAULT_SEED, next_shared_count(("shuffle_rois", group)), *counts)
    else:
        seed = derive_seed(seed, -1, *counts)
    # pi (module docstring), a CPU int64 tensor: shuffled position j holds global RoI pi[j]
    permutation = torch.randperm(sum(counts), generator=torch.Generator().manual_seed(seed))
    send_index, send_counts, recv_index, recv_counts = _plan(counts, rank, permutation)

    device = x.device
    state = RoIShuffleState(
        counts=tuple(counts),
        send_counts=tuple(send_counts),
        recv_counts=tuple(recv_counts),
        send_index=send_index.to(device),
        send_inverse=torch.argsort(send_index).to(device),
        recv_index=recv_index.to(device),
        recv_inverse=torch.argsort(recv_index).to(device),
        permutation=permutation,
        group=group,
    )
    received = d2bn_dist.differentiable_all_to_all(
        x[state.send_index], send_counts, recv_counts, group=group
    )
    return received[state.recv_index], state


def unshuffle_rois(y: torch.Tensor, state: RoIShuffleState) -> torch.Tensor:
    """
    Inverse of :func:`shuffle_rois`: sends every row back to the rank and position it came
    from, with one all-to-all.

    Args:
        y: (n_r, *G) per-RoI outputs computed from the shuffled features (the trailing
            shape may differ from the shuffled input's, e.g. after the head's fc layers),
            rows in the order :func:`shuffle_rois` returned them.
        state: the state :func:`shuffle_rois` returned for this rank.
    Returns:
        (n_r, *G) rows in this rank's original RoI order; differentiable.
    """
    _check_input(y, "unshuffle_rois: y")
    if not isinstance(state, RoIShuffleState):
        raise ValueError(
            f"unshuffle_rois: state must be the RoIShuffleState returned by shuffle_rois; "
            f"got {type(state).__name__}"
        )
    if state.is_identity:
        if y.shape[0] != state.counts[0]:
            raise ValueError(
                f"unshuffle_rois: y has {y.shape[0]} rows but the shuffle had {state.counts[0]}"
            )
        return y
    expected = int(state.recv_index.shape[0])
    if y.shape[0] != expected:
        raise ValueError(
            f"unshuffle_rois: y has {y.shape[0]} rows but shuffle_rois returned {expected} "
            "rows on this rank"
        )
    returned = d2bn_dist.differentiable_all_to_all(
        y[state.recv_inverse], state.recv_counts, state.send_counts, group=state.group
    )
    return returned[state.send_inverse]
