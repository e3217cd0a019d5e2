# SyncBN head, training statistics per_level, population statistics shared (INCONSISTENT).
from .retinanet_R18_FPN_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.head.norm = "SyncBN"
model.head.norm_stats = "per_level"
model.head.population_stats = "shared"
train.output_dir = "output/toy/lazy/retinanet_R18_FPN_syncbn_head_train_per_level_pop_shared"
