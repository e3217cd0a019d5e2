"""
FCOS's head with the level statistics of :class:`~d2_batchnorm.modeling.BNRetinaNetHead`.

detectron2's ``FCOS`` (``detectron2.modeling.meta_arch.fcos``) is built by LazyConfig only;
``L(FCOS)(head=L(BNFCOSHead)(norm="SyncBN", norm_stats="shared", ...), ...)`` gives it this
head (``configs/common/models/fcos.py``).
"""
from typing import List, Tuple

import torch
from detectron2.modeling.meta_arch.fcos import FCOSHead

from .retinanet import BNRetinaNetHead

__all__ = ["BNFCOSHead"]


class BNFCOSHead(FCOSHead, BNRetinaNetHead):
    """
    detectron2's ``FCOSHead`` — the RetinaNet head with one "anchor" per location and a
    centerness branch on the box subnet's features (its layers and initialization) — whose
    norms and statistics modes are :class:`BNRetinaNetHead`'s. Its arguments are
    :class:`BNRetinaNetHead`'s without ``num_anchors``.
    """

    def forward(
        self, features: List[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features: L tensors (N, C, H_i, W_i), FPN levels from high to low resolution.
        Returns:
            logits (N, K, H_i, W_i), bbox_reg (N, 4, H_i, W_i), ctrness (N, 1, H_i, W_i) per level.
        """
        if len(features) != self._num_features:
            raise ValueError(f"expected {self._num_features} FPN levels, got {len(features)}")
        box_features = self.bbox_subnet(features)
        logits = [self.cls_score(x) for x in self.cls_subnet(features)]
        return logits, [self.bbox_pred(x) for x in box_features], [self.ctrness(x) for x in box_features]
