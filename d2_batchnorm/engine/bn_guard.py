"""
:class:`NonFiniteGuard`: a training step whose gradients are not finite leaves the BN
buffers as they were before it.

d2_batchnorm's norms leave a non-finite batch out of their running statistics themselves
(:func:`d2_batchnorm.layers.batch_stats.update_running_stats_`). torch's BatchNorm modules
cannot: the forward of a step updates the running buffers before anyone knows the step is
bad — a NaN/inf loss, an overflow that AMP's GradScaler answers by skipping the optimizer
step. The optimizer step is skipped, the poisoned (or merely perturbed) buffers are not
(pytorch#88474). This hook makes the buffers follow the optimizer.
"""
import logging
import time
from typing import List, Optional

import torch
from detectron2.engine import HookBase
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NonFiniteGuard"]

logger = logging.getLogger(__name__)

#: buffers a BN module keeps for bookkeeping the guard does not restore (the count of
#: skipped batches of d2_batchnorm's norms must survive a restored step)
_NOT_RESTORED = ("num_nonfinite_batches",)


class NonFiniteGuard(HookBase):
    """
    ``before_step`` copies every buffer of every BN module of ``model`` (running mean and
    variance, ``num_batches_tracked``) into copies allocated once; ``after_step`` computes
    the total gradient norm of the step (``torch.nn.utils.get_total_norm``: gradients are
    still on the parameters, ``zero_grad`` comes with the next step) and, if it is not
    finite, puts the copies back: ``b <- where(finite, b, saved)``, with no host
    synchronization. ``restored_steps`` (an int64 0-dim tensor) counts such steps; the BN
    monitor reports it.

    Under DDP the gradients are all-reduced, so every rank sees the same verdict; the
    gradients of AMP's skipped steps hold the inf/NaN that made GradScaler skip them
    (``unscale_`` works in place). A step with a non-finite loss raises
    ``FloatingPointError`` in detectron2's trainer (rank 0) before this hook runs; that stays.
    Register it before PreciseBN, whose statistics it must not undo.

    Cost per step: one copy of the BN buffers, one gradient norm (a fused pass over the
    gradients) and one ``where`` per buffer; ``tools/bench_monitor.py`` measures it.
    """

    def __init__(self, model: nn.Module):
        self._model = model
        self._buffers: Optional[List[torch.Tensor]] = None
        self._saved: List[torch.Tensor] = []
        self._params: List[torch.Tensor] = []
        self.restored_steps = torch.zeros((), dtype=torch.long)
        self.seconds = 0.0  # host time spent in this hook (asynchronous device work not included)

    def _collect(self) -> None:
        self._buffers = [
            b
            for m in self._model.modules()
            if isinstance(m, _BatchNorm)
            for name, b in m.named_buffers(recurse=False)
            if name not in _NOT_RESTORED
        ]
        self._saved = [torch.empty_like(b) for b in self._buffers]
        self._params = [p for p in self._model.parameters() if p.requires_grad]
        if self._params:
            self.restored_steps = self.restored_steps.to(self._params[0].device)

    @torch.no_grad()
    def before_step(self):
        start = time.perf_counter()
        if self._buffers is None:
            self._collect()
        for saved, b in zip(self._saved, self._buffers):
            saved.copy_(b)
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def after_step(self):
        start = time.perf_counter()
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads or not self._buffers:
            return
        finite = torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))
        for saved, b in zip(self._saved, self._buffers):
            b.copy_(torch.where(finite, b, saved))
        self.restored_steps.add_(finite.logical_not().to(self.restored_steps.dtype))
        self.seconds += time.perf_counter() - start
