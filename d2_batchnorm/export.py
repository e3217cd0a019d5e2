"""
Export of a model trained with d2_batchnorm to TorchScript, through ``detectron2.export``,
so that it serves like a detectron2 model and needs nothing from this package:

1. :func:`d2_batchnorm.layers.convert_for_inference` turns every norm of ours (and
   detectron2's synchronized ones) into ``nn.BatchNorm2d`` with the same eval-mode
   outputs; the heads run exactly detectron2's inference graph (the RoI shuffle and the
   synchronized statistics exist only in training);
2. :func:`export_scripting` compiles the model with ``scripting_with_instances``;
   :func:`export_tracing` traces it through ``TracingAdapter``; :func:`export_program`
   exports a dense detector's network with ``torch.export``, the maintained path now that
   torch 2.14 deprecates ``torch.jit.script``.

The TorchScript models return the detections of :func:`detections`: those of the resized
input image, before detectron2's final ``detector_postprocess`` (the rescale to the
original image size), as detectron2's own export tool does. Works on CPU without
detectron2's compiled ``_C`` extension (RoIAlign and NMS come from torchvision).

``torch.export`` and detectron2: a whole detectron2 model does not export yet. Its
post-processing builds ``Boxes``/``Instances`` whose constructors branch on the number of
detections (``tensor.numel() == 0`` in ``detectron2/structures/boxes.py``), a value known
only when the model runs; ``torch.export.export`` (torch 2.14, ``strict=False``) stops
there with ``GuardOnDataDependentSymNode: Could not guard on data-dependent expression
Eq(4*Min(1000, u2), 0)``, and the R-CNN heads run on the proposals those steps select.
What does export, with static shapes, is a dense detector's network: backbone and head,
preprocessed batch -> (features, per-level predictions), which :func:`export_program`
exports and :func:`program_detections` wraps in the model's own eager pre- and
post-processing (normalization and padding; anchors, decoding, NMS), giving the eager
model's detections. (Preprocessing stays outside: on torch 2.11 the padding of
``ImageList.from_tensors`` also stops ``torch.export``, at a data-dependent guard in conv.)
"""
from typing import Dict, List, Tuple

import torch
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from .layers import convert_for_inference

__all__ = ["EXPORT_METHODS", "INSTANCES_FIELDS", "detections", "export_scripting", "export_tracing",
           "export_program", "program_detections"]

#: the ways a model can be exported: ``torch.jit.script``, ``torch.jit.trace``, or
#: ``torch.export`` (a dense detector's network, :func:`export_program`)
EXPORT_METHODS = ("scripting", "tracing", "export")

#: every field of ``Instances`` that detectron2's R-CNN and dense detectors use at
#: inference, with its type, as ``scripting_with_instances`` needs them declared
INSTANCES_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": Tensor,
    "pred_boxes": Boxes,
    "scores": Tensor,
    "pred_classes": Tensor,
    "pred_masks": Tensor,
    "pred_keypoints": Tensor,
    "pred_keypoint_heatmaps": Tensor,
}


def detections(model: nn.Module, inputs: List[Dict[str, Tensor]]) -> List[Instances]:
    """
    The eager model's detections that an exported model returns: one ``Instances`` per
    input image, in the coordinates of the (resized) input image, before
    ``detector_postprocess``. ``model``: a ``GeneralizedRCNN`` or a dense detector
    (RetinaNet, ``BNRetinaNet``, ...) in eval mode; ``inputs``: dicts with "image" (3, H, W).
    """
    _check_exportable(model)
    if isinstance(model, GeneralizedRCNN):
        return model.inference(inputs, do_postprocess=False)
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    return model.forward_inference(images, features, model.head(features))


class _ScriptableRCNN(nn.Module):
    """A ``GeneralizedRCNN`` returning its detections as dicts of tensors (scriptable output)."""

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        return [i.get_fields() for i in self.model.inference(inputs, do_postprocess=False)]


class _ScriptableDenseDetector(nn.Module):
    """A dense detector returning its detections as dicts of tensors (scripted, it skips postprocess)."""

    def __init__(self, model: DenseDetector):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        return [i.get_fields() for i in self.model(inputs)]


def export_scripting(model: nn.Module) -> torch.jit.ScriptModule:
    """
    Converts ``model``'s norms in place (:func:`convert_for_inference`), puts it in eval
    mode and compiles it with detectron2's ``scripting_with_instances``.

    Returns:
        a ScriptModule: ``(inputs,)`` -> ``outputs``, ``inputs`` a tuple of dicts with
        "image" (3, H, W) float tensors, ``outputs`` one dict per image with the fields of
        :func:`detections` as tensors: "pred_boxes" (R, 4), "scores" (R,),
        "pred_classes" (R,) and, for Mask R-CNN, "pred_masks" (R, 1, M, M) mask
        probabilities.
    """
    _check_exportable(model)
    model = convert_for_inference(model).eval()
    adapter = _ScriptableRCNN if isinstance(model, GeneralizedRCNN) else _ScriptableDenseDetector
    return scripting_with_instances(adapter(model).eval(), INSTANCES_FIELDS)


def export_tracing(model: nn.Module, image: Tensor) -> Tuple[torch.jit.ScriptModule, TracingAdapter]:
    """
    Converts ``model``'s norms in place (:func:`convert_for_inference`), puts it in eval
    mode and traces :func:`detections` on the (3, H, W) ``image`` through detectron2's
    ``TracingAdapter``.

    Returns:
        the traced module, ``image`` -> a flat tuple of tensors, and the adapter whose
        ``outputs_schema`` turns that tuple back into ``[Instances]``. Shapes are not
        frozen: other image sizes and numbers of detections work.
    """
    model = convert_for_inference(model).eval()
    adapter = TracingAdapter(model, [{"image": image}], detections)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (image,))
    return traced, adapter


class _DenseNetwork(nn.Module):
    """
    A dense detector's network: a preprocessed batch (B, 3, H, W) -> the L feature maps of
    its head's inputs, then, for each of its K kinds of prediction (class logits, box
    deltas, centerness), the L per-level maps; a flat tuple of L (1 + K) tensors.
    """

    def __init__(self, model: DenseDetector):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        features = self.model.backbone(images)
        features = [features[f] for f in self.model.head_in_features]
        return tuple(features) + tuple(t for kind in self.model.head(features) for t in kind)


def export_program(model: nn.Module, image: Tensor) -> torch.export.ExportedProgram:
    """
    Converts ``model``'s norms in place (:func:`convert_for_inference`), puts it in eval
    mode and exports its network with ``torch.export.export`` on the batch the model makes
    of the (3, H, W) ``image`` (module docstring: what exports and why a whole detectron2
    model does not).

    Returns:
        an ``ExportedProgram`` (save it with ``torch.export.save``): the preprocessed batch
        (1, 3, H', W') (``model.preprocess_image``: normalized, padded to the backbone's size
        divisibility) -> a flat tuple of L feature maps (1, C, H_i, W_i) and, per kind of
        prediction, L maps (1, A * k, H_i, W_i); :func:`program_detections` turns it into
        detections. The padded size is fixed at export.

    Raises:
        ValueError: for a model that is not a dense detector (RetinaNet, FCOS, ...).
    """
    if not isinstance(model, DenseDetector):
        raise ValueError(
            f"model = {type(model).__name__} cannot be exported with torch.export; allowed: a DenseDetector "
            "(RetinaNet, BNRetinaNet, FCOS). An R-CNN's heads run on proposals whose number is known only "
            "at run time (detectron2's Boxes/Instances branch on it): use scripting or tracing"
        )
    model = convert_for_inference(model).eval()
    with torch.no_grad():
        batch = model.preprocess_image([{"image": image}]).tensor
        return torch.export.export(_DenseNetwork(model), (batch,), strict=False)


def program_detections(model: DenseDetector, network: nn.Module, image: Tensor) -> List[Instances]:
    """
    The detections of ``image`` (3, H, W) from an exported network (``program.module()`` of
    :func:`export_program`) between ``model``'s eager preprocessing and post-processing:
    the same ``Instances`` as :func:`detections` of ``model``.
    """
    images = model.preprocess_image([{"image": image}])
    outputs = network(images.tensor)
    levels = len(model.head_in_features)
    features, flat = list(outputs[:levels]), outputs[levels:]
    predictions = [list(flat[k : k + levels]) for k in range(0, len(flat), levels)]
    return model.forward_inference(images, features, predictions)


def _check_exportable(model: nn.Module) -> None:
    if not isinstance(model, (GeneralizedRCNN, DenseDetector)):
        raise ValueError(
            f"model = {type(model).__name__} is not allowed; allowed: a GeneralizedRCNN or a "
            "DenseDetector (RetinaNet, BNRetinaNet, ...), the meta-architectures with a known "
            "inference output"
        )
