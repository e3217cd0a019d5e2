"""Models: detectron2's meta-architectures with d2_batchnorm's norms and heads."""
from . import roi_heads  # noqa: F401  (registers BNConvFCHead, BNMaskRCNNConvUpsampleHead)
from . import retinanet  # noqa: F401  (registers BNRetinaNet)
from .build import build_model

__all__ = ["build_model"]
