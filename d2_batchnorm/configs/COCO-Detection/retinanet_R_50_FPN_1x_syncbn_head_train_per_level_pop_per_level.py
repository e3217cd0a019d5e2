# SyncBN head, training statistics per_level, population statistics per_level (consistent).
from .retinanet_R_50_FPN_1x_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.head.norm = "SyncBN"
model.head.norm_stats = "per_level"
model.head.population_stats = "per_level"
train.output_dir = "output/coco/lazy/retinanet_R_50_FPN_1x_syncbn_head_train_per_level_pop_per_level"
