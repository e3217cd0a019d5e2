# Per-worker BN heads whose RoI features are shuffled across workers before the head and
# returned after it (leakage mitigation "shuffle").
from .mask_rcnn_R_50_FPN_1x_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head.leakage_mitigation = model.roi_heads.mask_head.leakage_mitigation = "shuffle"
train.output_dir = "output/coco/lazy/mask_rcnn_R_50_FPN_1x_shuffle_head"
