# SyncBN head, training statistics per_level, population statistics per_level (consistent).
from .fcos_R18_FPN_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.head.norm = "SyncBN"
model.head.norm_stats = "per_level"
model.head.population_stats = "per_level"
train.output_dir = "output/toy/lazy/fcos_R18_FPN_syncbn_head_train_per_level_pop_per_level"
