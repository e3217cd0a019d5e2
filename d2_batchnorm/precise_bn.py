"""
Precise population statistics for BatchNorm ("PreciseBN"), exact across workers.

During training a BN layer keeps an exponential moving average (EMA) of per-batch
statistics, computed with weights that kept changing. :func:`update_bn_stats` freezes the
weights, runs the model in training mode over a number of batches, and replaces every BN's
``running_mean`` / ``running_var`` by the statistics of *all* samples it saw, on all
workers together ("Rethinking 'Batch' in BatchNorm", Wu & Johnson 2021, Sec. 3 and
appendix).

The math. A call of a BN module with input ``x`` of shape (N, C, *) contributes, per
channel, ``n = N * prod(*)`` samples summarized as float64 moments (count, mean, sum of
squared deviations ``M2``), which merge exactly with Chan et al.'s formulas
(:class:`d2_batchnorm.layers.batch_stats.ChannelMoments`). At the end every rank's moments
are placed in its own row of a (world_size, K) zero tensor, ONE all-reduce (sum) gathers
the rows on every rank, and every rank merges the rows in rank order — the same float64
operations on the same numbers, so all ranks end with bitwise-identical buffers::

    running_mean = mean        running_var = M2 / n     (population / biased variance)

which is what fvcore's ``update_bn_stats`` stores on one process.

Which modules: every ``torch.nn.modules.batchnorm._BatchNorm`` in training mode (BN1d/2d/
3d, ``nn.SyncBatchNorm``, detectron2's ``NaiveSyncBatchNorm``, the modules of a
``CycleBatchNormList``, d2_batchnorm's norms). Frozen BN and BN in eval mode are untouched.
Statistics are those of each call's local *input* (its first positional argument), so
synchronized norms are not counted once per worker: custom and synchronized norms are
measured from the input by a forward pre-hook; torch's own per-process BN, run with
momentum 1.0, already holds exactly its input's batch statistics in its buffers after the
call, and a forward hook reads them there (saving a second pass over the activations).
A module whose ``running_mean`` has shape (L, C) receives a list of L tensors per call;
tensor i pools into row i (per-level statistics of a head shared across L feature levels).
"""
import logging
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed as dist_utils
from .checks import check_int
from .layers.batch_stats import ChannelMoments

__all__ = ["update_bn_stats", "get_bn_modules", "count_samples", "saved_bn_state", "PreciseBNResult"]

logger = logging.getLogger(__name__)

_END = object()  # what next() returns once a data loader has ended


class PreciseBNResult(NamedTuple):
    """What :func:`update_bn_stats` did (identical on every rank)."""

    num_iters: int  # batches used (per worker)
    num_samples: int  # images (or tensor rows) used, all workers together
    num_modules: int  # BN modules whose statistics were replaced
    seconds: float  # wall time of the whole update on this rank
    uncalled: Tuple[str, ...]  # names of BN modules in training mode that were never called


def get_bn_modules(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """
    ``(name, module)`` of every ``_BatchNorm`` of ``model`` in training mode that tracks
    running statistics, in ``named_modules`` order. A DDP wrapper is looked through.
    """
    model = _unwrap(model)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]


def count_samples(batch: Any) -> int:
    """
    Number of images in one batch of a data loader:

    * a Tensor (N, ...): N;
    * a list/tuple of dicts (detectron2's batches): its length;
    * a list/tuple whose first element is a Tensor, e.g. ``(images, targets)``: that
      tensor's N;
    * a dict: the first Tensor value's N;
    * anything else with a length: its length.
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, (list, tuple)):
        if len(batch) > 0 and isinstance(batch[0], torch.Tensor):
            return count_samples(batch[0])
        return len(batch)
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return count_samples(v)
    try:
        return len(batch)
    except TypeError:
        raise ValueError(
            f"cannot count the images of a batch of type {type(batch).__name__}; batches must "
            "be a Tensor, a list/tuple (of dicts or starting with a Tensor) or a dict"
        ) from None


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, else ``model``."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _reads_own_statistics(m: _BatchNorm) -> bool:
    """
    True for torch's own per-process BN (BatchNorm1d/2d/3d and subclasses that keep
    ``_BatchNorm.forward``) with (C,) float32/float64 buffers: its training forward already
    computes the input's batch statistics, and with momentum 1.0 it leaves exactly those in
    ``running_mean`` / ``running_var`` (unbiased), so a forward hook reads them instead of
    reducing the input a second time. Synchronized and custom norms (own ``forward``) are
    measured from their input.
    """
    return (
        type(m).forward is _BatchNorm.forward
        and m.running_mean.dim() == 1
        and m.running_mean.dtype in (torch.float32, torch.float64)
    )


class _StatisticsRecorder:
    """
    Within its ``with`` block, records the statistics of every call's input of the
    statistics modules: one float64 :class:`ChannelMoments` per module, with one row per
    row of its buffers (tensor i of a list input pools into row i of (L, C) buffers). Modules of
    :func:`_reads_own_statistics` run with momentum 1.0 (restored by :func:`saved_bn_state`)
    and :meth:`read_batch_statistics` reads each call's statistics from their buffers;
    the others are measured from their input by :meth:`measure_input` (the rounded batch
    mean as shift: :meth:`ChannelMoments.of` with all samples).
    """

    def __init__(self, modules: Sequence[_BatchNorm], device: torch.device):
        self.modules = modules
        self.moments: Dict[int, ChannelMoments] = {  # rows: L for (L, C) buffers, 1 for (C,)
            id(m): ChannelMoments.zeros(m.running_mean.shape[:-1] or (1,), m.running_mean.shape[-1], device)
            for m in modules
        }
        self._handles = []

    def __enter__(self) -> "_StatisticsRecorder":
        for m in self.modules:
            if _reads_own_statistics(m):
                m.momentum = 1.0
                self._handles.append(m.register_forward_hook(self.read_batch_statistics))
            else:
                self._handles.append(m.register_forward_pre_hook(self.measure_input))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def measure_input(self, module: _BatchNorm, args: Tuple[Any, ...]) -> None:
        """Forward pre-hook: merges the moments of the call's input (its first argument)."""
        if not args:
            raise ValueError(
                f"{type(module).__name__} was called without a positional input; PreciseBN "
                "reads the batch from the first positional argument"
            )
        x, moments = args[0], self.moments[id(module)]
        if module.running_mean.dim() == 2:
            rows = moments.count.shape[0]
            if not isinstance(x, (list, tuple)) or len(x) != rows:
                raise ValueError(
                    f"a BN module with per-slot statistics of shape "
                    f"{tuple(module.running_mean.shape)} must be called with a list of "
                    f"{rows} tensors; got {type(x).__name__}"
                )
            moments = moments.merge(_measure(module, *x))
        else:
            for t in x if isinstance(x, (list, tuple)) else [x]:
                moments = moments.merge(_measure(module, t))
        self.moments[id(module)] = moments

    def read_batch_statistics(self, module: _BatchNorm, args: Tuple[Any, ...], output) -> None:
        """
        Forward hook of a torch BN run with momentum 1.0: its buffers hold the batch mean
        and the unbiased batch variance of this call's input (n samples per channel), so
        ``M2 = running_var * (n - 1)``.
        """
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{type(module).__name__} must be called with a Tensor; got {type(x).__name__}")
        n = x.numel() // module.num_features
        if n == 0:
            return
        mean = module.running_mean.detach().to(torch.float64)
        m2 = module.running_var.detach().to(torch.float64) * (n - 1)
        batch = ChannelMoments(mean.new_full((), float(n)), mean, m2)
        self.moments[id(module)] = self.moments[id(module)].merge(batch)


def _measure(module: _BatchNorm, *xs: torch.Tensor) -> ChannelMoments:
    """The moments of ``xs`` (one row each), shifted by their rounded batch means."""
    channels = module.running_mean.shape[-1]
    for x in xs:
        if x.dim() < 2 or x.shape[1] != channels:
            raise ValueError(
                f"a BN module with {channels} channels got an input of shape {tuple(x.shape)}; "
                f"expected (N, C, *) with C = {channels}"
            )
    return ChannelMoments.of(*xs, shift_samples=None)


class _StopForward(Exception):
    """Raised by a forward hook once the last BN call of a forward has completed."""


class _EarlyExit:
    """
    Runs forwards that stop after the last call of a statistics module (within its
    ``with`` block, which removes its hook at the end).

    The first forward runs the whole model while :meth:`_learn` logs the start ("pre") and
    end ("post") of every module's forward. The stop point is the end of the last BN call,
    extended over the ends of its callers that return right after it with no other module
    starting in between (e.g. ``CycleBatchNormList``, which advances its position after its
    BN returns). Later forwards raise :class:`_StopForward` at that point — the k-th end of
    the stop module — so the layers and losses after the last BN are not computed, and the
    modules that wrap it finish their bookkeeping. This assumes every batch calls the BN
    modules in the same order (true for the detection models of detectron2); a forward that
    never reaches the stop point simply runs to the end.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self._watched = {id(m) for m in modules}
        self.stop_module: Optional[nn.Module] = None
        self.stop_count = 0
        self._ends = 0
        self._handle = None

    def __enter__(self) -> "_EarlyExit":
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()

    def run(self, net: nn.Module, batch: Any) -> None:
        """``net(batch)``, stopping at the stop point once it is learned."""
        if self.stop_module is None:
            self._learn(net, batch)
            return
        self._ends = 0
        try:
            net(batch)
        except _StopForward:
            pass

    def _learn(self, net: nn.Module, batch: Any) -> None:
        """Runs the whole ``net(batch)`` and sets the stop point from the order of calls."""
        events: List[Tuple[bool, nn.Module]] = []  # (is_start, module)
        handles = []
        for m in net.modules():
            handles.append(m.register_forward_pre_hook(lambda mod, a: events.append((True, mod))))
            handles.append(m.register_forward_hook(lambda mod, a, o: events.append((False, mod))))
        try:
            net(batch)
        finally:
            for h in handles:
                h.remove()
        # index of the end event of each start event, by matching a stack
        end_of, stack, last_bn_start = {}, [], None
        for i, (is_start, m) in enumerate(events):
            if is_start:
                stack.append(i)
                if id(m) in self._watched:
                    last_bn_start = i
            elif stack:
                end_of[stack.pop()] = i
        if last_bn_start is None or last_bn_start not in end_of:
            return
        stop = end_of[last_bn_start]
        while stop + 1 < len(events) and not events[stop + 1][0]:
            stop += 1
        module = events[stop][1]
        self.stop_module = module
        self.stop_count = sum(1 for is_start, m in events[: stop + 1] if not is_start and m is module)
        self._handle = module.register_forward_hook(self._maybe_stop)

    def _maybe_stop(self, module, args, output) -> None:
        self._ends += 1
        if self._ends == self.stop_count:
            raise _StopForward()


@contextmanager
def saved_bn_state(model: nn.Module, modules: Optional[Sequence[_BatchNorm]] = None):
    """
    Saves the train/eval mode of every module of ``model`` and the momentum and buffers
    (running statistics, ``num_batches_tracked``) of each BN module in ``modules``
    (default: every ``_BatchNorm`` of ``model``). Yields ``restore_buffers()``, a function
    that copies the saved buffers back (in place; callable any number of times). If the
    block raises, the buffers are restored and the error propagates; modes and momenta are
    restored whenever the block ends. Used by :func:`update_bn_stats` and by
    ``engine.hooks.mini_batch_statistics`` (which calls ``restore_buffers`` in a finally).
    """
    if modules is None:
        modules = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in modules]
    saved = [(m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)}) for m in modules]

    def restore_buffers():
        for m, buffers in saved:
            for k, b in m.named_buffers(recurse=False):
                b.copy_(buffers[k])

    try:
        yield restore_buffers
    except BaseException:
        restore_buffers()
        raise
    finally:
        for m, training in modes:
            m.training = training
        for m, momentum in momenta:
            m.momentum = momentum


@torch.no_grad()
def update_bn_stats(
    model: nn.Module,
    data_loader: Iterable[Any],
    num_iters: int = 200,
    progress: Optional[str] = None,
    *,
    num_samples: Optional[int] = None,
) -> PreciseBNResult:
    """
    Replaces the running statistics of every BN module of ``model`` in training mode by the
    population statistics of the batches ``model(batch)`` sees, pooled over all workers.
    Same calling convention as ``fvcore.nn.precise_bn.update_bn_stats``; in a distributed
    run every rank must call it, and all ranks end with identical buffers.

    Args:
        model: the model (a DDP wrapper is looked through). Its BN modules to update must be
            in training mode; modes are not changed. Weights are never touched.
        data_loader: any iterable of batches (``itertools.cycle`` and other infinite ones
            included; ``len()`` is never called). Each batch is passed as ``model(batch)``.
        num_iters: batches per worker. Ignored when ``num_samples`` is given.
        progress: "tqdm" for a progress bar, or None.
        num_samples: images over all workers together (see :func:`count_samples`); batches
            are used until the global count reaches it (the last batch is used whole).

    Every call of a BN module is a batch of its own (a BN reused within one forward counts
    once per call). Ranks agree on each batch with a small all-reduce of
    [this rank has no batch, images in it]: when any rank's loader ends, all stop, and the
    statistics of the batches used so far are kept (with a warning). The first batch runs
    the whole model and learns where the last BN call (and the modules wrapping it) ends;
    later forwards stop there, so the layers and losses after it are not computed.
    Torch's own BN modules run with momentum 1.0 and their batch statistics are read from
    their buffers after each call (no second pass over the input); the buffers, momenta
    and modes are restored at the end, and also if anything raises (then the error
    propagates).

    Returns:
        :class:`PreciseBNResult`. A model without BN modules in training mode, or a loader
        that yields nothing, logs a warning and leaves all statistics unchanged.

    Raises:
        ValueError: ``num_iters`` or ``num_samples`` not a positive integer, or a batch
            whose images cannot be counted.
    """
    start = time.perf_counter()
    if num_samples is None:
        check_int("num_iters", num_iters, 1)
    else:
        check_int("num_samples", num_samples, 1)
    named = get_bn_modules(model)
    if not named:
        logger.warning("update_bn_stats: the model has no BN module in training mode; nothing to do")
        return PreciseBNResult(0, 0, 0, time.perf_counter() - start, ())
    net = _unwrap(model)
    modules = [m for _, m in named]
    device = modules[0].running_mean.device

    with saved_bn_state(net, modules) as restore_buffers:
        with _StatisticsRecorder(modules, device) as recorder, _EarlyExit(modules) as early_exit:
            iters, seen = _run_batches(net, data_loader, early_exit, device, num_iters, num_samples, progress)
        if iters == 0:
            logger.warning(
                "update_bn_stats: the data loader yielded no batch on at least one worker; "
                "BN statistics are unchanged"
            )
            return PreciseBNResult(0, 0, 0, time.perf_counter() - start, ())
        pooled = _reduce_moments([recorder.moments[id(m)] for m in modules])
        # the forwards moved the EMA buffers (and num_batches_tracked): undo, then write
        restore_buffers()
        updated, uncalled = 0, []
        for (name, m), moments in zip(named, pooled):
            if float(moments.count.min()) <= 0:
                uncalled.append(name)
                continue
            shape = m.running_mean.shape
            m.running_mean.copy_(moments.mean.view(shape).to(m.running_mean.dtype))
            m.running_var.copy_(moments.var.view(shape).to(m.running_var.dtype))
            updated += 1
    if uncalled:
        logger.warning(
            "update_bn_stats: %d BN module(s) in training mode received no sample and keep "
            "their statistics: %s",
            len(uncalled),
            ", ".join(n or "<model>" for n in uncalled),
        )
    seconds = time.perf_counter() - start
    logger.info(
        "update_bn_stats: %d BN modules from %d images in %d iterations (%.2f s)",
        updated, seen, iters, seconds,
    )
    return PreciseBNResult(iters, seen, updated, seconds, tuple(uncalled))


def _run_batches(net, data_loader, early_exit: _EarlyExit, device, num_iters, num_samples, progress):
    """
    Runs ``net(batch)`` until ``num_iters`` batches (or ``num_samples`` global images) are
    used or some rank runs out of batches. Returns (batches used, global images used).
    """
    by_samples = num_samples is not None
    bar = None
    if progress == "tqdm":
        import tqdm

        bar = tqdm.tqdm(total=num_samples if by_samples else num_iters, desc="PreciseBN",
                        unit="img" if by_samples else "it")
    it = iter(data_loader)
    iters, seen = 0, 0
    try:
        while (seen < num_samples) if by_samples else (iters < num_iters):
            batch = next(it, _END)
            ended = batch is _END
            local = 0 if ended else count_samples(batch)
            # [ranks without a batch, images in this batch over all ranks]
            agreed = torch.tensor([float(ended), float(local)], dtype=torch.float64, device=device)
            dist_utils.all_reduce_sum_(agreed)
            if float(agreed[0]) > 0:
                if iters > 0:
                    logger.warning(
                        "update_bn_stats: a data loader ended after %d batches (%d images over "
                        "all workers), before the %s asked for; using those",
                        iters, seen,
                        f"{num_samples} images" if by_samples else f"{num_iters} iterations",
                    )
                break
            early_exit.run(net, batch)
            iters += 1
            seen += int(agreed[1])
            if bar is not None:
                bar.update(int(agreed[1]) if by_samples else 1)
    finally:
        if bar is not None:
            bar.close()
    return iters, seen


def _reduce_moments(local: List[ChannelMoments]) -> List[ChannelMoments]:
    """
    Pools every module's moments over all ranks with ONE all-reduce: rank r writes its
    moments, flattened, into row r of a (world_size, K) zero tensor; the sum of those
    tensors is every rank's row (adding zeros is exact), and every rank merges the rows in
    rank order, so all ranks compute bitwise-identical results.
    """
    world, rank = dist_utils.group_size(), dist_utils.group_rank()
    if world == 1:
        return local
    flat = torch.cat([t.flatten() for moments in local for t in moments])
    rows = flat.new_zeros(world, flat.numel())
    rows[rank] = flat
    dist_utils.all_reduce_sum_(rows)
    pooled, offset = [], 0
    for moments in local:
        per_rank = []  # each field with a leading rank dimension
        for t in moments:
            per_rank.append(rows[:, offset : offset + t.numel()].unflatten(1, t.shape))
            offset += t.numel()
        out = ChannelMoments.zeros(moments.count.shape, moments.mean.shape[-1], rows.device)
        for r in range(world):
            out = out.merge(ChannelMoments(*(t[r] for t in per_rank)))
        pooled.append(out)
    return pooled
