"""Models: detectron2's meta-architectures with d2_batchnorm's norms and heads."""
from . import roi_heads  # noqa: F401  (registers BNConvFCHead, BNMaskRCNNConvUpsampleHead)
from . import retinanet  # noqa: F401  (registers BNRetinaNet)
from .build import build_model
from .fcos import BNFCOSHead
from .retinanet import BNRetinaNet, BNRetinaNetHead
from .roi_heads import BNConvFCHead, BNMaskRCNNConvUpsampleHead

__all__ = ["build_model", "BNRetinaNet", "BNRetinaNetHead", "BNFCOSHead", "BNConvFCHead",
           "BNMaskRCNNConvUpsampleHead"]
