# LazyConfig of retinanet_R_50_FPN_1x_bn_head.yaml: RetinaNet R50-FPN 1x (8 GPUs x 2 images,
# ImageNet R-50 with FrozenBN) whose head has per-worker BN with per-level statistics.
#   python tools/lazyconfig_train_net.py --num-gpus 8 --config-file configs/COCO-Detection/retinanet_R_50_FPN_1x_bn_head.py
from d2_batchnorm.model_zoo import get_config

model = get_config("common/models/retinanet.py").model
model.backbone.bottom_up.freeze_at = 2
model.head.norm = "BN"
model.head.norm_stats = "per_level"

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01  # RetinaNet trains with half the R-CNN learning rate
train = get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
train.eval_period = 0
train.output_dir = "output/coco/lazy/retinanet_R_50_FPN_1x_bn_head"
