"""A few-image subset of toy_coco_val, for tests whose evaluations only need to run."""
import json

TINY_VAL = "toy_coco_val_tiny"
TINY_VAL_IMAGES = 4  # 2 per worker: one test batch with TEST.BN_STATS mini_batch


def write_tiny_val(path: str) -> str:
    """Writes a COCO json of the first images of toy_coco_val to ``path``; returns their folder."""
    from detectron2.data import MetadataCatalog

    from d2_batchnorm.data import prepare_datasets

    prepare_datasets(["toy_coco_val"])
    meta = MetadataCatalog.get("toy_coco_val")
    with open(meta.json_file) as f:
        coco = json.load(f)
    coco["images"] = coco["images"][:TINY_VAL_IMAGES]
    ids = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    with open(path, "w") as f:
        json.dump(coco, f)
    return meta.image_root


def register_tiny_val(json_file: str, image_root: str) -> None:
    """Registers :data:`TINY_VAL` in this process (each worker process must)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if TINY_VAL not in DatasetCatalog.list():
        register_coco_instances(TINY_VAL, {}, json_file, image_root)
