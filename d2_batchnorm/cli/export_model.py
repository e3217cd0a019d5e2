"""
Exports a checkpoint trained with d2_batchnorm to a TorchScript file that serves like a
detectron2 model and needs nothing from this package:

    python tools/export_model.py --config-file configs/Toy/retinanet_R18_FPN_bn_head.yaml \
        --output output/export [--export-method scripting|tracing|export] [--sample-image IMG] \
        MODEL.WEIGHTS output/toy/retinanet_R18_FPN_bn_head/model_final.pth [KEY VALUE ...]
    python tools/export_model.py --config-file configs/Toy/retinanet_R18_FPN_bn_head.py \
        --output output/export train.init_checkpoint=output/.../model_final.pth [key=value ...]

A LazyConfig (``.py``) takes ``key=value`` overrides, its checkpoint is
``train.init_checkpoint``, its sample comes from ``dataloader.test`` and its test-time
resizing from ``dataloader.test.mapper``; it is traced by default (modules instantiated from
a LazyConfig keep omegaconf ``ListConfig`` attributes, which TorchScript scripting cannot
type). Bad input (a config that does not load, a bad
value, a missing checkpoint) ends the run with one ``error:`` line and exit status 2.

The model is built as in training (``d2_batchnorm.engine.build_any_model``), loaded, its
norms converted to standard ones (``d2_batchnorm.convert_for_inference``), then scripted
or traced through ``detectron2.export`` (:mod:`d2_batchnorm.export`) and saved as
``OUTPUT/model.ts``. The saved file is loaded back and run on a sample image (the first
image of ``DATASETS.TEST[0]``, or ``--sample-image`` resized as detectron2's
``DefaultPredictor`` does); the tool prints how its detections compare with the eager
model's and exits with status 1 if their number differs or a value differs by more than
``--atol``.

Calling the exported model (``torch.jit.load(path)``), with ``image`` a (3, H, W) float
tensor in ``INPUT.FORMAT`` resized to the test size:

* scripting: ``model(({"image": image},))`` -> one dict per image: "pred_boxes" (R, 4),
  "scores" (R,), "pred_classes" (R,), and "pred_masks" (R, 1, M, M) for Mask R-CNN;
* tracing: ``model(image)`` -> a flat tuple of tensors; its layout (the adapter's
  ``outputs_schema``) is printed and written to ``OUTPUT/outputs_schema.txt``.
* export (dense detectors: RetinaNet, FCOS): ``torch.export`` of the network (backbone and
  head), saved as ``OUTPUT/model.pt2``: ``torch.export.load(path).module()(batch)`` takes
  the preprocessed batch (1, 3, H', W') (``model.preprocess_image``: normalized, padded;
  the sample's padded size) and returns the feature maps and per-level predictions; the
  detections come from the model's own eager pre- and post-processing around it
  (``d2_batchnorm.export.program_detections``). A whole
  detectron2 model does not go through ``torch.export`` yet: its post-processing branches
  on the number of detections (see ``d2_batchnorm/export.py``).

Detections are those of the resized image, before detectron2's ``detector_postprocess``.
"""
import argparse
import logging
import os
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

import d2_batchnorm  # noqa: F401  (registers datasets and models)
from d2_batchnorm.data import prepare_datasets
from d2_batchnorm.engine import build_any_model, check_weights, load_any_config
from d2_batchnorm.export import (
    EXPORT_METHODS,
    detections,
    export_program,
    export_scripting,
    export_tracing,
    program_detections,
)
from d2_batchnorm.config_kinds import adapt

logger = logging.getLogger("d2_batchnorm.export_model")
#: the export method of each kind of config (why: the module docstring)
DEFAULT_METHOD = {"train": "scripting", "lazy-train": "tracing"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the training config")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.ts")
    parser.add_argument("--export-method", choices=EXPORT_METHODS, default=None,
                        help="default: scripting for a yacs config, tracing for a LazyConfig, whose "
                        "instantiated modules keep omegaconf lists that TorchScript cannot type")
    parser.add_argument("--sample-image", metavar="FILE", help="image to trace and check on "
                        "(default: the first image of DATASETS.TEST[0])")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest difference to the "
                        "eager detections (boxes in pixels, scores, mask probabilities) that counts as the same")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE config options (a LazyConfig: key=value overrides)")
    return parser.parse_args(argv)


def sample_input(cfg, image_path=None) -> dict:
    """One input dict {"image": (3, H, W) float tensor} as the test loader gives it."""
    kind = adapt(cfg)
    if image_path is None:
        prepare_datasets(kind.test_datasets())
        return next(iter(kind.test_loader()))[0]
    image_format, augmentations = kind.test_transform()
    aug_input = T.AugInput(detection_utils.read_image(image_path, format=image_format))
    T.AugmentationList(augmentations)(aug_input)
    return {"image": torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))}


def export(cfg, method: str, output: str, image: torch.Tensor):
    """
    Builds and loads ``cfg``'s model, exports it by ``method`` into ``output/model.ts``
    (``output/model.pt2`` for ``export``).
    Returns (eager detections, detections of the saved model loaded back), as Instances.
    """
    model = build_any_model(cfg)
    DetectionCheckpointer(model).load(adapt(cfg).get("MODEL.WEIGHTS"))
    model.eval()
    with torch.no_grad():
        eager = detections(model, [{"image": image}])[0]
    PathManager.mkdirs(output)
    path = os.path.join(output, "model.ts")
    if method == "export":
        path = os.path.join(output, "model.pt2")
        torch.export.save(export_program(model, image), path)
        with torch.no_grad():
            exported = program_detections(model, torch.export.load(path).module(), image)[0]
    elif method == "scripting":
        torch.jit.save(export_scripting(model), path)
        with torch.no_grad():
            fields = torch.jit.load(path)(({"image": image},))[0]
        exported = Instances(eager.image_size, **fields)
        exported.pred_boxes = Boxes(fields["pred_boxes"])
    else:
        traced, adapter = export_tracing(model, image)
        torch.jit.save(traced, path)
        with open(os.path.join(output, "outputs_schema.txt"), "w") as f:
            f.write(f"{adapter.outputs_schema}\n")
        logger.info("traced outputs: %s", adapter.outputs_schema)
        with torch.no_grad():
            exported = adapter.outputs_schema(torch.jit.load(path)(image))[0]
    logger.info("saved %s", path)
    return eager, exported


def differences(eager: Instances, exported: Instances) -> dict:
    """The largest absolute difference of each field of two Instances with the same R."""
    diffs = {}
    for name, value in eager.get_fields().items():
        a, b = value, exported.get(name)
        a, b = (a.tensor, b.tensor) if isinstance(a, Boxes) else (a, b)
        diffs[name] = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return diffs


def main(argv=None) -> int:
    """Exports as the module docstring says; returns 0 if the detections match, else 1."""
    args = parse_args(argv)
    setup_logger(name="d2_batchnorm")
    try:
        cfg = load_any_config(args.config_file, args.opts)
        check_weights(cfg)
        if args.sample_image and not os.path.isfile(args.sample_image):
            raise ValueError(f"--sample-image {args.sample_image!r} does not exist")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    method = args.export_method or DEFAULT_METHOD[adapt(cfg).kind]
    sample = sample_input(cfg, args.sample_image)
    try:
        eager, exported = export(cfg, method, args.output, sample["image"])
    except ValueError as e:  # a model the method cannot export
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(eager) != len(exported):
        print(f"{method}: {len(exported)} detections, eager {len(eager)}: MISMATCH")
        return 1
    diffs = differences(eager, exported)
    same = all(d <= args.atol for d in diffs.values())
    print(f"{method}: {len(eager)} detections, largest difference to eager per field: "
          f"{diffs} ({'same detections' if same else 'MISMATCH'}, atol {args.atol})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
