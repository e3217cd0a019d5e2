"""
Precise statistics for a trained model, as training computes them (:func:`recompute_and_evaluate`);
``d2bn precise-bn`` (a checkpoint) and ``d2bn audit --eval`` run it.
"""
from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from ..module_state import snapshot_bn_statistics
from ..precise_bn import PreciseBNResult
from .hooks import PreciseBN
from .lazy import test_any

__all__ = ["Recomputed", "recompute_and_evaluate"]


class Recomputed(NamedTuple):
    """What :func:`recompute_and_evaluate` did."""

    result: PreciseBNResult
    before: Optional[Dict]  # evaluation results with the model's own statistics (None: not evaluated)
    after: Optional[Dict]  # ... with the precise statistics
    ema_distance: Dict[str, float]  # module_state.bn_statistics_distance(before, after)
    statistics_before: Dict[str, torch.Tensor]  # module_state.snapshot_bn_statistics
    statistics_after: Dict[str, torch.Tensor]


def recompute_and_evaluate(cfg, model: nn.Module, evaluate: bool = True) -> Recomputed:
    """
    Runs the PreciseBN hook of ``cfg`` (yacs or LazyConfig: its settings, data loader and
    random stream, as in training) once on ``model``: with ``evaluate``, evaluates first
    (``test_any``) with the statistics the model holds, then replaces the statistics of
    every BN module in training mode by precise ones, then evaluates again. The model ends
    in eval mode.
    """
    evaluation = (lambda: test_any(cfg, model)) if evaluate else None
    model.train()  # the BN modules PreciseBN updates are those in training mode
    hook = PreciseBN(**{**PreciseBN.from_config(cfg, model), "ema_eval_function": evaluation})
    statistics_before = snapshot_bn_statistics(model)
    before, result = hook.recompute(evaluate_first=evaluate)
    model.eval()
    after = test_any(cfg, model) if evaluate else None
    return Recomputed(result, before, after, hook.last_ema_distance, statistics_before,
                      snapshot_bn_statistics(model))
