"""
Registers the toy datasets with detectron2's DatasetCatalog / MetadataCatalog, like
detectron2's builtin COCO datasets.

Names: ``toy_coco_{train,val}`` (default), ``toy_coco_shifted_{train,val}`` (another
domain), ``toy_coco_oneclass_{train,val}`` (one class per image),
``toy_coco_relative_{train,val}`` (an object's class is its brightness relative to the
other objects of its image: within-batch leakage pays off).
They live under ``$DETECTRON2_DATASETS`` (default ``./datasets``) and are generated on
first use. Real COCO uses detectron2's own builtin names (``coco_2017_train``, ...) and
the same ``DETECTRON2_DATASETS`` root.
"""
import os
from typing import Dict

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .toy import ToyDatasetSpec, ensure_toy_coco, toy_categories

__all__ = ["TOY_DATASETS", "prepare_datasets", "register_toy_datasets"]

# folder name -> spec
TOY_DATASETS: Dict[str, ToyDatasetSpec] = {
    "toy_coco": ToyDatasetSpec(),
    "toy_coco_shifted": ToyDatasetSpec(seed=1, style="shifted"),
    "toy_coco_oneclass": ToyDatasetSpec(seed=2, single_class_per_image=True),
    "toy_coco_relative": ToyDatasetSpec(seed=3, class_cue="relative_brightness"),
}


def _split_names():
    for folder in TOY_DATASETS:
        for split in ("train", "val"):
            yield f"{folder}_{split}", folder, split


def _load(root: str, folder: str, split: str, name: str):
    ensure_toy_coco(root, TOY_DATASETS[folder])
    return load_coco_json(
        os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split), name
    )


def register_toy_datasets() -> None:
    """
    Registers every toy split (idempotent). The folder is fixed here, from
    ``$DETECTRON2_DATASETS`` at registration time, for the loader and the metadata alike.
    """
    for name, folder, split in _split_names():
        if name in DatasetCatalog.list():
            continue
        root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), folder)
        DatasetCatalog.register(name, lambda r=root, f=folder, s=split, n=name: _load(r, f, s, n))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(root, "annotations", f"instances_{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
            thing_classes=list(toy_categories(TOY_DATASETS[folder])),
        )


def prepare_datasets(names) -> None:
    """
    Makes sure every dataset in ``names`` can be loaded, before any worker starts:
    generates toy datasets that are missing, and checks that every other name is
    registered and that its annotation file and image folder exist.

    Raises:
        ValueError: naming the dataset and what is missing, with the registered names.
    """
    toy = {name: folder for name, folder, _ in _split_names()}
    for name in names:
        if name in toy:
            root = os.path.dirname(MetadataCatalog.get(name).image_root)  # where it was registered
            ensure_toy_coco(root, TOY_DATASETS[toy[name]])
            continue
        if name not in DatasetCatalog.list():
            raise ValueError(
                f"dataset {name!r} is not registered; registered datasets: "
                f"{sorted(DatasetCatalog.list())}"
            )
        meta = MetadataCatalog.get(name)
        for attr in ("json_file", "image_root"):
            path = getattr(meta, attr, None)
            if path is not None and not os.path.exists(path):
                raise ValueError(
                    f"dataset {name!r}: {attr} {path!r} does not exist. For COCO, set "
                    "DETECTRON2_DATASETS to the folder holding coco/ (see docs/getting-started.md)"
                )
