# GroupNorm heads: no batch statistics, nothing to leak.
from .mask_rcnn_R_50_FPN_1x_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "GN"
train.output_dir = "output/coco/lazy/mask_rcnn_R_50_FPN_1x_gn_head"
