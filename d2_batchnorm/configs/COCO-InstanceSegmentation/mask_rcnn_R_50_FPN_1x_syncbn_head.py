# Heads whose BatchNorms are synchronized over all workers (leakage mitigation "syncbn").
from .mask_rcnn_R_50_FPN_1x_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head.leakage_mitigation = model.roi_heads.mask_head.leakage_mitigation = "syncbn"
train.output_dir = "output/coco/lazy/mask_rcnn_R_50_FPN_1x_syncbn_head"
