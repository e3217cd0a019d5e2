"""
Training hooks for BatchNorm train/test consistency (each class's docstring says what it does):

* :class:`PreciseBN` — precise population statistics, optionally after an evaluation with
  the EMA ones ("ema/bbox/AP" next to "bbox/AP");
* :class:`FrozenBNLate` — FrozenBN for the last N iterations;
* :class:`AverageBNStatistics` — per-worker running statistics averaged over workers.

:func:`build_batchnorm_hooks` builds them and the BatchNorm health hooks from either kind
of config, in the order to register them (for every trainer). The contexts that choose
which statistics BN uses are in :mod:`d2_batchnorm.bn_modes`.
"""
import logging
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from detectron2.config import configurable
from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch import nn

from ..bn_modes import average_running_statistics, force_bn_mode
from ..checks import check_int
from ..config_kinds import adapt
from ..early_exit import StopPlans
from ..module_state import bn_statistics_distance, snapshot_bn_statistics
from ..precise_bn import PreciseBNResult, get_bn_modules, summarize_errors, update_bn_stats
from ..rng import RandomStream, derive_seed
from .bn_guard import NonFiniteGuard
from .bn_monitor import BNMonitor
from .precise_bn_settings import PreciseBNSettings

__all__ = ["PreciseBN", "FrozenBNLate", "AverageBNStatistics", "build_batchnorm_hooks"]

logger = logging.getLogger(__name__)


class PreciseBN(HookBase):
    """
    Replaces the EMA statistics of every BN module in training mode by precise population
    statistics, computed by :func:`d2_batchnorm.update_bn_stats` on all workers together
    (every rank ends with identical buffers). Runs every ``period`` iterations and after
    the last one; register it before the checkpointer so checkpoints hold precise
    statistics. Every rank must register it.

    Scalars written to the trainer's EventStorage at each run:
    ``precise_bn/seconds``, ``precise_bn/samples`` (images, all workers),
    ``precise_bn/ema_mean_rel_dist`` and ``precise_bn/ema_var_rel_dist`` (see
    :func:`bn_statistics_distance`: how far the EMA statistics were from the precise ones),
    and the relative standard errors of the precise statistics per module group
    (``precise_bn/rel_error_mean/<group>/max``, ``.../median``, ``precise_bn/rel_error_std/...``,
    ``precise_bn/rel_error/max``: :func:`~d2_batchnorm.precise_bn.summarize_errors`).

    With ``ema_eval_function``, at runs that coincide with an evaluation (every
    ``ema_eval_period`` iterations, and the last one) the model is first evaluated with its
    EMA statistics and the flattened results are logged with an ``ema/`` prefix; the
    evaluation hook that runs after this one then logs the results with precise statistics.

    The hook does not perturb the training it measures: its data loader, forwards and EMA
    evaluation draw every random number from a private
    :class:`~d2_batchnorm.rng.RandomStream`, and the training's random state is put back
    after each run, so with a fixed seed the training's losses and weights are bitwise those
    of the same run without the hook (only the BN buffers differ).
    """

    @configurable
    def __init__(
        self,
        period: int,
        model: nn.Module,
        data_loader: Iterable,
        num_iter: int,
        *,
        num_samples: Optional[int] = None,
        ema_eval_function: Optional[Callable[[], Dict]] = None,
        ema_eval_period: int = 0,
        seed: int = 0,
        target_rel_error: float = 0.0,
    ):
        """
        Args:
            period: run every ``period`` iterations; 0: only after the last iteration.
            model: the (possibly DDP-wrapped) model whose BN modules in training mode are
                updated.
            data_loader: an iterable of batches for ``model(batch)``, or a function without
                arguments that builds one (called at the first run, inside the hook's
                random stream, so building it draws nothing from the training's). One
                iterator is kept across runs, so an infinite loader gives new batches
                each time.
            num_iter: batches per worker and run (ignored when ``num_samples`` is given).
            num_samples: images over all workers per run, instead of ``num_iter``.
            ema_eval_function: returns evaluation results (a nested dict of floats).
            ema_eval_period: evaluation period the EMA evaluation follows; 0: last only.
            seed: seed of the hook's own :class:`~d2_batchnorm.rng.RandomStream`.
            target_rel_error: > 0: adaptive PreciseBN (see :func:`~d2_batchnorm.update_bn_stats`).
        """
        check_int("period", period, 0)
        self._model = model
        self._loader = data_loader
        self._num_iter = num_iter
        self._num_samples = num_samples
        self._period = period
        self._ema_eval = ema_eval_function
        self._ema_eval_period = ema_eval_period
        self._target_rel_error = target_rel_error
        self._iter = None
        self._rng = RandomStream(seed)
        self._stop_plans = StopPlans()  # where each run's forwards stop, learned at the first
        self._disabled_reason = ""
        self.last_ema_distance: Dict[str, float] = {}  # bn_statistics_distance of the last run
        if not get_bn_modules(model):
            self.disable("the model has no BN module in training mode")

    @classmethod
    def from_config(cls, cfg, model: nn.Module, ema_eval_function: Optional[Callable[[], Dict]] = None):
        """
        The hook of ``TEST.PRECISE_BN`` (a LazyConfig: ``train.precise_bn``), as
        :class:`~.precise_bn_settings.PreciseBNSettings` resolves it: batches from the
        training loader (training augmentations, 0 loader workers) over its datasets,
        built at the first run; the random stream seeded from the config's seed and the rank.
        """
        kind, world_size = adapt(cfg), comm.get_world_size()
        settings = PreciseBNSettings.from_config(cfg, world_size)
        return {
            "period": settings.period,
            "model": model,
            "data_loader": lambda: kind.train_loader(settings.datasets, settings.ims_per_batch, world_size),
            "num_iter": settings.num_iter,
            "num_samples": settings.num_samples,
            "ema_eval_function": ema_eval_function if settings.eval_ema else None,
            "ema_eval_period": kind.get("TEST.EVAL_PERIOD"),
            "seed": derive_seed("PreciseBN", kind.get("SEED"), comm.get_rank()),
            "target_rel_error": settings.target_rel_error,
        }

    def disable(self, reason: str) -> None:
        """Stops later runs (e.g. once BN is frozen); ``reason`` is logged."""
        if not self._disabled_reason:
            logger.info("PreciseBN disabled: %s", reason)
        self._disabled_reason = reason

    @property
    def disabled(self) -> bool:
        return bool(self._disabled_reason)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        is_final = next_iter == self.trainer.max_iter
        if self.disabled or not (is_final or (self._period > 0 and next_iter % self._period == 0)):
            return
        evaluates = is_final or (self._ema_eval_period > 0 and next_iter % self._ema_eval_period == 0)
        results, _ = self.recompute(evaluate_first=evaluates)
        if results:  # the evaluation with the EMA statistics, as ema/*
            flat = {f"ema/{k}": float(v) for k, v in flatten_results_dict(results).items()}
            self.trainer.storage.put_scalars(**flat, smoothing_hint=False)

    def recompute(self, evaluate_first: bool) -> Tuple[Optional[Dict], Optional[PreciseBNResult]]:
        """
        One run of the hook: with ``evaluate_first`` and an ``ema_eval_function``, evaluates
        with the statistics the model holds now (in the hook's random stream), then
        computes and writes precise statistics (:meth:`update_stats`). Returns (the
        evaluation's results or None, :meth:`update_stats`'s result).
        """
        results = None
        if evaluate_first and self._ema_eval is not None and not self.disabled:
            with self._rng:
                results = self._ema_eval()
            comm.synchronize()
        return results, self.update_stats()

    def _batches(self):
        """Batches from the one iterator kept across runs, until the loader ends."""
        if self._iter is None:
            if callable(self._loader) and not isinstance(self._loader, Iterable):
                self._loader = self._loader()
            self._iter = iter(self._loader)
        for batch in self._iter:  # not "yield from", which would close the kept iterator with this generator
            yield batch

    def update_stats(self) -> Optional[PreciseBNResult]:
        """
        Computes and writes precise statistics now (None when disabled); logs the scalars if
        in training and sets :attr:`last_ema_distance`.
        """
        if self.disabled:
            return None
        ema = snapshot_bn_statistics(self._model)
        # the model's own training-mode scalars are discarded; every random draw uses the hook's stream
        with EventStorage(), self._rng:
            result = update_bn_stats(
                self._model,
                self._batches(),
                self._num_iter,
                progress="tqdm" if comm.is_main_process() else None,
                num_samples=self._num_samples,
                stop_plans=self._stop_plans,
                target_rel_error=self._target_rel_error,
            )
        dist = self.last_ema_distance = bn_statistics_distance(ema, snapshot_bn_statistics(self._model))
        logger.info(  # update_bn_stats has logged the samples' standard errors
            "PreciseBN: %d images in %.1f s; EMA statistics were %.4g (mean) / %.4g (var) "
            "away from the precise ones (relative L2)",
            result.num_samples, result.seconds, dist["mean"], dist["var"],
        )
        trainer = getattr(self, "trainer", None)
        if trainer is not None and result.num_iters > 0:
            trainer.storage.put_scalars(
                **{
                    "precise_bn/seconds": result.seconds,
                    "precise_bn/samples": float(result.num_samples),
                    "precise_bn/ema_mean_rel_dist": dist["mean"],
                    "precise_bn/ema_var_rel_dist": dist["var"],
                    **summarize_errors(result.errors),
                },
                smoothing_hint=False,
            )
        return result


class FrozenBNLate(HookBase):
    """
    FrozenBN for the last iterations of training: from iteration ``start_iter`` on, every
    BN module that is in training mode at that point normalizes with its population
    statistics (``running_mean`` / ``running_var``) in the training forward, while its
    affine parameters are still learned. The freeze survives ``model.train()``: it is a
    forward pre-hook (see :func:`force_bn_mode`).

    If a :class:`PreciseBN` hook is given, precise statistics are computed right before
    freezing, and that hook is disabled afterwards (recomputing statistics after training
    adapted to frozen ones would make training and testing inconsistent again).
    """

    def __init__(self, model: nn.Module, start_iter: int, precise_bn: Optional[PreciseBN] = None):
        check_int("start_iter", start_iter, 0)
        self._model = model
        self._start_iter = start_iter
        self._precise_bn = precise_bn
        self._context = None

    @property
    def frozen(self) -> bool:
        return self._context is not None

    def before_step(self):
        if self.frozen or self.trainer.iter < self._start_iter:
            return
        if self._precise_bn is not None and not self._precise_bn.disabled:
            self._precise_bn.update_stats()
            self._precise_bn.disable(f"BN is frozen from iteration {self._start_iter} on")
        modules = [m for _, m in get_bn_modules(self._model)]
        self._context = force_bn_mode(self._model, False, modules)
        self._context.__enter__()
        logger.info("FrozenBN: %d BN modules frozen from iteration %d on", len(modules), self.trainer.iter)

    def after_train(self):
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


class AverageBNStatistics(HookBase):
    """
    ``BN.EMA_ACROSS_WORKERS: average``: after the iterations whose state is read — every
    ``period``-th of each of ``periods`` (checkpoints, evaluations; PreciseBN's EMA
    evaluation coincides with one), each of ``iterations`` (the step before FrozenBN
    starts) and the last — every rank replaces the running statistics of its BN modules in
    training mode by their mean over workers (:func:`~d2_batchnorm.bn_modes.average_running_statistics`;
    the same buffers as averaging after every step, at no cost in between). Register it on
    every rank, after the non-finite guard and before PreciseBN and the checkpointer.
    """

    def __init__(self, model: nn.Module, periods: Iterable[int] = (), iterations: Iterable[int] = ()):
        """
        Args:
            model: the (possibly DDP-wrapped) model.
            periods: average after iteration ``it`` when ``it + 1`` is a multiple of one of
                them (0: none).
            iterations: average when ``it + 1`` is one of them.
        """
        self._model = model
        self._periods = [check_int("period", p, 0) for p in periods if p]
        self._iterations = set(iterations)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if (next_iter == self.trainer.max_iter or next_iter in self._iterations
                or any(next_iter % p == 0 for p in self._periods)):
            average_running_statistics(self._model)


def build_batchnorm_hooks(cfg, model: nn.Module, evaluate: Optional[Callable[[], Dict]] = None) -> List[HookBase]:
    """
    d2_batchnorm's hooks of a yacs config or a LazyConfig, in the order to register them,
    before the checkpointer (so checkpoints hold averaged or precise statistics):
    :class:`~d2_batchnorm.engine.bn_guard.NonFiniteGuard` (``BN.GUARD_NONFINITE``, when
    ``model`` has BN modules in training mode; first, so that it never undoes PreciseBN),
    :class:`AverageBNStatistics` (``BN.EMA_ACROSS_WORKERS: average`` with several workers
    and BN modules in training mode), :class:`PreciseBN` (when enabled and ``model`` has
    BN modules in training mode; ``evaluate`` is its EMA evaluation), :class:`FrozenBNLate`
    (when the last iterations to freeze are > 0), which computes precise statistics right
    before freezing, then
    :class:`~d2_batchnorm.engine.bn_monitor.BNMonitor` (``BN.MONITOR.ENABLED``).
    """
    hooks: List[HookBase] = []
    precise = guard = None
    value = adapt(cfg).get
    trains_bn = bool(get_bn_modules(model))  # BN modules in training mode
    if value("BN.GUARD_NONFINITE") and trains_bn:
        guard = NonFiniteGuard(model)
        hooks.append(guard)
    frozen = value("BN.FROZEN_LAST_ITERS")
    freeze_at = value("SOLVER.MAX_ITER") - frozen
    if value("BN.EMA_ACROSS_WORKERS") == "average" and comm.get_world_size() > 1 and trains_bn:
        periods = (value("SOLVER.CHECKPOINT_PERIOD"), value("TEST.EVAL_PERIOD"))
        hooks.append(AverageBNStatistics(model, periods, [freeze_at] if frozen > 0 else []))
    if value("TEST.PRECISE_BN.ENABLED") and trains_bn:
        precise = PreciseBN(cfg, model, ema_eval_function=evaluate)
        hooks.append(precise)
    if frozen > 0:
        hooks.append(FrozenBNLate(model, freeze_at, precise))
    if value("BN.MONITOR.ENABLED"):
        hooks.append(BNMonitor(cfg, model, guard=guard))
    return hooks
