"""
RetinaNet whose head, shared across FPN levels, normalizes with per-level, shared or
naive statistics (``MODEL.RETINANET.NORM_STATS`` / ``POPULATION_STATS``), registered as
the meta-architecture ``"BNRetinaNet"``.
"""
import logging
from typing import List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from torch import nn

from ..checks import check_choice
from ..layers import LEVEL_STATS, LevelBatchNorm, get_norm, norm_options_from_config

__all__ = ["BNRetinaNet", "BNRetinaNetHead", "LevelSequential"]

logger = logging.getLogger(__name__)


class LevelSequential(nn.Sequential):
    """
    A subnet of layers shared by the L FPN levels, called with the list of the L level
    tensors (N, C, H_i, W_i) and returning the list of their outputs. A norm that takes
    all levels at once (one with ``num_levels``: :class:`LevelBatchNorm`, or the
    :class:`PerLevelNorms` that :func:`d2_batchnorm.layers.convert_for_inference` makes of
    it) gets the list; every other layer is applied to each level in turn. Compiles with
    ``torch.jit.script`` once its norms are standard (``LevelBatchNorm`` itself is not
    scriptable; in eval mode it traces).
    """

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        for layer in self:
            if hasattr(layer, "num_levels"):
                features = layer(features)
            else:
                features = [layer(x) for x in features]
        return features


class BNRetinaNetHead(RetinaNetHead):
    """
    detectron2's ``RetinaNetHead`` (two subnets of ``NUM_CONVS`` 3x3 conv + norm + ReLU,
    then the classification and box-regression convs: its layers and initialization), with
    other norms and a different way to call them: explicit statistics for the norm layers
    shared across the L FPN levels, whose subnets are called with all levels at once.

    With ``norm`` "BN" (per-worker) or "SyncBN" (synchronized over workers, sync groups of
    ``sync_group_size``) and ``norm_stats``:

    * ``"per_level"`` / ``"shared"``: each norm is ONE :class:`LevelBatchNorm` called with
      the L level tensors at once; training statistics per level or joint over all levels;
      population statistics ``population_stats`` ("" = the same as training), affine
      shared across levels or not (``share_affine``);
    * ``"naive"``: detectron2's plain shared BN, one ``get_norm(norm)`` module called once per
      level (per-level training statistics, one EMA over all levels) — the inconsistent
      baseline.

    Any other norm name ("GN", "LN", "FrozenBN", "GhostBN", "naiveSyncBN", ...) is one
    ``get_norm(norm)`` module applied to each level in turn.
    """

    #: allowed ``norm_stats``: :class:`LevelBatchNorm`'s modes, and "naive"
    NORM_STATS = LEVEL_STATS + ("naive",)
    #: allowed ``population_stats``: "" (the same as ``norm_stats``) or a LevelBatchNorm mode
    POPULATION_STATS = ("",) + LEVEL_STATS

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: int,
        conv_dims: List[int],
        norm: str = "",
        norm_stats: str = "per_level",
        population_stats: str = "",
        share_affine: bool = True,
        sync_group_size: int = 0,
        ghost_batch_size: int = 0,
        prior_prob: float = 0.01,
    ):
        """
        Args:
            input_shape: shapes of the L FPN levels, high to low resolution.
            num_classes, num_anchors: K classes and A anchors per location.
            conv_dims: output channels of each subnet conv.
            norm: a :func:`d2_batchnorm.layers.get_norm` name ("" for none).
            norm_stats: one of :attr:`NORM_STATS` (``MODEL.RETINANET.NORM_STATS``).
            population_stats: one of :attr:`POPULATION_STATS` (``MODEL.RETINANET.POPULATION_STATS``).
            share_affine: one affine for all levels (``MODEL.RETINANET.NORM_SHARE_AFFINE``).
            sync_group_size, ghost_batch_size: options of "SyncBN" / "GhostBN".
            prior_prob: initial foreground probability of the classification output.
        """
        self.check_stats(norm_stats, population_stats)
        # detectron2's layers and initialization, without norms; ours go after each conv
        super().__init__(input_shape=input_shape, num_classes=num_classes, num_anchors=num_anchors,
                         conv_dims=conv_dims, norm="", prior_prob=prior_prob)
        level_stats = norm in ("BN", "SyncBN") and norm_stats != "naive"  # the class docstring's rule
        if norm:
            logger.info(
                f"BNRetinaNetHead: norm={norm!r} over {self._num_features} levels, "
                + (f"training statistics {norm_stats!r}, population statistics "
                   f"{population_stats or norm_stats!r}" if level_stats else "one module applied per level")
            )

        def make_norm(channels: int) -> nn.Module:
            if level_stats:
                return LevelBatchNorm(
                    channels, self._num_features, norm_stats, population_stats, share_affine,
                    sync_group_size=sync_group_size if norm == "SyncBN" else None,
                )
            return get_norm(norm, channels, sync_group_size=sync_group_size, ghost_batch_size=ghost_batch_size)

        self.cls_subnet = self._with_norms(self.cls_subnet, make_norm if norm else None)
        self.bbox_subnet = self._with_norms(self.bbox_subnet, make_norm if norm else None)

    @staticmethod
    def _with_norms(subnet: nn.Sequential, make_norm) -> LevelSequential:
        """``subnet``'s layers with a norm after each conv, called with all levels at once."""
        layers = []
        for layer in subnet:
            layers.append(layer)
            if make_norm is not None and isinstance(layer, nn.Conv2d):
                layers.append(make_norm(layer.out_channels))
        return LevelSequential(*layers)

    @classmethod
    def check_stats(cls, norm_stats, population_stats, names=("norm_stats", "population_stats")) -> None:
        """
        Raises ``ValueError`` unless ``norm_stats`` is one of :attr:`NORM_STATS` and
        ``population_stats`` one of :attr:`POPULATION_STATS` ("" with "naive"). ``names``:
        what the message calls the two values, the head's arguments or config keys.
        """
        check_choice(names[0], norm_stats, cls.NORM_STATS)
        check_choice(names[1], population_stats, cls.POPULATION_STATS)
        if norm_stats == "naive" and population_stats:
            raise ValueError(
                f"{names[1]} = {population_stats!r} is not allowed with {names[0]} = 'naive' (one "
                "plain BN, one EMA); allowed values: [''] — for per-level training statistics "
                f"with chosen population statistics use {names[0]} = 'per_level'"
            )

    @classmethod
    def check_config(cls, cfg) -> None:
        """:meth:`check_stats` of ``MODEL.RETINANET.NORM_STATS`` and ``POPULATION_STATS``."""
        retina = cfg.MODEL.RETINANET
        keys = ("MODEL.RETINANET.NORM_STATS", "MODEL.RETINANET.POPULATION_STATS")
        cls.check_stats(retina.NORM_STATS, retina.POPULATION_STATS, keys)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        cls.check_config(cfg)
        num_anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        if len(set(num_anchors)) != 1:
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR gives {num_anchors} anchors per location on the FPN "
                "levels; a head shared across levels needs the same number on every level"
            )
        retina = cfg.MODEL.RETINANET
        return {
            **RetinaNetHead.from_config(cfg, input_shape),  # shapes, K, A, convs, NORM, PRIOR_PROB
            "norm_stats": retina.NORM_STATS,
            "population_stats": retina.POPULATION_STATS,
            "share_affine": retina.NORM_SHARE_AFFINE,
            **norm_options_from_config(cfg),
        }

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features: L tensors (N, C, H_i, W_i), FPN levels from high to low resolution.
        Returns:
            logits: L tensors (N, A*K, H_i, W_i); bbox_reg: L tensors (N, A*4, H_i, W_i).
        """
        if len(features) != self._num_features:
            raise ValueError(f"expected {self._num_features} FPN levels, got {len(features)}")
        logits = [self.cls_score(x) for x in self.cls_subnet(features)]
        bbox_reg = [self.bbox_pred(x) for x in self.bbox_subnet(features)]
        return logits, bbox_reg


@META_ARCH_REGISTRY.register()
class BNRetinaNet(RetinaNet):
    """
    detectron2's RetinaNet with :class:`BNRetinaNetHead`. Select it with
    ``MODEL.META_ARCHITECTURE: "BNRetinaNet"``; everything else is detectron2's RetinaNet.
    """

    @classmethod
    def from_config(cls, cfg):
        """
        detectron2's ``RetinaNet.from_config`` with its head replaced by
        :class:`BNRetinaNetHead` (detectron2 builds its own head, with no way to pass
        another: it builds one without norms, which is dropped, so our head's random
        initialization is drawn after it).
        """
        d2_cfg = cfg.clone()
        d2_cfg.defrost()
        d2_cfg.MODEL.RETINANET.NORM = ""  # detectron2's get_norm may not know ours ("GhostBN")
        ret = super().from_config(d2_cfg)
        shapes = [ret["backbone"].output_shape()[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        ret["head"] = BNRetinaNetHead(cfg, shapes)
        return ret
