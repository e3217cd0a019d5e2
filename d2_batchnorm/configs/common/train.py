# detectron2's training settings (its configs/common/train.py: output_dir, init_checkpoint,
# max_iter, eval_period, checkpointer, ddp, device, ...) with d2_batchnorm's settings and their
# defaults, the LazyConfig names of the yacs keys (d2_batchnorm.config.SETTINGS):
#   train.precise_bn = dict(enabled=False, num_iter=200, num_samples=0, period=0,
#                           ims_per_batch=0, datasets=[], eval_ema=True, target_rel_error=0.0)
#   train.bn_stats = "population"        # or "mini_batch": test batches' own statistics
#   train.frozen_bn_last_iters = 0       # FrozenBN for the last N iterations
#   train.bn_momentum = 0.0              # EMA momentum of every BN; 0: the layers' own
#   train.bn_guard_nonfinite = True      # a non-finite step leaves BN buffers unchanged
#   train.bn_ema_across_workers = "average"   # or "per_worker": each rank's own statistics
#   train.bn_monitor = dict(enabled=False, period=100)   # the BN monitor hook
#   train.seed = -1
from detectron2.model_zoo import get_config

from d2_batchnorm.lazy_config import add_batchnorm_train_config

train = add_batchnorm_train_config(get_config("common/train.py").train)
