"""Models: detectron2's meta-architectures with d2_batchnorm's norms and heads."""
from .build import build_model

__all__ = ["build_model"]
