"""
RetinaNet whose head, shared across FPN levels, normalizes with per-level, shared or
naive statistics (``MODEL.RETINANET.NORM_STATS`` / ``POPULATION_STATS``), registered as
the meta-architecture ``"BNRetinaNet"``.
"""
import logging
import math
from typing import List, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from torch import nn

from ..layers import LevelBatchNorm, get_norm, norm_options_from_config

__all__ = ["BNRetinaNet", "BNRetinaNetHead", "LEVEL_STATS_NORMS"]

logger = logging.getLogger(__name__)

#: head norms that get level statistics (the others are one module applied to each level)
LEVEL_STATS_NORMS = ("BN", "SyncBN")


class BNRetinaNetHead(nn.Module):
    """
    detectron2's RetinaNet head (two subnets of ``NUM_CONVS`` 3x3 conv + norm + ReLU, then
    the classification and box-regression convs; same attribute names and
    initialization), with explicit statistics for the norm layers shared across the L FPN
    levels.

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
            norm_stats: "per_level", "shared" or "naive" (``MODEL.RETINANET.NORM_STATS``).
            population_stats: "", "per_level" or "shared" (``MODEL.RETINANET.POPULATION_STATS``).
            share_affine: one affine for all levels (``MODEL.RETINANET.NORM_SHARE_AFFINE``).
            sync_group_size, ghost_batch_size: options of "SyncBN" / "GhostBN".
            prior_prob: initial foreground probability of the classification output.
        """
        super().__init__()
        if norm_stats not in ("per_level", "shared", "naive"):
            raise ValueError(
                f"norm_stats (MODEL.RETINANET.NORM_STATS) = {norm_stats!r} is not allowed; "
                "allowed values: ['per_level', 'shared', 'naive']"
            )
        if norm_stats == "naive" and population_stats:
            raise ValueError(
                f"population_stats (MODEL.RETINANET.POPULATION_STATS) = {population_stats!r} is "
                "not allowed with norm_stats = 'naive'; allowed values: ['']"
            )
        self._num_features = len(input_shape)
        level_stats = norm in LEVEL_STATS_NORMS and norm_stats != "naive"
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

        in_dims = [input_shape[0].channels] + list(conv_dims)
        self.cls_subnet = self._subnet(in_dims, make_norm if norm else None)
        self.bbox_subnet = self._subnet(in_dims, make_norm if norm else None)
        self.cls_score = nn.Conv2d(conv_dims[-1], num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(conv_dims[-1], num_anchors * 4, 3, padding=1)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0, std=0.01)
                nn.init.constant_(module.bias, 0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _subnet(in_dims: Sequence[int], make_norm) -> nn.Sequential:
        layers = []
        for c_in, c_out in zip(in_dims[:-1], in_dims[1:]):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            if make_norm is not None:
                layers.append(make_norm(c_out))
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        num_anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        if len(set(num_anchors)) != 1:
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR gives {num_anchors} anchors per location on the FPN "
                "levels; a head shared across levels needs the same number on every level"
            )
        retina = cfg.MODEL.RETINANET
        return {
            "input_shape": input_shape,
            "num_classes": retina.NUM_CLASSES,
            "num_anchors": num_anchors[0],
            "conv_dims": [input_shape[0].channels] * retina.NUM_CONVS,
            "norm": retina.NORM,
            "norm_stats": retina.NORM_STATS,
            "population_stats": retina.POPULATION_STATS,
            "share_affine": retina.NORM_SHARE_AFFINE,
            "prior_prob": retina.PRIOR_PROB,
            **norm_options_from_config(cfg),
        }

    @staticmethod
    def _run(subnet: nn.Sequential, features: List[torch.Tensor]) -> List[torch.Tensor]:
        for layer in subnet:
            if isinstance(layer, LevelBatchNorm):
                features = layer(features)
            else:
                features = [layer(x) for x in features]
        return features

    def forward(self, features: List[torch.Tensor]):
        """
        Args:
            features: L tensors (N, C, H_i, W_i), FPN levels from high to low resolution.
        Returns:
            logits: L tensors (N, A*K, H_i, W_i); bbox_reg: L tensors (N, A*4, H_i, W_i).
        """
        if len(features) != self._num_features:
            raise ValueError(f"expected {self._num_features} FPN levels, got {len(features)}")
        logits = [self.cls_score(x) for x in self._run(self.cls_subnet, features)]
        bbox_reg = [self.bbox_pred(x) for x in self._run(self.bbox_subnet, features)]
        return logits, bbox_reg


@META_ARCH_REGISTRY.register()
class BNRetinaNet(RetinaNet):
    """
    detectron2's RetinaNet with :class:`BNRetinaNetHead`. Select it with
    ``MODEL.META_ARCHITECTURE: "BNRetinaNet"``; everything else is detectron2's RetinaNet.
    """

    @classmethod
    def from_config(cls, cfg):
        # detectron2's from_config builds the backbone, anchors, matcher, ...; its head is
        # built norm-free (it cannot resolve our names) and replaced by ours.
        d2_cfg = cfg.clone()
        d2_cfg.defrost()
        d2_cfg.MODEL.RETINANET.NORM = ""
        ret = super().from_config(d2_cfg)
        shapes = ret["backbone"].output_shape()
        ret["head"] = BNRetinaNetHead(cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        return ret
