"""Models: detectron2's meta-architectures with d2_batchnorm's norms and heads."""
from .build import build_model
from .fcos import BNFCOSHead
from .retinanet import BNRetinaNet, BNRetinaNetHead  # registers BNRetinaNet
from .roi_heads import BNConvFCHead, BNMaskRCNNConvUpsampleHead  # registers both heads

__all__ = ["build_model", "BNRetinaNet", "BNRetinaNetHead", "BNFCOSHead", "BNConvFCHead",
           "BNMaskRCNNConvUpsampleHead"]
