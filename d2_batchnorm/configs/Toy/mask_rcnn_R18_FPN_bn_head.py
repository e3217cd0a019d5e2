# LazyConfig of mask_rcnn_R18_FPN_bn_head.yaml: the toy Mask R-CNN (GN backbone) with
# per-worker BN box and mask heads, 2 images per worker. 2 CPU processes:
#   python tools/lazyconfig_train_net.py --num-gpus 2 --config-file configs/Toy/mask_rcnn_R18_FPN_bn_head.py
from ..common.data.toy import dataloader
from ..common.models.toy_mask_rcnn_fpn import model
from ..common.toy_train import lr_multiplier, optimizer, train

model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "BN"
dataloader.train.total_batch_size = 4
train.output_dir = "output/toy/lazy/mask_rcnn_R18_FPN_bn_head"
