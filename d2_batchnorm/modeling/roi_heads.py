"""
R-CNN box and mask heads with BatchNorm whose information leakage is mitigated by config
("Rethinking 'Batch' in BatchNorm", Sec. 6).

Registered as ``MODEL.ROI_BOX_HEAD.NAME: "BNConvFCHead"`` (4conv1fc with
``NUM_CONV: 4, NUM_FC: 1``, as in the paper) and ``MODEL.ROI_MASK_HEAD.NAME:
"BNMaskRCNNConvUpsampleHead"``: detectron2's ``FastRCNNConvFCHead`` and
``MaskRCNNConvUpsampleHead`` with norms built by :func:`d2_batchnorm.layers.get_norm` and
a ``leakage_mitigation`` (``MODEL.ROI_{BOX,MASK}_HEAD.LEAKAGE_MITIGATION``):

* ``"none"``: the head's norm as configured (``"BN"``: per-worker statistics, leaky);
* ``"syncbn"``: the head's BatchNorms become d2_batchnorm's ``SyncBatchNorm``: training
  statistics over the RoIs of all workers;
* ``"shuffle"``: in training, the RoI features of all workers are shuffled with one random
  global permutation before the first layer and returned to their workers after the last
  layer that mixes RoIs (the last norm) or later, where a RoI's tensor is smaller (each
  head's docstring), so every worker normalizes a random sample of the global batch.
  Losses always see each worker's own RoIs, in their original order. Inference is unchanged.

At inference both heads compute exactly what detectron2's heads compute: the RoI shuffle is
a training-only method marked ``@torch.jit.unused``, so the heads compile with
``torch.jit.script`` and trace like detectron2's (the norms themselves become standard
modules with :func:`d2_batchnorm.layers.convert_for_inference`; SyncBN in eval mode never
communicates).
"""
from typing import Callable, List, Union

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

from ..checks import check_choice
from ..layers import NORM_NAMES, get_norm, norm_options_from_config
from ..layers.roi_shuffle import shuffle_rois, unshuffle_rois

__all__ = ["BNConvFCHead", "BNMaskRCNNConvUpsampleHead", "LEAKAGE_MITIGATIONS", "LEAKAGE_MITIGATION_NORMS",
           "check_leakage_mitigation", "leakage_args_from_config", "head_norm"]

#: The head norms each leakage mitigation applies to (None: any norm): "syncbn" turns a
#: batch-statistics norm into d2_batchnorm's SyncBN; "shuffle" needs per-worker batch
#: statistics to be worth its cost.
LEAKAGE_MITIGATION_NORMS = {
    "none": None,
    "syncbn": ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N"),
    "shuffle": ("BN", "GhostBN"),
}
#: The allowed values of the heads' ``leakage_mitigation``.
LEAKAGE_MITIGATIONS = tuple(LEAKAGE_MITIGATION_NORMS)


def check_leakage_mitigation(mitigation, norm, names=("leakage_mitigation", "conv_norm")) -> None:
    """
    Raises ``ValueError`` unless ``mitigation`` is one of :data:`LEAKAGE_MITIGATIONS` and
    applies to the head's norm ``norm``: "syncbn" needs a BatchNorm, "shuffle" a per-worker
    BatchNorm (:data:`LEAKAGE_MITIGATION_NORMS`). ``names``: what the message calls the two
    values, the heads' arguments or config keys.
    """
    check_choice(names[0], mitigation, LEAKAGE_MITIGATIONS)
    allowed = LEAKAGE_MITIGATION_NORMS[mitigation]
    if allowed is not None and norm not in allowed:
        raise ValueError(
            f"{names[0]} = {mitigation!r} needs BatchNorm in the head, but {names[1]} = {norm!r}; "
            f"allowed values of {names[1]} with it: {list(allowed)}"
        )


def leakage_args_from_config(cfg, node: str) -> dict:
    """
    The heads' arguments beyond detectron2's from ``MODEL.<node>`` ("ROI_BOX_HEAD" or
    "ROI_MASK_HEAD") and ``BN``, after :func:`check_leakage_mitigation` naming the keys.
    """
    head = cfg.MODEL[node]
    keys = (f"MODEL.{node}.LEAKAGE_MITIGATION", f"MODEL.{node}.NORM")
    check_leakage_mitigation(head.LEAKAGE_MITIGATION, head.NORM, keys)
    return dict(conv_norm=head.NORM, leakage_mitigation=head.LEAKAGE_MITIGATION, **norm_options_from_config(cfg))


def head_norm(
    conv_norm: str, leakage_mitigation: str, sync_group_size: int = 0, ghost_batch_size: int = 0
) -> Union[Callable[[int], nn.Module], str]:
    """
    The norm of a head's convs as detectron2's heads take it: a factory ``channels ->
    nn.Module`` of :func:`d2_batchnorm.layers.get_norm` name ``conv_norm``, made "SyncBN" by
    ``leakage_mitigation`` "syncbn" (``sync_group_size``, ``ghost_batch_size``: options of
    "SyncBN" / "GhostBN"), or "" for none. ``ValueError`` for an unknown name or mitigation,
    or a mitigation that does not apply to the norm (e.g. "shuffle" with "GN").
    """
    check_leakage_mitigation(leakage_mitigation, conv_norm)
    name = check_choice("conv_norm", "SyncBN" if leakage_mitigation == "syncbn" else conv_norm, NORM_NAMES)
    options = {"sync_group_size": sync_group_size, "ghost_batch_size": ghost_batch_size}
    return name and (lambda channels: get_norm(name, channels, **options))


class _RoILayers:
    """
    What both heads add to detectron2's: ``from_config`` with the arguments of
    :func:`leakage_args_from_config` from ``MODEL.<_CONFIG_NODE>``, and ``layers(x)`` for a
    head that is an ``nn.Sequential`` of layers over (R, ...) RoI features (detectron2's
    mask head calls it from its forward; the box head's forward is it): the layers in
    order, as in detectron2's heads; in training with ``leakage_mitigation`` "shuffle",
    over RoIs shuffled across workers (:meth:`_shuffled_layers`). That branch is
    ``@torch.jit.unused``: TorchScript compiles only detectron2's inference graph.
    """

    #: the leakage mitigations the heads implement (config checks ask the registry)
    LEAKAGE_MITIGATIONS = LEAKAGE_MITIGATIONS

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), **leakage_args_from_config(cfg, cls._CONFIG_NODE)}

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """(R, ...) features -> (R, ...) outputs, in this worker's RoI order."""
        if self.training and self.leakage_mitigation == "shuffle":
            return self._shuffled_layers(x)
        for layer in self:
            x = layer(x)
        return x

    @torch.jit.unused
    def _shuffled_layers(self, x: torch.Tensor) -> torch.Tensor:
        """
        The layers over the rows shuffled across workers (:func:`shuffle_rois`), returned to
        this worker in its original order (:func:`unshuffle_rois`) before layer number
        ``self.unshuffle_at`` (0-based; None: after the last layer). The layers from
        ``unshuffle_at`` on must work per RoI.
        """
        x, state = shuffle_rois(x)
        for i, layer in enumerate(self):
            if state is not None and i == self.unshuffle_at:
                x, state = unshuffle_rois(x, state), None
            x = layer(x)
        return x if state is None else unshuffle_rois(x, state)


@ROI_BOX_HEAD_REGISTRY.register()
class BNConvFCHead(_RoILayers, FastRCNNConvFCHead):
    """
    detectron2's conv+fc box head (convs with norm and ReLU, then flatten and fcs with
    ReLU) with d2_batchnorm's norms and leakage mitigation. Input (R, C, H, W) pooled RoI
    features, output (R, FC_DIM) (or (R, C', H, W) without fcs), R the RoIs of this worker.
    With "shuffle" the RoIs return to their workers after the fcs (R x FC_DIM is small),
    or right after the convs if there are none.
    """

    _CONFIG_NODE = "ROI_BOX_HEAD"

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dims: List[int], fc_dims: List[int],
                 conv_norm: str = "", leakage_mitigation: str = "none", sync_group_size: int = 0,
                 ghost_batch_size: int = 0):
        """
        Args:
            input_shape: (C, H, W) of the pooled RoI features.
            conv_dims, fc_dims: output dimensions of the conv layers and of the fc layers
                (the paper's 4conv1fc: ``[256] * 4`` and ``[1024]``).
            conv_norm, leakage_mitigation, sync_group_size, ghost_batch_size: the norm of
                the convs and its leakage mitigation (:func:`head_norm`). ``conv_norm``
                defaults to "" (no norm) as in detectron2's head, on purpose: the same
                arguments build the same module as detectron2's, so this head can replace
                it anywhere; configs choose the norm with ``MODEL.ROI_BOX_HEAD.NORM``, and
                "syncbn" / "shuffle" refuse a head without BatchNorm.
        """
        norm = head_norm(conv_norm, leakage_mitigation, sync_group_size, ghost_batch_size)
        super().__init__(input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=norm)
        self.leakage_mitigation = leakage_mitigation
        #: index of the first layer that gets this worker's own RoIs back (None: the output)
        self.unshuffle_at = None if fc_dims else len(conv_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) -> (R, FC_DIM); shuffled across workers in training if configured."""
        return self.layers(x)


@ROI_MASK_HEAD_REGISTRY.register()
class BNMaskRCNNConvUpsampleHead(_RoILayers, MaskRCNNConvUpsampleHead):
    """
    detectron2's mask head (convs with norm and ReLU, 2x deconv, 1x1 predictor) with
    d2_batchnorm's norms and leakage mitigation. Input (R, C, M, M) pooled features of the
    foreground RoIs, logits (R, K, 2M, 2M). With "shuffle" the RoIs return to their
    workers where a RoI is smaller: after the convs (C' x M x M, C' the last conv's
    channels) if C' <= 4K, else after the predictor (K x 2M x 2M); the losses see each
    worker's own RoIs in their original order.
    """

    _CONFIG_NODE = "ROI_MASK_HEAD"

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_classes: int, conv_dims: List[int],
                 conv_norm: str = "", leakage_mitigation: str = "none", sync_group_size: int = 0,
                 ghost_batch_size: int = 0, **kwargs):
        """
        Args:
            input_shape: (C, M, M) of the pooled features.
            num_classes: K, mask classes (1 when class-agnostic).
            conv_dims: output dimensions of the convs and (last entry) of the deconv.
            conv_norm, leakage_mitigation, sync_group_size, ghost_batch_size: as
                :class:`BNConvFCHead` (``conv_norm`` "" by default, as in detectron2's head).
            kwargs: ``loss_weight``, ``vis_period`` of detectron2's ``BaseMaskRCNNHead``.
        """
        norm = head_norm(conv_norm, leakage_mitigation, sync_group_size, ghost_batch_size)
        super().__init__(input_shape, num_classes=num_classes, conv_dims=conv_dims, conv_norm=norm, **kwargs)
        self.leakage_mitigation = leakage_mitigation
        channels = conv_dims[-2] if len(conv_dims) > 1 else input_shape.channels  # C' (class docstring)
        self.unshuffle_at = len(conv_dims) - 1 if channels <= 4 * num_classes else None
