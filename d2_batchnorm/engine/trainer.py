"""
``BNTrainer``: detectron2's ``DefaultTrainer`` with d2_batchnorm's model builder, config
validation and a DistributedDataParallel wrapping that also works for CPU modules (gloo).
"""
import logging
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import validate_batchnorm_config
from ..modeling import build_model as build_bn_model

__all__ = ["BNTrainer", "create_ddp_model"]

logger = logging.getLogger(__name__)


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """
    detectron2's ``create_ddp_model`` for CUDA and CPU modules alike: ``device_ids`` is
    only given for a module on a CUDA device (DDP rejects it for CPU modules). BN buffers
    are not broadcast (``broadcast_buffers=False`` unless given), as in detectron2.
    """
    kwargs.setdefault("broadcast_buffers", False)
    if "device_ids" not in kwargs:
        device = next(model.parameters()).device
        kwargs["device_ids"] = [device.index if device.index is not None else comm.get_local_rank()] if device.type == "cuda" else None
    return d2_create_ddp_model(model, **kwargs)


class BNTrainer(DefaultTrainer):
    """
    A ``DefaultTrainer`` that builds models through :func:`d2_batchnorm.modeling.build_model`
    (our norm names and heads), validates d2_batchnorm's config keys before building
    anything, and wraps CPU models in DDP too.
    """

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__; only the DDP wrapping differs.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        validate_batchnorm_config(cfg, comm.get_world_size())
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        model = build_bn_model(cfg)
        logger.info("Model:\n{}".format(model))
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder or cfg.OUTPUT_DIR)
