"""
R-CNN box and mask heads with BatchNorm whose information leakage is mitigated by config
("Rethinking 'Batch' in BatchNorm", Sec. 6).

Registered as ``MODEL.ROI_BOX_HEAD.NAME: "BNConvFCHead"`` (4conv1fc with
``NUM_CONV: 4, NUM_FC: 1``, as in the paper) and ``MODEL.ROI_MASK_HEAD.NAME:
"BNMaskRCNNConvUpsampleHead"``. They are detectron2's ``FastRCNNConvFCHead`` and
``MaskRCNNConvUpsampleHead`` with norms built by :func:`d2_batchnorm.layers.get_norm` and
``MODEL.ROI_{BOX,MASK}_HEAD.LEAKAGE_MITIGATION``:

* ``"none"``: the head's norm as configured (``"BN"``: per-worker statistics, leaky);
* ``"syncbn"``: the head's BatchNorms become d2_batchnorm's ``SyncBatchNorm``: training
  statistics over the RoIs of all workers;
* ``"shuffle"``: in training, the RoI features of all workers are shuffled with one random
  global permutation before the first layer and returned to their workers after the last
  layer that mixes RoIs (the last norm), so every worker normalizes a random sample of the
  global batch; per-RoI layers after that point give identical results on either side of
  the unshuffle, so it happens where the per-RoI tensor is smallest. Losses always see
  each worker's own RoIs, in their original order. Inference is unchanged.
"""
from typing import Callable, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    FastRCNNConvFCHead,
    MaskRCNNConvUpsampleHead,
)
from torch import nn

from ..config import check_leakage_mitigation
from ..layers import NORM_NAMES, get_norm, norm_options_from_config
from ..layers.roi_shuffle import shuffle_rois, unshuffle_rois

__all__ = ["BNConvFCHead", "BNMaskRCNNConvUpsampleHead", "head_norm"]


def head_norm(
    norm: str,
    mitigation: str,
    *,
    sync_group_size: int = 0,
    ghost_batch_size: int = 0,
    mitigation_arg: str = "leakage_mitigation",
    norm_arg: str = "conv_norm",
) -> Optional[Callable[[int], nn.Module]]:
    """
    The norm factory ``channels -> nn.Module`` of a head with norm name ``norm`` under
    leakage mitigation ``mitigation`` ("syncbn" turns BatchNorm into ``"SyncBN"``), or
    ``None`` for no norm.

    Raises:
        ValueError: an unknown norm name or mitigation, or a mitigation that does not
        apply to ``norm`` (e.g. "shuffle" with "GN"), naming ``mitigation_arg`` / ``norm_arg``.
    """
    check_leakage_mitigation(mitigation_arg, mitigation, norm_arg, norm)
    name = "SyncBN" if mitigation == "syncbn" else norm
    if not name:
        return None
    if name not in NORM_NAMES:
        raise ValueError(f"{norm_arg} = {name!r} is not allowed; allowed values: {list(NORM_NAMES)}")
    options = {"sync_group_size": sync_group_size, "ghost_batch_size": ghost_batch_size}
    return lambda channels: get_norm(name, channels, **options)


def _mitigation_from_config(cfg, node: str) -> dict:
    """The heads' ``from_config`` arguments of ``MODEL.<node>`` (checked, naming the keys)."""
    head = cfg.MODEL[node]
    check_leakage_mitigation(
        f"MODEL.{node}.LEAKAGE_MITIGATION", head.LEAKAGE_MITIGATION, f"MODEL.{node}.NORM", head.NORM
    )
    return dict(
        conv_norm=head.NORM, leakage_mitigation=head.LEAKAGE_MITIGATION, **norm_options_from_config(cfg)
    )


def _run_layers(layers: nn.Module, x: torch.Tensor, shuffle: bool, unshuffle_after: int) -> torch.Tensor:
    """
    Applies the children of ``layers`` in order to (R, ...) RoI features. With ``shuffle``,
    the rows are shuffled across workers first (:func:`shuffle_rois`) and returned to this
    worker's original order right after child number ``unshuffle_after``.
    """
    state = None
    if shuffle:
        x, state = shuffle_rois(x)
    for i, layer in enumerate(layers):
        x = layer(x)
        if state is not None and i == unshuffle_after:
            x = unshuffle_rois(x, state)
            state = None
    return x


def _last_norm_index(layers: List[nn.Module]) -> int:
    """Index of the last layer that holds a norm (mixes RoIs in training), -1 if none."""
    last = -1
    for i, layer in enumerate(layers):
        if getattr(layer, "norm", None) is not None:
            last = i
    return last


def _per_roi_numel(shape) -> int:
    return int(np.prod([d for d in shape if d]))


class _LeakageMitigation:
    """
    What both heads add to detectron2's: config reading for ``MODEL.<_CFG_NODE>`` and the
    layer loop that shuffles RoIs across workers in training when configured. Subclasses
    set ``leakage_mitigation`` and ``_unshuffle_after`` (index of the child after which
    rows go back to their workers).
    """

    _CFG_NODE = ""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(_mitigation_from_config(cfg, cls._CFG_NODE))
        return ret

    def _apply_layers(self, x: torch.Tensor) -> torch.Tensor:
        shuffle = self.training and self.leakage_mitigation == "shuffle"
        return _run_layers(self, x, shuffle, self._unshuffle_after)


@ROI_BOX_HEAD_REGISTRY.register()
class BNConvFCHead(_LeakageMitigation, FastRCNNConvFCHead):
    """
    detectron2's conv+fc box head (convs with norm and ReLU, then fcs with ReLU) with
    d2_batchnorm's norms and leakage mitigation. Input (R, C, H, W) pooled RoI features,
    output (R, FC_DIM) (or (R, C', H, W) without fcs), R the RoIs of this worker.
    """

    _CFG_NODE = "ROI_BOX_HEAD"

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        conv_dims: List[int],
        fc_dims: List[int],
        conv_norm: str = "BN",
        leakage_mitigation: str = "none",
        sync_group_size: int = 0,
        ghost_batch_size: int = 0,
    ):
        """
        Args:
            input_shape: shape of the pooled RoI features.
            conv_dims, fc_dims: output dimensions of the conv layers and of the fc layers
                (the paper's 4conv1fc: ``[256] * 4`` and ``[1024]``).
            conv_norm: norm name of the conv layers (see :func:`d2_batchnorm.layers.get_norm`).
            leakage_mitigation: "none", "syncbn" or "shuffle" (module docstring).
            sync_group_size, ghost_batch_size: options of "SyncBN" / "GhostBN".
        """
        norm = head_norm(
            conv_norm,
            leakage_mitigation,
            sync_group_size=sync_group_size,
            ghost_batch_size=ghost_batch_size,
        )
        super().__init__(input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=norm or "")
        self.leakage_mitigation = leakage_mitigation
        # Unshuffle after the last layer if the head ends with fcs (R x FC_DIM is small),
        # else right after the last norm layer: everything after it works per RoI.
        layers = list(self)
        last_norm = _last_norm_index(layers)
        self._unshuffle_after = len(layers) - 1 if fc_dims else max(last_norm, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) -> (R, FC_DIM); shuffled across workers in training if configured."""
        return self._apply_layers(x)


@ROI_MASK_HEAD_REGISTRY.register()
class BNMaskRCNNConvUpsampleHead(_LeakageMitigation, MaskRCNNConvUpsampleHead):
    """
    detectron2's mask head (convs with norm and ReLU, 2x deconv, 1x1 predictor) with
    d2_batchnorm's norms and leakage mitigation. Input (R, C, M, M) pooled features of the
    foreground RoIs, logits (R, K, 2M, 2M). With "shuffle" the losses see each worker's
    own RoIs in their original order.
    """

    _CFG_NODE = "ROI_MASK_HEAD"

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        conv_dims: List[int],
        conv_norm: str = "BN",
        leakage_mitigation: str = "none",
        sync_group_size: int = 0,
        ghost_batch_size: int = 0,
        **kwargs,
    ):
        """
        Args:
            input_shape: shape of the pooled RoI features.
            num_classes: K, mask classes (1 when class-agnostic).
            conv_dims: output dimensions of the convs and (last entry) of the deconv.
            conv_norm: norm name of the convs (see :func:`d2_batchnorm.layers.get_norm`).
            leakage_mitigation: "none", "syncbn" or "shuffle" (module docstring).
            sync_group_size, ghost_batch_size: options of "SyncBN" / "GhostBN".
            kwargs: ``loss_weight``, ``vis_period`` of detectron2's ``BaseMaskRCNNHead``.
        """
        norm = head_norm(
            conv_norm,
            leakage_mitigation,
            sync_group_size=sync_group_size,
            ghost_batch_size=ghost_batch_size,
        )
        super().__init__(
            input_shape, num_classes=num_classes, conv_dims=conv_dims, conv_norm=norm or "", **kwargs
        )
        self.leakage_mitigation = leakage_mitigation
        # Per-RoI sizes: after the last conv+norm (C * M * M) or at the output (K * 2M * 2M);
        # the deconv in between is per RoI, so the unshuffle goes where the tensor is smaller.
        layers = list(self)
        last_norm = max(_last_norm_index(layers), 0)
        side = input_shape.height or 14
        after_norm = _per_roi_numel((conv_dims[-2] if len(conv_dims) > 1 else input_shape.channels, side, side))
        at_output = _per_roi_numel((num_classes, 2 * side, 2 * side))
        self._unshuffle_after = last_norm if after_norm <= at_output else len(layers) - 1

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, M, M) features -> (R, K, 2M, 2M) mask logits, in this worker's RoI order."""
        return self._apply_layers(x)
