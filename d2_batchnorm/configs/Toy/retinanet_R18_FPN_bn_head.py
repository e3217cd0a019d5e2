# LazyConfig of retinanet_R18_FPN_bn_head.yaml: the toy RetinaNet with a per-worker BN head,
# per-level statistics. 2 CPU processes:
#   python tools/lazyconfig_train_net.py --num-gpus 2 --config-file configs/Toy/retinanet_R18_FPN_bn_head.py
from ..common.data.toy import dataloader
from ..common.models.toy_retinanet import model
from ..common.toy_train import lr_multiplier, optimizer, train

model.head.norm = "BN"
model.head.norm_stats = "per_level"
train.output_dir = "output/toy/lazy/retinanet_R18_FPN_bn_head"
