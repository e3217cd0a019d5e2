# detectron2's Mask R-CNN R50-FPN (configs/common/models/mask_rcnn_fpn.py) with d2_batchnorm's
# box and mask heads: the same modules for the same arguments (no norm by default), plus
# d2_batchnorm's norm names in conv_norm and leakage_mitigation = "none" | "syncbn" | "shuffle".
from detectron2.model_zoo import get_config

from d2_batchnorm.modeling import BNConvFCHead, BNMaskRCNNConvUpsampleHead

model = get_config("common/models/mask_rcnn_fpn.py").model
model.roi_heads.box_head._target_ = BNConvFCHead
model.roi_heads.mask_head._target_ = BNMaskRCNNConvUpsampleHead
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = ""
