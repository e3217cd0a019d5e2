# SyncBN head shared across levels the naive way: per-level batch statistics in training, one
# EMA over all levels for inference (train/test inconsistent; detectron2's shared BN).
from .fcos_R_50_FPN_1x_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.head.norm = "SyncBN"
model.head.norm_stats = "naive"
train.output_dir = "output/coco/lazy/fcos_R_50_FPN_1x_syncbn_head_naive"
