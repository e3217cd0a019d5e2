# FCOS at the toy RetinaNet's size with a per-worker BN head, per-level statistics
# (LazyConfig only: detectron2 builds FCOS from Python configs). 2 CPU processes:
#   python tools/lazyconfig_train_net.py --num-gpus 2 --config-file configs/Toy/fcos_R18_FPN_bn_head.py
from .retinanet_R18_FPN_bn_head import dataloader, lr_multiplier, optimizer, train
from ..common.models.toy_fcos import model

dataloader.train.mapper.use_instance_mask = False
model.head.norm = "BN"
model.head.norm_stats = "per_level"
optimizer.lr = 0.01
train.output_dir = "output/toy/lazy/fcos_R18_FPN_bn_head"
