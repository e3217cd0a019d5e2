# The generated toy dataset (d2_batchnorm.data: toy_coco_train / toy_coco_val, 128x128 images)
# with detectron2's COCO loaders (configs/common/data/coco.py): the data of configs/Toy/*.yaml.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "toy_coco_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), sample_style="choice", max_size=128),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 16
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "toy_coco_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)]
dataloader.test.num_workers = 0
