"""``BNTrainer`` (what it changes in detectron2's ``DefaultTrainer``: its docstring) and its DDP wrapping."""
import logging
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine import hooks as d2_hooks
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..bn_modes import inference_statistics
from ..config import validate_batchnorm_config
from ..modeling import build_model as build_bn_model
from ..rng import preserved_rng_state
from .defaults import resolve_device
from .hooks import build_batchnorm_hooks

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
        """
        ``DefaultTrainer.__init__``, same steps in the same order, except: ``cfg`` first gets
        :func:`resolve_device` and :func:`validate_batchnorm_config` (users build BNTrainer from
        configs nobody validated, docs/getting-started.md, "In your own trainer"); the model is wrapped by our
        :func:`create_ddp_model`. detectron2's passes ``device_ids``, which DDP rejects for CPU
        modules, and its ``__init__`` offers no hook to replace it: hence this copy.
        """
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = resolve_device(cfg)
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

    def build_hooks(self):
        """
        detectron2's default hooks (IterationTimer, LRScheduler, checkpointer, evaluation,
        writers) with :func:`~d2_batchnorm.engine.hooks.build_batchnorm_hooks` before the
        checkpointer, in place of detectron2's PreciseBN.
        """
        cfg = self.cfg
        ret = [d2_hooks.IterationTimer(), d2_hooks.LRScheduler()]
        ret += build_batchnorm_hooks(cfg, self.model, lambda: self.test(self.cfg, self.model))
        if comm.is_main_process():
            ret.append(d2_hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(d2_hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if comm.is_main_process():
            ret.append(d2_hooks.PeriodicWriter(self.build_writers(), period=20))
        return ret

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """
        detectron2's test loader; with ``TEST.BN_STATS: mini_batch`` it batches
        ``TEST.IMS_PER_BATCH`` images per worker (mini-batch statistics need a batch).
        """
        batch = {"batch_size": cfg.TEST.IMS_PER_BATCH} if cfg.TEST.BN_STATS == "mini_batch" else {}
        return build_detection_test_loader(cfg, dataset_name, **batch)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """
        detectron2's evaluation on ``DATASETS.TEST`` with the statistics ``TEST.BN_STATS``
        selects (:func:`~d2_batchnorm.bn_modes.inference_statistics`; with "mini_batch"
        every BN normalizes each test batch by its own statistics and the population
        statistics are left untouched). The random state is put back afterwards
        (:func:`~d2_batchnorm.rng.preserved_rng_state`), so evaluating during training
        does not change the training.
        """
        with preserved_rng_state(), inference_statistics(model, cfg.TEST.BN_STATS):
            return super().test(cfg, model, evaluators)
