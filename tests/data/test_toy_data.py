"""The generated toy COCO-format dataset: valid for pycocotools, deterministic, registered."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools import mask as mask_utils

from d2_batchnorm.data import (
    RELATIVE_BRIGHTNESS_CATEGORIES,
    TOY_CATEGORIES,
    ToyDatasetSpec,
    ensure_toy_coco,
    generate_toy_coco,
)

SMALL = ToyDatasetSpec(num_train=12, num_val=4, image_size=64, seed=3)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_same_spec_gives_identical_files(tmp_path):
    generate_toy_coco(str(tmp_path / "a"), SMALL)
    generate_toy_coco(str(tmp_path / "b"), SMALL)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    generate_toy_coco(str(tmp_path / "c"), ToyDatasetSpec(num_train=12, num_val=4, image_size=64, seed=4))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_annotations_are_valid_coco_and_match_the_pixels(tmp_path):
    paths = generate_toy_coco(str(tmp_path), SMALL)
    coco = COCO(paths["train"])
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(TOY_CATEGORIES)
    assert len(coco.getImgIds()) == SMALL.num_train
    assert len(coco.getAnnIds()) >= SMALL.num_train  # at least one object per image
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"]
        rle = coco.annToRLE(ann)
        # the polygon mask covers about the stated area, and its box matches the bbox
        assert abs(mask_utils.area(rle) - ann["area"]) <= 0.15 * ann["area"] + 8
        np.testing.assert_allclose(mask_utils.toBbox(rle), ann["bbox"], atol=1.5)
        # the object is drawn: pixels inside the mask differ from the background around it
        image = np.asarray(Image.open(os.path.join(tmp_path, "train", info["file_name"])), dtype=np.float32)
        m = coco.annToMask(ann).astype(bool)
        assert np.abs(image[m].mean(0) - image[~m].mean(0)).max() > 5 or image[m].std() < 1


def test_single_class_per_image_variant(tmp_path):
    spec = ToyDatasetSpec(num_train=10, num_val=2, image_size=64, single_class_per_image=True)
    coco = COCO(generate_toy_coco(str(tmp_path), spec)["train"])
    for image_id in coco.getImgIds():
        cats = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))}
        assert len(cats) == 1


def test_relative_brightness_variant_is_told_by_the_image_not_by_one_object(tmp_path):
    """
    In the relative-brightness variant an object's own gray level names its class less
    often than its level minus the mean level of its image's objects: the difference a
    BN head computes when it normalizes one image's RoIs by their own mean.
    """
    spec = ToyDatasetSpec(num_train=60, num_val=1, seed=5, class_cue="relative_brightness")
    coco = COCO(generate_toy_coco(str(tmp_path), spec)["train"])
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(RELATIVE_BRIGHTNESS_CATEGORIES)
    levels, relative, labels = [], [], []
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 3 <= len(anns) <= 6 and {a["category_id"] for a in anns} == {1, 2, 3}
        image = np.asarray(Image.open(os.path.join(tmp_path, "train", coco.loadImgs(image_id)[0]["file_name"])))
        gray = np.array([image[coco.annToMask(a).astype(bool)].mean() for a in anns])
        levels += list(gray)
        relative += list(gray - gray.mean())
        labels += [a["category_id"] - 1 for a in anns]

    def best_two_thresholds(values):
        values, grid = np.asarray(values), np.linspace(min(values), max(values), 60)
        return max(
            np.mean((values > a).astype(int) + (values > b) == labels) for a in grid for b in grid if a <= b
        )

    assert best_two_thresholds(levels) < 0.7
    assert best_two_thresholds(relative) > 0.9


def test_ensure_reuses_a_complete_dataset_and_regenerates_another_spec(tmp_path):
    root = str(tmp_path / "toy")
    ensure_toy_coco(root, SMALL)
    marker = os.path.join(root, "train", "000001.png")
    mtime = os.path.getmtime(marker)
    ensure_toy_coco(root, SMALL)
    assert os.path.getmtime(marker) == mtime
    other = ToyDatasetSpec(num_train=5, num_val=2, image_size=64)
    ensure_toy_coco(root, other)
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        assert len(json.load(f)["images"]) == 5


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="style"):
        ToyDatasetSpec(style="sepia")
    with pytest.raises(ValueError, match="num_train"):
        ToyDatasetSpec(num_train=0)
    with pytest.raises(ValueError, match="class_cue"):
        ToyDatasetSpec(class_cue="texture")
    with pytest.raises(ValueError, match="single_class_per_image"):
        ToyDatasetSpec(class_cue="relative_brightness", single_class_per_image=True)
    with pytest.raises(ValueError, match="style"):
        ToyDatasetSpec(class_cue="relative_brightness", style="shifted")


def test_registered_names_load_through_detectron2():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = DatasetCatalog.get("toy_coco_val")
    assert len(dicts) == 80 and dicts[0]["annotations"][0]["segmentation"]
    assert MetadataCatalog.get("toy_coco_val").thing_classes == list(TOY_CATEGORIES)
    assert os.path.isfile(MetadataCatalog.get("toy_coco_val").json_file)
    assert MetadataCatalog.get("toy_coco_relative_val").thing_classes == list(RELATIVE_BRIGHTNESS_CATEGORIES)
