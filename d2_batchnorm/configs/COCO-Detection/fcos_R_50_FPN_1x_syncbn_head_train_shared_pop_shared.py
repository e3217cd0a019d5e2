# SyncBN head, training statistics shared, population statistics shared (consistent).
from .fcos_R_50_FPN_1x_bn_head import dataloader, lr_multiplier, model, optimizer, train

model.head.norm = "SyncBN"
model.head.norm_stats = "shared"
model.head.population_stats = "shared"
train.output_dir = "output/coco/lazy/fcos_R_50_FPN_1x_syncbn_head_train_shared_pop_shared"
