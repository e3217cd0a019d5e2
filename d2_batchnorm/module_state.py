"""
Saving and restoring the state of a model's modules, for everything that runs a model and
must leave no trace: BN buffers and the plain Python scalars of every module
(:func:`saved_bn_state`), and snapshots of the BN running statistics with their distance
(:func:`snapshot_bn_statistics`, :func:`bn_statistics_distance`).
"""
from contextlib import contextmanager
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["saved_bn_state", "snapshot_bn_statistics", "bn_statistics_distance"]


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
    created are removed), so forwards inside it leave no trace in later training.
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


def snapshot_bn_statistics(model: nn.Module) -> Dict[str, torch.Tensor]:
    """
    ``{"<module>.running_mean": tensor, "<module>.running_var": tensor}`` (clones) of every
    BN module of ``model`` that tracks running statistics, in any mode.
    """
    return {f"{name}.{k}": getattr(m, k).detach().clone()
            for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_mean is not None
            for k in ("running_mean", "running_var")}


def bn_statistics_distance(
    before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]
) -> Dict[str, float]:
    """
    Relative distance of two :func:`snapshot_bn_statistics`, per kind of buffer, over all
    modules together::

        d_mean = ||mean_before - mean_after||_2 / ||mean_after||_2   (same for var)

    Returns ``{"mean": d_mean, "var": d_var}`` (NaN where there is nothing to compare).
    """
    out = {}
    for kind in ("mean", "var"):
        keys = [k for k in after if k.endswith(f".running_{kind}") and k in before]
        if not keys:
            out[kind] = float("nan")
            continue
        a = torch.cat([after[k].double().flatten() for k in keys])
        b = torch.cat([before[k].double().flatten() for k in keys])
        out[kind] = float((b - a).norm() / a.norm().clamp(min=1e-12))
    return out
