"""
A deterministic, generated COCO-format detection dataset ("toy COCO") that trains from
scratch in minutes on CPU.

Each image (``image_size`` x ``image_size`` RGB, PNG) shows 1–4 non-overlapping objects of
three categories — square, disk, triangle — with random colors and sizes on a noisy
background. Annotations are standard COCO instances JSON: ``bbox`` [x, y, w, h],
polygon ``segmentation``, ``area``, ``iscrowd``; so detectron2's ``load_coco_json`` and
pycocotools read them like real COCO.

Variants (selected by :class:`ToyDatasetSpec`):
  * ``style="shifted"``: darker, lower-contrast background and desaturated colors — a
    different test domain for recomputing BN statistics;
  * ``single_class_per_image=True``: every image holds objects of one class only, so a
    head that sees per-image batch statistics can exploit them (information leakage);
  * ``class_cue="relative_brightness"``: the class of an object is how bright it is
    *relative to the other objects of its image* — ``dark``, ``medium``, ``light`` are
    gray levels ``L - delta``, ``L``, ``L + delta`` around a level ``L`` drawn per image
    from a wide range, on a saturated random-hue background; every image holds 3–6
    objects, at least one of each class. An object's own gray level names its class for
    about half of the objects (the best two thresholds on it: 51%, simulated); its level
    minus the mean level of its image's objects, for 98%. That difference is what a
    BatchNorm layer computes when it normalizes the RoIs of one image by their own
    mean, and population statistics cannot supply it: the variant on which within-batch
    leakage pays off (projects/LeakageStudy).

The same spec and seed always give byte-identical JSON and images.
"""
import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
from detectron2.structures.masks import polygon_area
from PIL import Image, ImageDraw

__all__ = [
    "ToyDatasetSpec",
    "TOY_CATEGORIES",
    "RELATIVE_BRIGHTNESS_CATEGORIES",
    "toy_categories",
    "generate_toy_coco",
    "ensure_toy_coco",
]

TOY_CATEGORIES = ("square", "disk", "triangle")
RELATIVE_BRIGHTNESS_CATEGORIES = ("dark", "medium", "light")
_CLASS_CUES = ("shape", "relative_brightness")
# class_cue="relative_brightness": range of the per-image level L, and the step delta
_LEVEL_RANGE = (60.0, 195.0)
_LEVEL_STEP = 35.0
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ToyDatasetSpec:
    """What a generated toy dataset holds."""

    num_train: int = 320
    num_val: int = 80
    image_size: int = 128
    seed: int = 0
    style: str = "default"  # "default" | "shifted"
    single_class_per_image: bool = False
    class_cue: str = "shape"  # "shape" | "relative_brightness"

    def __post_init__(self):
        if self.style not in ("default", "shifted"):
            raise ValueError(f"style = {self.style!r} is not allowed; use 'default' or 'shifted'")
        if self.class_cue not in _CLASS_CUES:
            raise ValueError(f"class_cue = {self.class_cue!r} is not allowed; use one of {_CLASS_CUES}")
        if self.class_cue == "relative_brightness" and (self.single_class_per_image or self.style != "default"):
            raise ValueError(
                "class_cue = 'relative_brightness' needs single_class_per_image = False and "
                "style = 'default': every image holds all three brightness classes on its own background"
            )
        for key in ("num_train", "num_val"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} = {getattr(self, key)} is not allowed; it must be >= 1")
        if self.image_size < 32:
            raise ValueError(f"image_size = {self.image_size} is not allowed; it must be >= 32")


def toy_categories(spec: ToyDatasetSpec) -> Tuple[str, ...]:
    """The category names of a toy dataset, in category-id order (id = index + 1)."""
    return RELATIVE_BRIGHTNESS_CATEGORIES if spec.class_cue == "relative_brightness" else TOY_CATEGORIES


def _polygon(category: str, x0: float, y0: float, size: float) -> List[Tuple[float, float]]:
    if category == "square":
        return [(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size)]
    if category == "triangle":
        return [(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)]
    cx, cy, r = x0 + size / 2, y0 + size / 2, size / 2
    return [
        (cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24))
        for k in range(24)
    ]


def _noisy_canvas(rng: np.random.Generator, s: int, color, noise_std: float):
    """An s x s RGB image of ``color`` (a gray level or an RGB triple) plus Gaussian noise, and its drawer."""
    pixels = np.clip(color + rng.normal(0, noise_std, size=(s, s, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image, ImageDraw.Draw(image)


def _free_spot(rng: np.random.Generator, boxes, s: int, size_range: Tuple[float, float]):
    """(x0, y0, size) of a square spot that keeps 2 px from ``boxes``, or None after 20 tries."""
    for _attempt in range(20):
        size = float(rng.uniform(*size_range) * s)
        x0, y0 = (float(v) for v in rng.uniform(2, s - size - 2, size=2))
        box = (x0 - 2, y0 - 2, x0 + size + 2, y0 + size + 2)
        if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
            boxes.append(box)
            return x0, y0, size
    return None


def _make_relative_brightness_image(rng: np.random.Generator, spec: ToyDatasetSpec):
    s = spec.image_size
    background = np.full(3, rng.uniform(20, 80))
    background[int(rng.integers(3))] = rng.uniform(150, 230)  # saturated: gray objects stand out
    image, draw = _noisy_canvas(rng, s, background, 18)

    level = rng.uniform(*_LEVEL_RANGE)
    num_objects = int(rng.integers(3, 7))
    categories = np.concatenate([rng.permutation(3), rng.integers(3, size=num_objects - 3)])
    boxes, objects = [], []
    for category in categories:
        spot = _free_spot(rng, boxes, s, (0.14, 0.26))
        if spot is None:
            continue
        gray = level + (int(category) - 1) * _LEVEL_STEP + rng.normal(0, 4)
        color = np.clip(np.round(gray + rng.uniform(-5, 5, size=3)), 0, 255)
        shape = TOY_CATEGORIES[int(rng.integers(len(TOY_CATEGORIES)))]
        points = _polygon(shape, *spot)
        draw.polygon(points, fill=tuple(int(c) for c in color))
        objects.append((int(category), points))
    return image, objects


def _make_image(rng: np.random.Generator, spec: ToyDatasetSpec):
    if spec.class_cue == "relative_brightness":
        return _make_relative_brightness_image(rng, spec)
    s = spec.image_size
    shifted = spec.style == "shifted"
    base = rng.uniform(20, 60) if shifted else rng.uniform(90, 170)
    image, draw = _noisy_canvas(rng, s, base, 6 if shifted else 18)

    image_class = int(rng.integers(len(TOY_CATEGORIES)))
    boxes, objects = [], []
    for _ in range(int(rng.integers(1, 5))):
        spot = _free_spot(rng, boxes, s, (0.18, 0.4))
        if spot is None:
            continue
        category = image_class if spec.single_class_per_image else int(rng.integers(3))
        color = rng.integers(0, 256, size=3)
        if shifted:
            color = (color * 0.4 + 60).astype(int)
        points = _polygon(TOY_CATEGORIES[category], *spot)
        draw.polygon(points, fill=tuple(int(c) for c in color))
        objects.append((category, points))
    return image, objects


def generate_toy_coco(root: str, spec: ToyDatasetSpec = ToyDatasetSpec()) -> Dict[str, str]:
    """
    Writes the dataset under ``root``: ``train/``, ``val/`` (PNG images) and
    ``annotations/instances_{train,val}.json``. Overwrites what is there.

    Returns:
        {"train": json path, "val": json path}
    """
    rng = np.random.default_rng(spec.seed)
    categories = [
        {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(toy_categories(spec))
    ]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    paths = {}
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, objects = _make_image(rng, spec)
            file_name = f"{image_id:06d}.png"
            image.save(os.path.join(root, split, file_name))
            images.append(
                {"id": image_id, "file_name": file_name, "width": spec.image_size, "height": spec.image_size}
            )
            for category, points in objects:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category + 1,
                        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                        "area": float(polygon_area(*np.array(points).T)),
                        "segmentation": [[round(c, 2) for p in points for c in p]],
                        "iscrowd": 0,
                    }
                )
        paths[split] = os.path.join(root, "annotations", f"instances_{split}.json")
        with open(paths[split], "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return paths


def ensure_toy_coco(root: str, spec: ToyDatasetSpec = ToyDatasetSpec()) -> str:
    """
    Generates the dataset at ``root`` unless a complete one of the same spec is there.
    Safe when several processes call it at once: each generates into a temporary folder
    and the first to finish moves it into place. Returns ``root``.
    """
    stamp = dict(asdict(spec), format_version=_FORMAT_VERSION)
    stamp_path = os.path.join(root, "spec.json")
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".toy_coco_", dir=parent)
    try:
        generate_toy_coco(tmp, spec)
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(stamp, f)
        if os.path.isdir(root):  # stale or from another spec
            if os.path.isfile(stamp_path):
                with open(stamp_path) as f:
                    if json.load(f) == stamp:  # another process won the race
                        return root
            shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):  # OSError: another process moved its copy in first
            os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
