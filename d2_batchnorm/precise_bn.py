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
squared deviations ``M2``), which pool exactly (Chan et al.; the batched form
:meth:`d2_batchnorm.layers.batch_stats.ChannelMoments.pooled`). At the end every rank's
moments are placed in its own row of a (world_size, K) zero tensor, ONE all-reduce (sum)
gathers the rows on every rank, and every rank pools the rows — the same float64
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
import weakref
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
    statistics modules: one float64 :class:`ChannelMoments` per module (:meth:`moments`),
    with one row per row of its buffers (tensor i of a list input pools into row i of
    (L, C) buffers). Modules of :func:`_reads_own_statistics` run with momentum 1.0
    (restored by :func:`saved_bn_state`) and :meth:`read_batch_statistics` reads each call's
    statistics from their buffers; the others are measured from their input by
    :meth:`measure_input` (the rounded batch mean as shift: :meth:`ChannelMoments.of` with
    all samples).

    A hook does only what cannot wait: it copies a torch BN's buffers (one (2C,) float32
    copy; the next call overwrites them) or measures a custom norm's input. The float64
    pooling of a module's calls, :meth:`ChannelMoments.pooled`, runs once per
    ``POOL_EVERY`` calls and at the end, a fixed number of operations per module instead
    of a sequential merge per call.
    """

    POOL_EVERY = 64  # calls of one module kept before they are pooled (bounds the memory)

    def __init__(self, modules: Sequence[_BatchNorm], device: torch.device):
        self.modules = modules
        self._pooled: Dict[int, ChannelMoments] = {  # rows: L for (L, C) buffers, 1 for (C,)
            id(m): ChannelMoments.zeros(m.running_mean.shape[:-1] or (1,), m.running_mean.shape[-1], device)
            for m in modules
        }
        # per module, the calls not pooled yet: (n, cat(mean, unbiased var)) of a torch BN,
        # the ChannelMoments of a measured input otherwise
        self._pending: Dict[int, List[Any]] = {id(m): [] for m in modules}
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

    def moments(self) -> List[ChannelMoments]:
        """The moments of every call so far, one per module in ``modules`` order."""
        for m in self.modules:
            self._pool(m)
        return [self._pooled[id(m)] for m in self.modules]

    def _add(self, module: _BatchNorm, call: Any) -> None:
        pending = self._pending[id(module)]
        pending.append(call)
        if len(pending) >= self.POOL_EVERY:
            self._pool(module)

    def _pool(self, module: _BatchNorm) -> None:
        """Pools the pending calls of ``module`` into its moments (float64, batched)."""
        pending, pooled = self._pending[id(module)], self._pooled[id(module)]
        if not pending:
            return
        if isinstance(pending[0], ChannelMoments):
            calls = ChannelMoments(*(torch.stack(field) for field in zip(*pending)))
        else:  # torch BN: unbiased variance, so M2 = var * (n - 1)
            count = torch.tensor([n for n, _ in pending], dtype=torch.float64, device=pooled.count.device)
            mean, var = torch.stack([s for _, s in pending]).double().unsqueeze(1).chunk(2, dim=-1)
            calls = ChannelMoments(count.unsqueeze(1), mean, var * (count - 1).view(-1, 1, 1))
        pending.clear()
        self._pooled[id(module)] = ChannelMoments(
            *(torch.cat([a.unsqueeze(0), b]) for a, b in zip(pooled, calls))
        ).pooled()

    def measure_input(self, module: _BatchNorm, args: Tuple[Any, ...]) -> None:
        """Forward pre-hook: measures the moments of the call's input (its first argument)."""
        if not args:
            raise ValueError(
                f"{type(module).__name__} was called without a positional input; PreciseBN "
                "reads the batch from the first positional argument"
            )
        x = args[0]
        if module.running_mean.dim() == 2:
            rows = module.running_mean.shape[0]
            if not isinstance(x, (list, tuple)) or len(x) != rows:
                raise ValueError(
                    f"a BN module with per-slot statistics of shape "
                    f"{tuple(module.running_mean.shape)} must be called with a list of "
                    f"{rows} tensors; got {type(x).__name__}"
                )
            self._add(module, _measure(module, *x))
        else:
            for t in x if isinstance(x, (list, tuple)) else [x]:
                self._add(module, _measure(module, t))

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
        if n > 0:
            self._add(module, (n, torch.cat([module.running_mean, module.running_var])))


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


class _StopPlan(NamedTuple):
    """Where the forwards of a model stop (learned by :class:`_EarlyExit`)."""

    modules: Tuple[nn.Module, ...]  # the statistics modules it was learned for, in order
    calls: Tuple[nn.Module, ...]  # the statistics modules in the order they are called
    stop_module: nn.Module  # the forward stops at the stop_count-th end of stop_module
    stop_count: int


# The plan of each model seen (keyed by the unwrapped model, forgotten with it), so that
# later calls of update_bn_stats on the same model (e.g. PreciseBN's periodic runs in a
# training) need no full forward.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, _StopPlan]" = weakref.WeakKeyDictionary()


def forget_stop_plans() -> None:
    """Forgets every model's stop plan: the next :func:`update_bn_stats` learns it anew."""
    _PLANS.clear()


class _EarlyExit:
    """
    Runs forwards of ``net`` that stop after the last call of a statistics module (within
    its ``with`` block, which removes its hooks at the end).

    A forward with no plan runs the whole model while :meth:`_learn` logs the start ("pre")
    and end ("post") of every module's forward. The stop point is the end of the last BN
    call, extended over the ends of its callers that return right after it with no other
    module starting in between (e.g. ``CycleBatchNormList``, which advances its position
    after its BN returns). Later forwards raise :class:`_StopForward` at that point — the
    k-th end of the stop module — so the layers and losses after the last BN are not
    computed, and the modules that wrap it finish their bookkeeping.

    The plan is kept per model across calls (:data:`_PLANS`) and used again when the
    statistics modules are the same objects in the same order. It is never trusted
    blindly: a forward stops only if the statistics modules were called exactly in the
    planned order up to the stop point; otherwise, or if it never reaches the stop point,
    the forward runs to its end (every call recorded, statistics exact) and the next
    forward learns the plan anew. What no check before the stop point can see is a batch
    that would call statistics modules *after* it that the learned batch did not; the
    detection models of detectron2 call the same BN modules in the same order for every
    batch.
    """

    def __init__(self, net: nn.Module, modules: Sequence[nn.Module]):
        self._net = net
        self._modules = tuple(modules)
        self._watched = {id(m) for m in modules}
        plan = _PLANS.get(net)
        same = plan is not None and len(plan.modules) == len(self._modules) and all(
            a is b for a, b in zip(plan.modules, self._modules)
        )
        self.plan: Optional[_StopPlan] = plan if same else None
        self._calls: List[nn.Module] = []  # statistics modules called in this forward
        self._ends = 0
        self._handles = []
        self._stop_handle = None

    def __enter__(self) -> "_EarlyExit":
        log = self._calls.append
        for m in self._modules:
            self._handles.append(m.register_forward_pre_hook(lambda mod, args: log(mod)))
        if self.plan is not None:
            self._set_plan(self.plan)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._set_plan(None)

    def _set_plan(self, plan: Optional[_StopPlan]) -> None:
        if self._stop_handle is not None:
            self._stop_handle.remove()
            self._stop_handle = None
        self.plan = plan
        if plan is not None:
            self._stop_handle = plan.stop_module.register_forward_hook(self._maybe_stop)

    def run(self, batch: Any) -> None:
        """``net(batch)``, stopping at the plan's stop point (learning the plan if needed)."""
        self._calls.clear()
        if self.plan is None:
            self._learn(batch)
            return
        self._ends = 0
        try:
            self._net(batch)
        except _StopForward:
            return
        logger.info("update_bn_stats: a forward did not stop where planned; learning the plan again")
        _PLANS.pop(self._net, None)
        self._set_plan(None)

    def _learn(self, batch: Any) -> None:
        """Runs the whole ``net(batch)`` and sets the plan from the order of calls."""
        events: List[Tuple[bool, nn.Module]] = []  # (is_start, module)
        handles = []
        for m in self._net.modules():
            handles.append(m.register_forward_pre_hook(lambda mod, a: events.append((True, mod))))
            handles.append(m.register_forward_hook(lambda mod, a, o: events.append((False, mod))))
        try:
            self._net(batch)
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
        plan = _StopPlan(
            modules=self._modules,
            calls=tuple(m for is_start, m in events[: stop + 1] if is_start and id(m) in self._watched),
            stop_module=module,
            stop_count=sum(1 for is_start, m in events[: stop + 1] if not is_start and m is module),
        )
        _PLANS[self._net] = plan
        self._set_plan(plan)

    def _maybe_stop(self, module, args, output) -> None:
        self._ends += 1
        if self._ends == self.plan.stop_count and len(self._calls) == len(self.plan.calls) and all(
            a is b for a, b in zip(self._calls, self.plan.calls)
        ):
            raise _StopForward()


@contextmanager
def saved_bn_state(model: nn.Module, modules: Optional[Sequence[_BatchNorm]] = None):
    """
    Saves the buffers (running statistics, ``num_batches_tracked``) of each BN module in
    ``modules`` (default: every ``_BatchNorm`` of ``model``) and the plain Python scalars of
    every module of ``model`` (:func:`_module_scalars`: its train/eval mode, a BN's momentum,
    and state a forward updates outside buffers, such as the ``loss_normalizer`` EMA that
    detectron2's RetinaNet and FCOS update in every training forward). Yields
    ``restore_buffers()``, a function that copies the saved buffers back (in place; callable
    any number of times). If the block raises, the buffers are restored and the error
    propagates; the scalars are restored whenever the block ends (and scalars the block
    created are removed), so forwards inside it leave no trace in later training. Used by
    :func:`update_bn_stats` and by ``bn_modes.mini_batch_statistics`` (which calls
    ``restore_buffers`` in a finally).
    """
    if modules is None:
        modules = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    scalars = [(m, _module_scalars(m)) for m in model.modules()]
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
        for m, before in scalars:
            for name in set(_module_scalars(m)) - set(before):
                delattr(m, name)
            for name, value in before.items():
                setattr(m, name, value)


def _module_scalars(module: nn.Module) -> Dict[str, Any]:
    """The attributes of ``module`` itself that are plain Python scalars (None, bool, int, float)."""
    return {k: v for k, v in vars(module).items() if v is None or type(v) in (bool, int, float)}


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
    statistics of the batches used so far are kept (with a warning). The first batch ever
    seen by a model runs the whole model and learns where the last BN call (and the
    modules wrapping it) ends; later forwards stop there, so the layers and losses after
    it are not computed. The plan is kept for later calls on the same model while its BN
    modules in training mode stay the same, and each forward checks the order of BN calls
    against it before stopping (:class:`_EarlyExit`).
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
        with _StatisticsRecorder(modules, device) as recorder, _EarlyExit(net, modules) as early_exit:
            iters, seen = _run_batches(data_loader, early_exit, device, num_iters, num_samples, progress)
        if iters == 0:
            logger.warning(
                "update_bn_stats: the data loader yielded no batch on at least one worker; "
                "BN statistics are unchanged"
            )
            return PreciseBNResult(0, 0, 0, time.perf_counter() - start, ())
        pooled = _reduce_moments(recorder.moments())
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


def _run_batches(data_loader, early_exit: _EarlyExit, device, num_iters, num_samples, progress):
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
            early_exit.run(batch)
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
    tensors is every rank's row (adding zeros is exact), and every rank pools the same rows
    with the same operations (:meth:`ChannelMoments.pooled`), so all ranks compute
    bitwise-identical results.
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
        pooled.append(ChannelMoments(*per_rank).pooled())
    return pooled
