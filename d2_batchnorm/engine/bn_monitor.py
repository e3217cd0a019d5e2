"""
:class:`BNMonitor`: the health of a model's BatchNorm, live, during training.

Every ``period`` iterations, per module group (:func:`d2_batchnorm.precise_bn.bn_module_group`),
the monitor writes scalars ``bn_monitor/<quantity>/<group>`` to the trainer's EventStorage
(metrics.json and TensorBoard get them through detectron2's writers) and logs one warning
line per problem, once per group and kind, naming the group and the config line that
addresses it. The quantities, over the BN modules in training mode of the group:

==========================  ================================================================
``nonfinite``               modules whose running buffers or affine hold a NaN/inf (the first
                            monitored iteration it is seen at is logged, and kept in
                            ``first_nonfinite``)
``skipped_batches``         batches d2_batchnorm's norms left out of their running statistics
                            because they were not finite (``num_nonfinite_batches``)
``restored_steps``          (group ``<model>``) steps whose BN buffers
                            :class:`~d2_batchnorm.engine.bn_guard.NonFiniteGuard` restored
``rank_divergence``         max relative difference of the running buffers across ranks
                            (0 right after PreciseBN or ``BN.EMA_ACROSS_WORKERS``'s
                            averaging): per channel, for the mean
                            ``(max_r m - min_r m) / sqrt(max_r v + eps)``, for the variance
                            ``(max_r v - min_r v) / (max_r v + eps)``; the max of both
``batch_mean_shift``        train/test inconsistency of the monitored step: per module the
``batch_var_ratio``         channel average of ``|mean_b - mean_r| / sqrt(var_r + eps)`` and
                            of ``|log((var_b + eps) / (var_r + eps))|``, with the statistics
                            the module's input had in that step (over all workers for
                            synchronized norms, also when their sync groups are smaller; in
                            the layout of the running buffers) and the
                            running ones before it; the group's max
``collapsed_var``           fraction of channels with ``running_var < eps``
``collapsed_gamma``         fraction of channels with ``|gamma| <`` :data:`GAMMA_COLLAPSE`
``leakage_gap/<loss>``      the training loss of one fixed batch with population statistics
                            minus the same with batch statistics (:func:`leakage_losses`),
                            averaged over ranks; ``<loss>`` is each loss and ``total_loss``
==========================  ================================================================

Counts and the divergence, distances and fractions are the maxima over ranks (one
all-reduce MAX); synchronized norms' batch statistics are pooled over their workers (one
sum); the gap is averaged (one sum). Every rank must register the hook.

The monitor does not perturb training: the distances are read by forward pre-hooks that
exist during the monitored step only and change nothing; the gap's batch is drawn once from
the hook's own loader in its own :class:`~d2_batchnorm.rng.RandomStream`, and its forwards
leave no trace (:func:`leakage_losses`).
"""
import logging
import time
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from detectron2.config import configurable
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch import nn

from .. import distributed as d2bn_dist
from ..bn_modes import force_bn_mode
from ..checks import check_int
from ..config_kinds import YacsConfig, adapt
from ..layers.batch_stats import ChannelMoments
from ..module_state import saved_bn_state
from ..modeling.build import norm_keys_of_modules
from ..precise_bn import bn_module_group, get_bn_modules, unwrap_model
from ..rng import RandomStream, derive_seed

__all__ = [
    "BNMonitor",
    "leakage_losses",
    "DIVERGENCE_WARN",
    "INCONSISTENCY_WARN",
    "GAMMA_COLLAPSE",
    "COLLAPSE_WARN",
    "LEAKAGE_GAP_WARN",
]

logger = logging.getLogger(__name__)

#: warn when EMA buffers differ across ranks by more than this (``rank_divergence``)
DIVERGENCE_WARN = 0.1
#: warn when ``batch_mean_shift`` or ``batch_var_ratio`` exceeds this: the batch statistics
#: of a step are on average more than one running std (or a factor e in variance) away
#: from the statistics the model is evaluated with
INCONSISTENCY_WARN = 1.0
#: ``|gamma|`` below this counts as collapsed
GAMMA_COLLAPSE = 1e-3
#: warn when more than this fraction of a group's channels collapsed (variance or gamma)
COLLAPSE_WARN = 0.25
#: warn when the leakage gap exceeds this fraction of the fixed batch's total loss with
#: batch statistics
LEAKAGE_GAP_WARN = 0.25


def leakage_losses(model: nn.Module, batch, seed: int) -> Dict[str, Dict[str, float]]:
    """
    The training losses of ``batch`` under ``model`` (in training mode; no gradients) twice:
    ``"batch"`` with the BN modules normalizing by the batch's statistics (as in training:
    per worker, synchronized or after the RoI shuffle, whatever the model does), and
    ``"population"`` with population statistics (:func:`force_bn_mode` ``False``). Both
    forwards run in a fresh :class:`RandomStream` of ``seed`` (identical RoI sampling and
    shuffle permutations; the caller's random state is untouched) with a private
    EventStorage, and BN buffers and module scalars are restored after each. Every rank
    must call it (synchronized norms and the shuffle communicate).

    Returns ``{"batch": {...}, "population": {...}}``: each loss, ``total_loss`` (their
    sum) and the scalars the model wrote to its storage (e.g. ``fast_rcnn/cls_accuracy``).
    The leakage / inconsistency gap is ``population[k] - batch[k]``.
    """
    out = {}
    with torch.no_grad(), saved_bn_state(model) as restore_buffers:
        for mode in ("batch", "population"):
            statistics = nullcontext() if mode == "batch" else force_bn_mode(model, False)
            with RandomStream(seed), EventStorage(0) as storage, statistics:
                losses = model(batch)
            restore_buffers()
            values = {k: float(v) for k, v in losses.items()}
            values["total_loss"] = sum(values.values())
            for k, (v, _) in storage.latest().items():
                values.setdefault(k, float(v))
            out[mode] = values
    return out


class _StepStatistics:
    """
    Forward pre-hooks, for one training step, that add up the power sums of every BN
    module's input (in the layout of its running buffers) and keep its running buffers as
    they were before the step's update.
    """

    def __init__(self, modules: List[Tuple[str, nn.Module]]):
        self.sums: Dict[str, torch.Tensor] = {}
        self.running: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.seconds = 0.0  # spent in the pre-hooks (host time)
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules]

    def _hook(self, name):
        def pre(module, args):
            start = time.perf_counter()
            xs = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            sums = ChannelMoments.power_sums_of(*xs)  # (L, 2C+1)
            if module.running_mean.dim() == 1:
                sums = sums.sum(0, keepdim=True)
            self.sums[name] = sums if name not in self.sums else self.sums[name] + sums
            if name not in self.running:
                self.running[name] = (module.running_mean.detach().clone(), module.running_var.detach().clone())
            self.seconds += time.perf_counter() - start

        return pre

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class BNMonitor(HookBase):
    """
    The live BN monitor (module docstring for what it reports). Runs every ``period``
    iterations (at iterations ``k * period - 1``) on every rank; the distances are those of
    that iteration's training step, the gap that of the model after it.
    """

    @configurable
    def __init__(
        self,
        period: int,
        model: nn.Module,
        data_loader: Optional[Iterable] = None,
        *,
        seed: int = 0,
        guard=None,
        fix: Callable[..., str] = YacsConfig.fix,
        precise_bn: bool = False,
        ema_per_worker: bool = True,
    ):
        """
        Args:
            period: monitor every ``period`` iterations (>= 1).
            model: the (possibly DDP-wrapped) model; its BN modules in training mode are
                monitored.
            data_loader: an iterable of training batches, or a function without arguments
                that builds one (called once, in the hook's random stream); its first batch
                is the gap's fixed batch. None: no gap.
            seed: seed of the hook's own random stream (the gap's batch and forwards).
            guard: the :class:`~d2_batchnorm.engine.bn_guard.NonFiniteGuard` whose
                ``restored_steps`` are reported, if any.
            fix: the config kind's ``fix(*pairs)`` wording of config lines in warnings.
            precise_bn: whether PreciseBN is on (then its config line is not suggested).
            ema_per_worker: whether each rank evaluates with its own running statistics and
                a checkpoint keeps rank 0's (``BN.EMA_ACROSS_WORKERS: per_worker``, and
                detectron2's trainers); only then does a rank divergence warn.
        """
        self._period = check_int("period", period, 1)
        self._model = model
        self._modules = get_bn_modules(model)
        owner = norm_keys_of_modules(unwrap_model(model))
        self._norm_keys = {bn_module_group(n): owner[id(m)] for n, m in self._modules if id(m) in owner}
        self._loader = data_loader
        self._batch = None
        self._seed = seed
        self._rng = RandomStream(seed)
        self._guard = guard
        self._fix = fix
        self._precise_bn = precise_bn
        self._ema_per_worker = ema_per_worker
        self._step: Optional[_StepStatistics] = None
        self._warned: Set[Tuple[str, str]] = set()
        self.first_nonfinite: Dict[str, int] = {}
        self.last: Dict[str, float] = {}  # the scalars of the last run
        self.run_seconds: List[float] = []  # host time of each run (pre-hooks + measuring)

    @classmethod
    def from_config(cls, cfg, model: nn.Module, guard=None):
        """
        ``BN.MONITOR.PERIOD`` (a LazyConfig: ``train.bn_monitor.period``); the gap's batch
        is the first of a training loader (training datasets, the training batch per
        worker, 0 loader workers) built in the hook's stream, seeded from the config's seed
        and the rank.
        """
        kind, world_size = adapt(cfg), comm.get_world_size()
        return {
            "period": kind.get("BN.MONITOR.PERIOD"),
            "model": model,
            "data_loader": lambda: kind.train_loader(
                kind.train_datasets(), kind.images_per_worker(world_size), world_size
            ),
            "seed": derive_seed("BNMonitor", kind.get("SEED"), comm.get_rank()),
            "guard": guard,
            "fix": kind.fix,
            "precise_bn": bool(kind.get("TEST.PRECISE_BN.ENABLED")),
            "ema_per_worker": kind.get("BN.EMA_ACROSS_WORKERS") == "per_worker",
        }

    def _due(self, it: int) -> bool:
        return (it + 1) % self._period == 0

    def before_step(self):
        if self._modules and self._due(self.trainer.iter):
            self._step = _StepStatistics(self._modules)

    def after_step(self):
        if not self._due(self.trainer.iter):
            return
        scalars = self.measure()
        if scalars:
            self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)

    # ------------------------------------------------------------------ measuring
    def measure(self) -> Dict[str, float]:
        """
        One run of the monitor now: the scalars (also in :attr:`last`); warnings logged;
        its host time (with the pre-hooks of the monitored step) appended to :attr:`run_seconds`.
        """
        start = time.perf_counter()
        step, self._step = self._step, None
        if step is not None:
            step.remove()
        scalars: Dict[str, float] = {}
        if self._modules:
            scalars.update(self._buffer_health(step))
        if self._guard is not None:
            scalars["bn_monitor/restored_steps/<model>"] = float(self._guard.restored_steps)
        scalars.update(self._gap())
        self.last = scalars
        self._warn(scalars)
        self.run_seconds.append(time.perf_counter() - start + (step.seconds if step is not None else 0.0))
        return scalars

    def _buffer_health(self, step: Optional[_StepStatistics]) -> Dict[str, float]:
        groups = sorted({bn_module_group(n) for n, _ in self._modules})
        index = {g: i for i, g in enumerate(groups)}
        names = ("nonfinite", "skipped_batches", "rank_divergence", "batch_mean_shift", "batch_var_ratio",
                 "collapsed_var", "collapsed_gamma")  # the columns of local, one row per group
        local = torch.zeros(len(groups), len(names), dtype=torch.float64)
        channels = torch.zeros(len(groups), dtype=torch.float64)
        shifts = self._distances(step) if step is not None else {}
        per_module = []  # for the divergence: [m, v, -m, -v] flattened, per module
        for name, m in self._modules:
            row = local[index[bn_module_group(name)]]
            tensors = [m.running_mean, m.running_var] + [p for p in (m.weight, m.bias) if p is not None]
            row[0] += float(not all(bool(torch.isfinite(t).all()) for t in tensors))
            row[1] += float(getattr(m, "num_nonfinite_batches", 0))
            if name in shifts:
                row[3] = max(float(row[3]), shifts[name][0])
                row[4] = max(float(row[4]), shifts[name][1])
            var = m.running_var.detach().double()
            row[5] += float((var < m.eps).sum())
            if m.weight is not None:
                row[6] += float((m.weight.detach().double().abs() < GAMMA_COLLAPSE).sum())
            channels[index[bn_module_group(name)]] += var.numel()
            buffers = torch.cat([m.running_mean.detach().double().flatten(), var.flatten()]).cpu()
            per_module.append(torch.cat([buffers, -buffers]))
        flat = torch.cat(per_module)
        local[:, 5:] /= channels.clamp(min=1).unsqueeze(1)
        # ONE collective: maxima (and minima, negated) of buffers, and the maxima of the rest
        reduced = d2bn_dist.all_reduce_max_(torch.cat([flat, local.flatten()]).to(self._device())).cpu()
        flat, local = reduced[: flat.numel()], reduced[flat.numel():].view(len(groups), len(names)).clone()
        sizes = [m.running_mean.numel() for _, m in self._modules]
        for (name, m), c, part in zip(self._modules, sizes, flat.split([4 * c for c in sizes])):
            hi_m, hi_v, lo_m, lo_v = part.view(4, c)
            lo_m, lo_v = -lo_m, -lo_v
            div = torch.maximum((hi_m - lo_m) / (hi_v + m.eps).sqrt(), (hi_v - lo_v) / (hi_v + m.eps))
            row = local[index[bn_module_group(name)]]
            row[2] = max(float(row[2]), float(div.max()) if div.numel() else 0.0)
        unmeasured = ("batch_mean_shift", "batch_var_ratio") if step is None else ()
        return {f"bn_monitor/{q}/{g}": float(local[i, j])
                for g, i in index.items() for j, q in enumerate(names) if q not in unmeasured}

    def _device(self) -> torch.device:
        return self._modules[0][1].running_mean.device

    def _distances(self, step: _StepStatistics) -> Dict[str, Tuple[float, float]]:
        """Per module called in the step: (mean shift, log variance ratio), batch vs running."""
        synced = [n for n, m in self._modules if getattr(m, "sync_stats", False) and n in step.sums]
        if synced and d2bn_dist.is_distributed():  # pool over the workers, one collective
            # every rank calls the same synchronized modules (they communicate in training)
            rows = [step.sums[n] for n in synced]
            total = d2bn_dist.sum_over_ranks(torch.cat(rows))
            for n, part in zip(synced, total.split([r.shape[0] for r in rows])):
                step.sums[n] = part
        out = {}
        modules = dict(self._modules)
        for name, sums in step.sums.items():
            moments = ChannelMoments.from_power_sums(sums)
            filled = moments.count > 0
            if not bool(filled.any()):
                continue
            mean_r, var_r = (t.double().reshape(moments.mean.shape) for t in step.running[name])
            eps = modules[name].eps
            shift = ((moments.mean - mean_r).abs() / (var_r + eps).sqrt()).mean(-1)
            ratio = ((moments.var + eps) / (var_r + eps)).log().abs().mean(-1)
            out[name] = (float(shift[filled].max()), float(ratio[filled].max()))
        return out

    def _gap(self) -> Dict[str, float]:
        if self._loader is None:
            return {}
        if self._batch is None:
            with self._rng:
                loader = self._loader() if callable(self._loader) and not isinstance(self._loader, Iterable) else self._loader
                self._batch = next(iter(loader))
        losses = leakage_losses(self._model, self._batch, derive_seed("BNMonitor.gap", self._seed))
        keys = [k for k in sorted(losses["batch"]) if k.startswith("loss") or k == "total_loss"]
        gaps = torch.tensor([losses["population"][k] - losses["batch"][k] for k in keys] + [losses["batch"]["total_loss"]],
                            dtype=torch.float64)
        gaps = d2bn_dist.sum_over_ranks(gaps.to(self._device())).cpu() / d2bn_dist.group_size()
        out = {f"bn_monitor/leakage_gap/{k}": float(v) for k, v in zip(keys, gaps)}
        out["bn_monitor/gap_batch_loss/total_loss"] = float(gaps[-1])
        return out

    # ------------------------------------------------------------------ warnings
    def _norm_line(self, group: str, value: str) -> Optional[str]:
        """The config line setting the norm of ``group``'s modules (``MODEL.<key>.NORM``) to ``value``."""
        key = self._norm_keys.get(group)
        return self._fix((f"MODEL.{key}.NORM", value)) if key else None

    def _warn(self, scalars: Dict[str, float]) -> None:
        it = self.trainer.iter if getattr(self, "trainer", None) is not None else -1
        precise = "" if self._precise_bn else self._fix(("TEST.PRECISE_BN.ENABLED", True))
        for key, value in scalars.items():
            _, quantity, group = key.split("/", 2)
            if quantity == "nonfinite" and value > 0:
                self.first_nonfinite.setdefault(group, it)
                self._once(quantity, group, f"{int(value)} BN module(s) of {group} hold non-finite running "
                           f"statistics or affine (first seen at iteration {self.first_nonfinite[group]}); "
                           f"set {self._fix(('BN.GUARD_NONFINITE', True))}"
                           + (f" and {precise} to recompute them" if precise else ""))
            elif quantity in ("skipped_batches", "restored_steps") and value > 0:
                what = "batches skipped by" if quantity == "skipped_batches" else "steps with BN buffers restored in"
                self._once(quantity, group, f"{int(value)} non-finite {what} {group} (left out of the running "
                           f"statistics by {self._fix(('BN.GUARD_NONFINITE', True))}); the loss or the data "
                           "produced NaN/inf")
            elif quantity == "rank_divergence" and value > DIVERGENCE_WARN and self._ema_per_worker and not self._precise_bn:
                self._once(quantity, group, f"running statistics of {group} differ across ranks by up to "
                           f"{value:.3g} (relative; each rank evaluates with its own, a checkpoint keeps "
                           f"rank 0's): set {self._fix(('BN.EMA_ACROSS_WORKERS', 'average'))} or {precise}")
            elif quantity in ("batch_mean_shift", "batch_var_ratio") and value > INCONSISTENCY_WARN:
                line = self._norm_line(group, "SyncBN") or precise
                self._once("inconsistency", group, f"batch statistics of {group} are far from its running "
                           f"statistics ({quantity} {value:.3g} > {INCONSISTENCY_WARN}): training and "
                           f"inference normalize differently; set {line}")
            elif quantity in ("collapsed_var", "collapsed_gamma") and value > COLLAPSE_WARN:
                self._once(quantity, group, f"{value:.0%} of the channels of {group} have "
                           f"{'running_var < eps' if quantity == 'collapsed_var' else '|gamma| < %g' % GAMMA_COLLAPSE}"
                           f": set {self._norm_line(group, 'GN')}")
        total = scalars.get("bn_monitor/leakage_gap/total_loss")
        base = scalars.get("bn_monitor/gap_batch_loss/total_loss")
        if total is not None and base and total > LEAKAGE_GAP_WARN * abs(base):
            heads = sorted({bn_module_group(n) for n, m in self._modules
                            if n.startswith(("roi_heads", "head")) and not getattr(m, "sync_stats", False)})
            for group in heads or ["<model>"]:
                head = "ROI_MASK_HEAD" if group.startswith("roi_heads.mask_head") else "ROI_BOX_HEAD"
                shuffle = self._fix((f"MODEL.{head}.LEAKAGE_MITIGATION", "shuffle"))
                roi_head = group.startswith(("roi_heads.box_head", "roi_heads.mask_head"))
                line = shuffle if roi_head else self._norm_line(group, "SyncBN") or shuffle
                self._once("leakage", group, f"the training loss of a fixed batch is {total:.3g} higher with "
                           f"population statistics than with batch statistics ({total / abs(base):.0%}): "
                           f"{group} may read the batch through its statistics (leakage); set {line}")

    def _once(self, kind: str, group: str, message: str) -> None:
        if (kind, group) in self._warned:
            return
        self._warned.add((kind, group))
        if comm.is_main_process():
            logger.warning("BN monitor: %s", message)
