# SyncBN head, training statistics shared, population statistics shared (consistent).
from .fcos_R18_FPN_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.head.norm = "SyncBN"
model.head.norm_stats = "shared"
model.head.population_stats = "shared"
train.output_dir = "output/toy/lazy/fcos_R18_FPN_syncbn_head_train_shared_pop_shared"
