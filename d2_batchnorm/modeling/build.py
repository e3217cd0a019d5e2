"""
``build_model(cfg)``: detectron2's model builder, with every norm name of d2_batchnorm
working in every module detectron2 builds from a norm string.

How a norm name resolves:

* Modules registered by d2_batchnorm (``BNRetinaNet``'s head, the R-CNN heads of
  :mod:`.roi_heads`) call :func:`d2_batchnorm.layers.get_norm` themselves.
* Modules built by detectron2's own builders (ResNet, FPN, detectron2's RetinaNet head,
  ``FastRCNNConvFCHead``, ``MaskRCNNConvUpsampleHead``, ``Res5ROIHeads``) resolve names
  with detectron2's ``get_norm``, a fixed table we do not patch. Two conversions after
  building give them our layers:

  1. every ``torch.nn.SyncBatchNorm`` in the model (detectron2's "SyncBN" and "nnSyncBN",
     which refuse CPU input) becomes :class:`d2_batchnorm.layers.SyncBatchNorm` with
     ``BN.SYNC_GROUP_SIZE``, keeping its parameters and buffers;
  2. a name detectron2 does not know (``D2BN_NORM_NAMES``, e.g. "GhostBN") is replaced by
     "BN" in a clone of the config given to detectron2, and each ``nn.BatchNorm2d`` of the
     modules that key configures (below) is then replaced by ``get_norm(name, C)``.

  =========================  ==============================================================
  ``MODEL.RESNETS.NORM``     ``backbone.bottom_up`` (the whole backbone if it has no
                             ``bottom_up``) and ``roi_heads.res5``
  ``MODEL.FPN.NORM``         the backbone's modules other than ``bottom_up``
  ``MODEL.RETINANET.NORM``   ``head`` of detectron2's "RetinaNet"
  ``MODEL.ROI_BOX_HEAD.NORM`` ``roi_heads.box_head`` when NAME is "FastRCNNConvFCHead"
  ``MODEL.ROI_MASK_HEAD.NORM`` ``roi_heads.mask_head`` when NAME is "MaskRCNNConvUpsampleHead"
  =========================  ==============================================================

``BN.MOMENTUM`` > 0 then sets the EMA momentum of every BatchNorm of the model
(:func:`d2_batchnorm.layers.set_ema_momentum`).
"""
from typing import Dict, List

from detectron2.modeling import build_model as d2_build_model
from torch import nn

from ..checks import check_batchnorm_keys
from ..layers import (
    D2BN_NORM_NAMES,
    convert_batchnorm,
    convert_sync_batchnorm,
    norm_options_from_config,
    set_ema_momentum,
)

__all__ = ["build_model", "modules_of_norm_key", "norm_keys_of_modules"]


def build_model(cfg) -> nn.Module:
    """
    Builds ``cfg.MODEL.META_ARCHITECTURE`` on ``cfg.MODEL.DEVICE`` (no weights loaded),
    with d2_batchnorm's norms resolved as described in this module's docstring.
    ``ValueError`` before building if ``cfg`` lacks d2_batchnorm's keys.
    """
    check_batchnorm_keys(cfg)
    d2_cfg, converted_keys = _config_for_detectron2(cfg)
    model = d2_build_model(d2_cfg)
    options = norm_options_from_config(cfg)
    for key in converted_keys:
        name = cfg.MODEL[key].NORM
        for module in modules_of_norm_key(model, key):
            convert_batchnorm(module, name, **options)
    model = convert_sync_batchnorm(model, cfg.BN.SYNC_GROUP_SIZE)
    if cfg.BN.MOMENTUM > 0:
        set_ema_momentum(model, cfg.BN.MOMENTUM)
    return model


def _config_for_detectron2(cfg):
    """A clone of cfg where our names in keys read by detectron2's builders are "BN"."""
    keys = ["RESNETS", "FPN"]
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        keys.append("RETINANET")
    if cfg.MODEL.ROI_BOX_HEAD.NAME == "FastRCNNConvFCHead":
        keys.append("ROI_BOX_HEAD")
    if cfg.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead":
        keys.append("ROI_MASK_HEAD")
    converted = [k for k in keys if cfg.MODEL[k].NORM in D2BN_NORM_NAMES]
    if not converted:
        return cfg, []
    d2_cfg = cfg.clone()
    d2_cfg.defrost()
    for key in converted:
        d2_cfg.MODEL[key].NORM = "BN"
    d2_cfg.freeze()
    return d2_cfg, converted


def modules_of_norm_key(model: nn.Module, key: str) -> List[nn.Module]:
    """
    The modules of ``model`` whose norms ``MODEL.<key>.NORM`` configures (``key`` one of
    ``config.NORM_KEYS``): those of the table of this module's docstring without its
    conditions (any model's ``head``, also FCOS's; the R-CNN heads whatever their NAME).
    Modules the model lacks are left out.
    """
    return _norm_key_roots(model)[key]


def norm_keys_of_modules(model: nn.Module) -> Dict[int, str]:
    """
    ``{id(module): key}`` for every module under the roots of :func:`modules_of_norm_key`:
    which ``MODEL.<key>.NORM`` configures it (modules outside every root are left out).
    """
    return {id(m): key for key, roots in _norm_key_roots(model).items() for root in roots for m in root.modules()}


def _norm_key_roots(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """The roots of every key, in ``config.NORM_KEYS`` order (:func:`modules_of_norm_key`)."""
    backbone = getattr(model, "backbone", None)
    roi_heads = getattr(model, "roi_heads", None)
    found: Dict[str, List[nn.Module]] = {
        "RESNETS": [getattr(backbone, "bottom_up", backbone), getattr(roi_heads, "res5", None)],
        "FPN": [
            child for name, child in (backbone.named_children() if backbone is not None else [])
            if hasattr(backbone, "bottom_up") and name != "bottom_up"
        ],
        "RETINANET": [getattr(model, "head", None)],
        "ROI_BOX_HEAD": [getattr(roi_heads, "box_head", None)],
        "ROI_MASK_HEAD": [getattr(roi_heads, "mask_head", None)],
    }
    return {key: [m for m in roots if m is not None] for key, roots in found.items()}
