"""
Forwards that stop after the last call of given modules (:class:`EarlyExit`): PreciseBN
needs a model's forward only up to its last BatchNorm, so the layers and losses after it
are not computed. A plan learned for a model (:class:`StopPlans`) serves later runs.
"""
import logging
import weakref
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

from torch import nn

__all__ = ["EarlyExit", "StopPlans"]

logger = logging.getLogger("d2_batchnorm.precise_bn")


class _StopForward(Exception):
    """Raised by a forward hook once the last BN call of a forward has completed."""


class _StopPlan(NamedTuple):
    """Where the forwards of a model stop (learned by :class:`EarlyExit`)."""

    modules: Tuple[nn.Module, ...]  # the statistics modules it was learned for, in order
    calls: Tuple[nn.Module, ...]  # the statistics modules in the order they are called
    stop_module: nn.Module  # the forward stops at the stop_count-th end of stop_module
    stop_count: int


class StopPlans:
    """
    The stop plan learned for each model (``by_model``: keyed by the unwrapped model,
    forgotten with it), kept by whoever runs :func:`~d2_batchnorm.update_bn_stats` on the
    same model again — the PreciseBN hook's periodic runs in a training — so later calls
    need no full forward.
    """

    def __init__(self):
        self.by_model: "weakref.WeakKeyDictionary[nn.Module, _StopPlan]" = weakref.WeakKeyDictionary()


class EarlyExit:
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

    The plan is kept per model in ``plans`` (:class:`StopPlans`) and used again when the
    statistics modules are the same objects in the same order. It is never trusted
    blindly: a forward stops only if the statistics modules were called exactly in the
    planned order up to the stop point; otherwise, or if it never reaches the stop point,
    the forward runs to its end (every call recorded, statistics exact) and the next
    forward learns the plan anew. What no check before the stop point can see is a batch
    that would call statistics modules *after* it that the learned batch did not; the
    detection models of detectron2 call the same BN modules in the same order for every
    batch.
    """

    def __init__(self, net: nn.Module, modules: Sequence[nn.Module], plans: StopPlans):
        self._net, self._plans = net, plans.by_model
        self._modules = tuple(modules)
        self._watched = {id(m) for m in modules}
        plan = self._plans.get(net)
        # modules compare by identity (nn.Module defines no __eq__: named_modules hashes them)
        self.plan: Optional[_StopPlan] = plan if plan is not None and plan.modules == self._modules else None
        self._calls: List[nn.Module] = []  # statistics modules called in this forward
        self._ends = 0
        self._handles = []
        self._stop_handle = None

    def __enter__(self) -> "EarlyExit":
        log = self._calls.append
        self._handles = [m.register_forward_pre_hook(lambda mod, args: log(mod)) for m in self._modules]
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
        self._plans.pop(self._net, None)
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
        self._plans[self._net] = plan
        self._set_plan(plan)

    def _maybe_stop(self, module, args, output) -> None:
        self._ends += 1
        if self._ends == self.plan.stop_count and tuple(self._calls) == self.plan.calls:
            raise _StopForward()
