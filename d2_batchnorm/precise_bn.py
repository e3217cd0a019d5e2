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
:meth:`d2_batchnorm.layers.batch_stats.ChannelMoments.pooled`). At the end one all-reduce
gathers every rank's moments and every rank pools them with the same float64 operations
(:func:`_reduce_moments`), so all ranks end with bitwise-identical buffers::

    running_mean = mean        running_var = M2 / n     (population / biased variance)

which is what fvcore's ``update_bn_stats`` stores on one process.

How precise: every module also gets the standard errors of its new statistics, from the
variation between sampling units (one worker's batch; :mod:`d2_batchnorm.standard_errors`),
through one more all-reduce-like collective, identical on every rank
(:attr:`PreciseBNResult.errors`, :func:`summarize_errors`); ``target_rel_error`` stops
drawing batches once they are small enough (adaptive PreciseBN).

Which modules: every ``torch.nn.modules.batchnorm._BatchNorm`` in training mode (BN1d/2d/
3d, ``nn.SyncBatchNorm``, detectron2's ``NaiveSyncBatchNorm``, the modules of a
``CycleBatchNormList``, d2_batchnorm's norms). Frozen BN and BN in eval mode are untouched.
Statistics are those of each call's local *input* (so synchronized norms are not counted
once per worker; how they are read: :class:`_StatisticsRecorder`). A module whose
``running_mean`` has shape (L, C) receives a list of L tensors per call; tensor i pools
into row i (per-level statistics of a head shared across L feature levels).
"""
import logging
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed as dist_utils
from .checks import check_float, check_int
from .early_exit import EarlyExit, StopPlans
from .layers.batch_stats import ChannelMoments
from .module_state import saved_bn_state
from .standard_errors import MIN_UNITS, RelativeErrors, UnitSums, largest_error, relative_errors

__all__ = [
    "update_bn_stats", "get_bn_modules", "bn_module_group", "unwrap_model", "count_samples", "PreciseBNResult", "summarize_errors",
]

logger = logging.getLogger(__name__)

_END = object()  # what next() returns once a data loader has ended


class PreciseBNResult(NamedTuple):
    """What :func:`update_bn_stats` did (identical on every rank but ``seconds``)."""

    num_iters: int  # batches used (per worker)
    num_samples: int  # images (or tensor rows) used, all workers together
    num_modules: int  # BN modules whose statistics were replaced
    seconds: float  # wall time of the whole update on this rank
    uncalled: Tuple[str, ...]  # names of BN modules in training mode that were never called
    # relative standard errors of the new statistics, per updated module name
    # (d2_batchnorm.standard_errors); summarize_errors() reports them per module group
    errors: Dict[str, RelativeErrors] = {}
    reached_target: bool = False  # an adaptive update stopped because its target was met


def get_bn_modules(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """
    ``(name, module)`` of every ``_BatchNorm`` of ``model`` in training mode that tracks
    running statistics, in ``named_modules`` order. A DDP wrapper is looked through.
    """
    model = unwrap_model(model)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]


def bn_module_group(name: str) -> str:
    """
    The group a BN module is reported under: the first two components of its name, each
    without its trailing digits (empty ones dropped), e.g. ``backbone.bottom_up.res2.0.
    conv1.norm`` -> ``backbone.bottom_up``, ``backbone.fpn_lateral3.norm`` ->
    ``backbone.fpn_lateral``, ``head.cls_subnet.1`` -> ``head.cls_subnet``,
    ``roi_heads.box_head.conv1.norm`` -> ``roi_heads.box_head``; ``<model>`` for the model
    itself. Per-group summaries (PreciseBN's standard errors, the BN monitor) use it.
    """
    parts = [p.rstrip("0123456789_") for p in name.split(".")[:2]]
    return ".".join(p for p in parts if p) or "<model>"


def summarize_errors(errors: Dict[str, RelativeErrors], prefix: str = "precise_bn/rel_error",
                     group_of: Optional[Callable[[str], str]] = None) -> Dict[str, float]:
    """
    Scalars of :attr:`PreciseBNResult.errors`: per module group (``group_of(name)``,
    default :func:`bn_module_group`), the max and the median over the channels of its
    modules of the relative standard errors of the mean and of the standard deviation
    (``f"{prefix}_mean/{group}/max"``, ``.../median``, ``f"{prefix}_std/{group}/max"``,
    ...), the largest of them (``f"{prefix}/max"``) and the fewest units any module had
    (``f"{prefix}/min_units"``; errors from fewer than 2 units are NaN and left out).
    """
    groups: Dict[str, List[RelativeErrors]] = {}
    for name, e in errors.items():
        groups.setdefault((group_of or bn_module_group)(name), []).append(e)
    out = {}
    for group, group_errors in sorted(groups.items()):
        for what in ("mean", "std"):
            v = torch.cat([getattr(e, what).flatten() for e in group_errors])
            v = v[~v.isnan()]
            if v.numel():
                out[f"{prefix}_{what}/{group}/max"] = float(v.max())
                out[f"{prefix}_{what}/{group}/median"] = float(v.median())
    largest = [v for k, v in out.items() if k.endswith("/max")]
    if largest:
        out[f"{prefix}/max"] = max(largest)
    if errors:
        out[f"{prefix}/min_units"] = min(float(e.units.min()) for e in errors.values())
    return out


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, else ``model``."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


class _StatisticsRecorder:
    """
    Within its ``with`` block, records the statistics of every call's input of the
    statistics modules: one float64 :class:`ChannelMoments` per module, with one row per
    row of its buffers (tensor i of a list input pools into row i of (L, C) buffers), and
    the :class:`~d2_batchnorm.standard_errors.UnitSums` of its sampling units (both:
    :meth:`snapshot`). torch's own per-process BNs (``_BatchNorm.forward``, (C,) float32/
    float64 buffers) run with momentum 1.0 (restored by :func:`saved_bn_state`): after a
    call their buffers hold its input's batch mean and unbiased variance, which
    :meth:`read_batch_statistics` reads (no second pass over the activations). Synchronized
    and custom norms (own ``forward``) are measured from their input by
    :meth:`measure_input` (the rounded batch mean as shift: :meth:`ChannelMoments.of` with
    all samples).

    Either way a call becomes one :class:`ChannelMoments`. :meth:`end_batch` pools a
    module's calls of one forward into one unit (the unit of the standard errors: one
    worker's batch). The float64 pooling of the units, :meth:`ChannelMoments.pooled`, runs
    once per ``POOL_EVERY`` units and at the end, a fixed number of operations per module
    instead of a sequential merge per call; :meth:`snapshot` pools without changing that
    order, so reading the statistics mid-way leaves the final ones bitwise unchanged.
    """

    POOL_EVERY = 64  # units of one module kept before they are pooled (bounds the memory)

    def __init__(self, modules: Sequence[_BatchNorm], device: torch.device):
        self.modules = modules
        self._pooled: Dict[int, ChannelMoments] = {  # rows: L for (L, C) buffers, 1 for (C,)
            id(m): ChannelMoments.zeros(m.running_mean.shape[:-1] or (1,), m.running_mean.shape[-1], device)
            for m in modules
        }
        self._unit_sums: Dict[int, Optional[UnitSums]] = {id(m): None for m in modules}
        self._calls: Dict[int, List[ChannelMoments]] = {id(m): [] for m in modules}  # this batch's
        self._pending: Dict[int, List[ChannelMoments]] = {id(m): [] for m in modules}  # units not pooled
        self._handles = []

    def __enter__(self) -> "_StatisticsRecorder":
        for m in self.modules:
            if (type(m).forward is _BatchNorm.forward and m.running_mean.dim() == 1
                    and m.running_mean.dtype in (torch.float32, torch.float64)):  # class docstring
                m.momentum = 1.0
                self._handles.append(m.register_forward_hook(self.read_batch_statistics))
            else:
                self._handles.append(m.register_forward_pre_hook(self.measure_input))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def snapshot(self) -> Tuple[List[ChannelMoments], List[Optional[UnitSums]]]:
        """
        The moments and the unit sums (None: never called) of every unit so far, one per
        module in ``modules`` order; the recorder is left as it was.
        """
        both = [self._with_pending(m) for m in self.modules]
        return [moments for moments, _ in both], [sums for _, sums in both]

    def end_batch(self) -> None:
        """Pools every module's calls of the forward that just ran into one unit."""
        for m in self.modules:
            calls = self._calls[id(m)]
            if not calls:
                continue
            unit = calls[0] if len(calls) == 1 else _stacked(calls).pooled()
            self._calls[id(m)] = []
            self._pending[id(m)].append(unit)
            if len(self._pending[id(m)]) >= self.POOL_EVERY:
                self._pooled[id(m)], self._unit_sums[id(m)] = self._with_pending(m)
                self._pending[id(m)] = []

    def _with_pending(self, module: _BatchNorm) -> Tuple[ChannelMoments, Optional[UnitSums]]:
        """The module's pooled moments and unit sums with its pending units added (float64, batched)."""
        pending, pooled, sums = self._pending[id(module)], self._pooled[id(module)], self._unit_sums[id(module)]
        if not pending:
            return pooled, sums
        units = _stacked(pending)
        pooled = ChannelMoments(*(torch.cat([a.unsqueeze(0), b]) for a, b in zip(pooled, units))).pooled()
        return pooled, (sums or UnitSums.start(pending[0])).add(units)

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
            self._calls[id(module)].append(_measure(module, *x))
        else:
            for t in x if isinstance(x, (list, tuple)) else [x]:
                self._calls[id(module)].append(_measure(module, t))

    def read_batch_statistics(self, module: _BatchNorm, args: Tuple[Any, ...], output) -> None:
        """Forward hook of a torch BN run with momentum 1.0 (class docstring): ``M2 = running_var * (n - 1)``."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{type(module).__name__} must be called with a Tensor; got {type(x).__name__}")
        n = x.numel() // module.num_features
        if n > 0:  # one row; float64 copies, as the next call overwrites the buffers
            mean = module.running_mean.to(torch.float64, copy=True).unsqueeze(0)
            m2 = module.running_var.to(torch.float64, copy=True).unsqueeze(0).mul_(n - 1)
            self._calls[id(module)].append(ChannelMoments(mean.new_full((1,), float(n)), mean, m2))


def _stacked(moments: Sequence[ChannelMoments]) -> ChannelMoments:
    """k moments of the same shape as one with a leading dimension k."""
    return ChannelMoments(*(torch.stack(field) for field in zip(*moments)))


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


@torch.no_grad()
def update_bn_stats(
    model: nn.Module,
    data_loader: Iterable[Any],
    num_iters: int = 200,
    progress: Optional[str] = None,
    *,
    num_samples: Optional[int] = None,
    stop_plans: Optional[StopPlans] = None,
    target_rel_error: float = 0.0,
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
        stop_plans: the :class:`~d2_batchnorm.early_exit.StopPlans` of a caller that runs
            it again on the same model; default: a plan for this call only.
        target_rel_error: > 0 stops drawing batches as soon as every module's largest relative
            standard error (:meth:`~d2_batchnorm.standard_errors.RelativeErrors.largest`) is
            at most this, or when ``num_samples`` / ``num_iters`` is reached, whichever comes
            first. Checked once ``MIN_UNITS`` units can exist, after every batch up to 20 and
            then every ~10% more batches, from the statistics of all workers, so every rank
            stops after the same batch; the statistics for a given number of batches are
            those of a fixed-size run with that many.

    Every call of a BN module is a batch of its own (a BN reused within one forward counts
    once per call). Ranks agree on each batch with a small all-reduce of
    [this rank has no batch, images in it]: when any rank's loader ends, all stop, and the
    statistics of the batches used so far are kept (with a warning). Forwards stop after
    the last BN call (:class:`~d2_batchnorm.early_exit.EarlyExit`). Buffers, momenta and
    modes are restored at the end, also if anything raises (then the error propagates).

    Returns:
        :class:`PreciseBNResult`, with the relative standard errors of the new statistics
        (one unit = one worker's batch; see :mod:`d2_batchnorm.standard_errors`). A model
        without BN modules in training mode, or a loader that yields nothing, logs a
        warning and leaves all statistics unchanged.

    Raises:
        ValueError: ``num_iters`` or ``num_samples`` not a positive integer,
            ``target_rel_error`` not in [0, 1], or a batch whose images cannot be counted.
    """
    start = time.perf_counter()
    if num_samples is None:
        check_int("num_iters", num_iters, 1)
    else:
        check_int("num_samples", num_samples, 1)
    check_float("target_rel_error", target_rel_error, 0.0, 1.0)
    named = get_bn_modules(model)
    if not named:
        logger.warning("update_bn_stats: the model has no BN module in training mode; nothing to do")
        return PreciseBNResult(0, 0, 0, time.perf_counter() - start, ())
    net = unwrap_model(model)
    modules = [m for _, m in named]
    device = modules[0].running_mean.device

    with saved_bn_state(net, modules) as restore_buffers:
        with _StatisticsRecorder(modules, device) as recorder, EarlyExit(net, modules, stop_plans or StopPlans()) as early_exit:
            target = _ErrorTarget(named, recorder, target_rel_error) if target_rel_error > 0 else None
            iters, seen = _run_batches(data_loader, early_exit, recorder, device, num_iters, num_samples, progress, target)
        if iters == 0:
            logger.warning(
                "update_bn_stats: the data loader yielded no batch on at least one worker; "
                "BN statistics are unchanged"
            )
            return PreciseBNResult(0, 0, 0, time.perf_counter() - start, ())
        moments, unit_sums = recorder.snapshot()
        pooled = _reduce_moments(moments)
        errors = _global_errors(named, unit_sums, pooled)
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
    errors = {n: e for n, e in errors.items() if n not in uncalled}
    summary = summarize_errors(errors, prefix="")
    reached = target is not None and target.reached
    logger.info(
        "update_bn_stats: %d BN modules from %d images in %d iterations (%.2f s); largest relative "
        "standard error %.3g (from >= %d units)%s",
        updated, seen, iters, seconds, summary.get("/max", float("nan")), summary.get("/min_units", 0),
        "" if target is None else (f", target {target_rel_error:g} " + ("reached" if reached else "not reached")),
    )
    return PreciseBNResult(iters, seen, updated, seconds, tuple(uncalled), errors, reached)


def _run_batches(data_loader, early_exit: EarlyExit, recorder: _StatisticsRecorder, device, num_iters,
                 num_samples, progress, target: Optional["_ErrorTarget"] = None):
    """
    Runs ``net(batch)`` until ``num_iters`` batches (or ``num_samples`` global images) are
    used, some rank runs out of batches, or ``target`` is reached. Returns (batches used,
    global images used).
    """
    import tqdm

    by_samples = num_samples is not None
    with tqdm.tqdm(total=num_samples if by_samples else num_iters, desc="PreciseBN",
                   unit="img" if by_samples else "it", disable=progress != "tqdm") as bar:
        it = iter(data_loader)
        iters, seen = 0, 0
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
            recorder.end_batch()
            iters += 1
            seen += int(agreed[1])
            bar.update(int(agreed[1]) if by_samples else 1)
            if target is not None and target.reached_after(iters):
                break
    return iters, seen


def _global_errors(named, unit_sums: List[Optional[UnitSums]], pooled: List[ChannelMoments]) -> Dict[str, RelativeErrors]:
    """
    The relative standard errors of every module's ``pooled`` moments (all workers') from
    every worker's unit sums: ONE collective for all modules (a module this worker never
    called adds zeros), summed in rank order, so all ranks get identical errors.
    """
    centered = []
    for (_, m), sums, moments in zip(named, unit_sums, pooled):
        rows, channels = moments.mean.shape
        centered.append(moments.mean.new_zeros(rows, 2 * channels + 1) if sums is None else sums.centered(moments))
    flat = torch.cat([c.flatten() for c in centered])
    if dist_utils.group_size() > 1:
        flat = dist_utils.sum_over_ranks(flat)
    summed = flat.split([c.numel() for c in centered])
    return {name: relative_errors(total.view(c.shape), moments, m.eps)
            for (name, m), c, total, moments in zip(named, centered, summed, pooled)}


class _ErrorTarget:
    """
    The stop rule of ``target_rel_error`` (:func:`update_bn_stats`, which says when it is
    checked): the standard errors of a snapshot of all workers' statistics so far; reached
    when the largest is at most ``target``. Every rank computes the same numbers.
    """

    def __init__(self, named, recorder: _StatisticsRecorder, target: float):
        self.named, self.recorder, self.target = named, recorder, target
        self.reached = False
        # no check before MIN_UNITS units can exist (each batch is one unit per worker)
        self._next_check = -(-MIN_UNITS // dist_utils.group_size())

    def reached_after(self, iters: int) -> bool:
        if iters < self._next_check:
            return False
        self._next_check = iters + max(1, iters // 10)
        moments, unit_sums = self.recorder.snapshot()
        largest = largest_error(_global_errors(self.named, unit_sums, _reduce_moments(moments)))
        self.reached = largest <= self.target
        return self.reached


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
    columns = iter(rows.split([t.numel() for moments in local for t in moments], dim=1))
    # each field with a leading rank dimension
    return [ChannelMoments(*(next(columns).unflatten(1, t.shape) for t in moments)).pooled() for moments in local]
