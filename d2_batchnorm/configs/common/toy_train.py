# The training of configs/Toy/*.yaml: SGD at lr 0.02 for 300 iterations, 50 warm-up
# iterations, lr x0.1 at 220 and 270, seed 1, evaluation at the end only.
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .train import train

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[220, 270, 300]),
    warmup_length=50 / 300,
    warmup_method="linear",
    warmup_factor=0.001,
)
optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.02
train.max_iter = 300
train.eval_period = 0
train.checkpointer.period = 100000
train.seed = 1
