# detectron2's FCOS R50-FPN 1x (configs/COCO-Detection/fcos_R_50_FPN_1x.py, 8 GPUs x 2 images)
# whose head has per-worker BN with per-level statistics instead of GN.
#   python tools/lazyconfig_train_net.py --num-gpus 8 --config-file configs/COCO-Detection/fcos_R_50_FPN_1x_bn_head.py
from d2_batchnorm.model_zoo import get_config

from .retinanet_R_50_FPN_1x_bn_head import dataloader, lr_multiplier, optimizer, train

model = get_config("common/models/fcos.py").model
model.backbone.bottom_up.freeze_at = 2
model.head.norm = "BN"
model.head.norm_stats = "per_level"
train.output_dir = "output/coco/lazy/fcos_R_50_FPN_1x_bn_head"
