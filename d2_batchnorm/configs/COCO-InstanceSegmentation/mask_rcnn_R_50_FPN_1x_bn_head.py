# LazyConfig of mask_rcnn_R_50_FPN_1x_bn_head.yaml: Mask R-CNN R50-FPN 1x (8 GPUs x 2 images,
# ImageNet R-50 with FrozenBN) with per-worker BN in the 4conv1fc box head and the mask head,
# PreciseBN with the EMA evaluation logged too.
#   python tools/lazyconfig_train_net.py --num-gpus 8 --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_bn_head.py
from d2_batchnorm.model_zoo import get_config

model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.freeze_at = 2
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "BN"
model.roi_heads.box_head.conv_dims = [256] * 4  # 4conv1fc
model.roi_heads.box_head.fc_dims = [1024]

dataloader = get_config("common/data/coco.py").dataloader
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
train.eval_period = 0
train.precise_bn.enabled = True
train.output_dir = "output/coco/lazy/mask_rcnn_R_50_FPN_1x_bn_head"
