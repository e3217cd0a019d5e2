"""``build_model(cfg)``: detectron2's model builder, with d2_batchnorm's norms resolved."""
from detectron2.modeling import build_model as d2_build_model

__all__ = ["build_model"]


def build_model(cfg):
    """Builds ``cfg.MODEL.META_ARCHITECTURE`` on ``cfg.MODEL.DEVICE`` (no weights loaded)."""
    return d2_build_model(cfg)
