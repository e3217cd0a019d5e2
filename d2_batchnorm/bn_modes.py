"""
Which statistics the BatchNorm modules of a model normalize with, whatever
``model.train()`` / ``model.eval()`` set:

* :func:`force_bn_mode` — every forward of the BN modules runs in the given mode
  (``training=False``: FrozenBN, population statistics with the affine still learned;
  ``training=True``: mini-batch statistics at inference);
* :func:`mini_batch_statistics` — inference with each test batch's own statistics;
* :data:`TEST_BN_STATS` and :func:`inference_statistics` — the values of ``TEST.BN_STATS``
  and the context each selects;
* :data:`EMA_ACROSS_WORKERS` and :func:`average_running_statistics` — the values of
  ``BN.EMA_ACROSS_WORKERS`` and the averaging of running statistics over workers.

A norm that synchronizes statistics across workers has a bool attribute ``sync_stats``
(d2_batchnorm's ``SyncBatchNorm`` and ``LevelBatchNorm``; a custom norm may follow the
same protocol); :func:`mini_batch_statistics` turns it off.
"""
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .checks import check_choice
from .distributed import group_size, sum_over_ranks
from .module_state import saved_bn_state
from .precise_bn import get_bn_modules

__all__ = [
    "TEST_BN_STATS", "EMA_ACROSS_WORKERS", "force_bn_mode", "inference_statistics", "mini_batch_statistics",
    "average_running_statistics",
]

#: the values of ``TEST.BN_STATS``: population (running) statistics, or each test batch's own
TEST_BN_STATS = ("population", "mini_batch")

#: the values of ``BN.EMA_ACROSS_WORKERS``: the running statistics of per-worker BN averaged
#: over workers before a checkpoint or an evaluation reads them, or each worker's own
#: (detectron2: DDP without buffer broadcast, so each rank evaluates with its own statistics
#: and a checkpoint holds rank 0's)
EMA_ACROSS_WORKERS = ("average", "per_worker")


@contextmanager
def force_bn_mode(model: nn.Module, training: bool, modules: Optional[List[_BatchNorm]] = None):
    """
    Within the block, every forward of each BN module of ``model`` (or of ``modules``) runs
    with ``module.training = training``, whatever ``model.train()`` / ``model.eval()``
    set: a forward pre-hook sets the flag and a forward hook puts the caller's value back,
    so the flag seen from outside (and by :func:`d2_batchnorm.update_bn_stats`) is
    unchanged. Yields the modules.
    """
    if modules is None:
        modules = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved: Dict[int, bool] = {}

    def pre(module, args):
        saved[id(module)] = module.training
        module.training = training

    def post(module, args, output):
        module.training = saved.pop(id(module), module.training)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        yield modules
    finally:
        for h in handles:
            h.remove()


@contextmanager
def mini_batch_statistics(model: nn.Module):
    """
    Inference with mini-batch statistics: within the block every BN module of ``model``
    normalizes each batch by that batch's own per-channel statistics, also under
    ``model.eval()`` (which detectron2's ``inference_on_dataset`` calls). Synchronized norms
    (``sync_stats``) compute per-worker statistics — workers see different numbers of test
    batches, so syncing could deadlock. Running buffers, ``sync_stats`` and modes are
    restored when the block ends.
    """
    syncs = [(m, m.sync_stats) for m in model.modules() if hasattr(m, "sync_stats")]
    with saved_bn_state(model) as restore_buffers:  # both: every BN module of model
        for m, _ in syncs:
            m.sync_stats = False
        try:
            with force_bn_mode(model, True):
                yield
        finally:
            restore_buffers()
            for m, value in syncs:
                m.sync_stats = value


def inference_statistics(model: nn.Module, mode: str):
    """
    The context in which ``model`` is evaluated with ``TEST.BN_STATS = mode``: nothing for
    "population", :func:`mini_batch_statistics` for "mini_batch".
    """
    check_choice("mode", mode, TEST_BN_STATS)
    return mini_batch_statistics(model) if mode == "mini_batch" else nullcontext()


def average_running_statistics(model: nn.Module) -> int:
    """
    Replaces ``running_mean`` and ``running_var`` (C,) of every BN module of ``model`` in
    training mode that tracks running statistics (``precise_bn.get_bn_modules``) by their
    mean over all workers, in one collective of float64 sums: every rank ends with the same
    buffers. Every rank must call it. Returns the number of modules (0, and nothing
    communicated, for one worker).

    The running statistics are linear in the batch statistics, ``r_t = (1 - m) r_{t-1} +
    m b_t`` with the same ``m`` on every rank, so averaging at any iteration gives exactly
    what averaging after every step would: the EMA over iterations of the workers' mean
    batch mean and mean (within-worker) batch variance, the variance per-worker BN
    normalizes with in training. Synchronized norms hold the same buffers on every rank
    already and come out unchanged up to rounding.
    """
    buffers = [b for _, m in get_bn_modules(model) for b in (m.running_mean, m.running_var)]
    world_size = group_size()
    if world_size == 1 or not buffers:
        return 0
    mean = sum_over_ranks(torch.cat([b.flatten() for b in buffers]), dtype=torch.float64) / world_size
    for b, value in zip(buffers, mean.split([b.numel() for b in buffers])):
        b.copy_(value.view_as(b))
    return len(buffers) // 2
