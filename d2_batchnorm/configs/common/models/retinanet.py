# detectron2's RetinaNet (configs/common/models/retinanet.py) as d2_batchnorm's BNRetinaNet,
# whose head's norms take statistics modes: model.head.norm = "BN" | "SyncBN" | ...,
# model.head.norm_stats = "per_level" | "shared" | "naive", model.head.population_stats,
# model.head.share_affine, model.head.sync_group_size (README "LazyConfig").
from detectron2.model_zoo import get_config

from d2_batchnorm.modeling import BNRetinaNet, BNRetinaNetHead

model = get_config("common/models/retinanet.py").model
model._target_ = BNRetinaNet
model.head._target_ = BNRetinaNetHead
