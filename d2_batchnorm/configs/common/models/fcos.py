# detectron2's FCOS (configs/common/models/fcos.py: GN head) with d2_batchnorm's BNFCOSHead,
# whose norms take the statistics modes of BNRetinaNetHead (model.head.norm = "SyncBN",
# model.head.norm_stats = "shared", ...).
from detectron2.model_zoo import get_config

from d2_batchnorm.modeling import BNFCOSHead

model = get_config("common/models/fcos.py").model
model.head._target_ = BNFCOSHead
