# Per-worker BN heads, evaluated with mini-batch statistics (each test batch of 2 images per
# worker normalized by its own statistics).
from .mask_rcnn_R18_FPN_bn_head import dataloader, lr_multiplier, model, optimizer, train

train.bn_stats = "mini_batch"
dataloader.test.batch_size = 2
train.output_dir = "output/toy/lazy/mask_rcnn_R18_FPN_bn_head_batch_stats"
