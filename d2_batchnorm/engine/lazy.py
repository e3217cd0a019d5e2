"""
Training and evaluation from a LazyConfig (detectron2's Python configs), with the pieces
:class:`~d2_batchnorm.engine.BNTrainer` uses for yacs configs: the same hooks
(:func:`~d2_batchnorm.engine.hooks.build_batchnorm_hooks`), DDP for CPU modules too,
evaluation with the statistics ``train.bn_stats`` selects and without perturbing training.
The config defines :data:`d2_batchnorm.config_kinds.LAZY_CONFIG_PARTS` (detectron2's convention).
"""
import logging
from typing import Dict

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from torch import nn

from ..bn_modes import inference_statistics
from ..layers import convert_sync_batchnorm, set_ema_momentum
from ..config_kinds import adapt
from ..rng import preserved_rng_state
from .hooks import build_batchnorm_hooks
from .trainer import BNTrainer, create_ddp_model

__all__ = ["build_lazy_model", "lazy_test", "build_lazy_trainer", "build_any_model", "test_any"]

logger = logging.getLogger(__name__)


def build_lazy_model(cfg) -> nn.Module:
    """
    ``instantiate(cfg.model)`` on ``train.device`` (no weights loaded), with torch's
    ``nn.SyncBatchNorm`` (what detectron2's own modules build for "SyncBN" / "nnSyncBN", CPU
    refused) converted to d2_batchnorm's ``SyncBatchNorm``, and the EMA momentum of every
    BatchNorm set by ``train.bn_momentum`` when > 0 — as ``build_model`` does for yacs.
    """
    model = convert_sync_batchnorm(instantiate(cfg.model))
    momentum = adapt(cfg).get("BN.MOMENTUM")
    if momentum > 0:
        set_ema_momentum(model, momentum)
    model.to(adapt(cfg).get("MODEL.DEVICE"))
    logger.info("Model:\n%s", model)
    return model


def build_any_model(cfg) -> nn.Module:
    """The model of either kind of config: :func:`build_lazy_model` or ``BNTrainer.build_model``."""
    build = {"lazy-train": build_lazy_model, "train": BNTrainer.build_model}[adapt(cfg).kind]
    return build(cfg)


def test_any(cfg, model: nn.Module) -> Dict:
    """The evaluation of either kind of config: :func:`lazy_test` or ``BNTrainer.test``."""
    test = {"lazy-train": lazy_test, "train": BNTrainer.test}[adapt(cfg).kind]
    return test(cfg, model)


def lazy_test(cfg, model: nn.Module) -> Dict:
    """
    detectron2's evaluation of ``dataloader.test`` with ``dataloader.evaluator`` (nothing
    without an evaluator), with the inference statistics of ``train.bn_stats``; the random
    state is put back afterwards, so evaluating during training does not change it.
    """
    view = adapt(cfg)
    if not view.has_test_set():
        return {}
    with preserved_rng_state(), inference_statistics(model, view.get("TEST.BN_STATS")):
        results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_lazy_trainer(cfg) -> SimpleTrainer:
    """
    detectron2's ``SimpleTrainer`` (``AMPTrainer`` with ``train.amp.enabled``) for a
    LazyConfig, with the hooks of :class:`~d2_batchnorm.engine.BNTrainer` (the evaluation
    is :func:`lazy_test`; periods from ``train``). Its ``checkpointer`` attribute loads weights:
    ``trainer.checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=...)``.
    """
    model = build_lazy_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    trainer.checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, optimizer=optimizer, trainer=trainer)

    def evaluate():
        return lazy_test(cfg, model)

    main = comm.is_main_process()
    trainer.register_hooks([
        d2_hooks.IterationTimer(),
        d2_hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        *build_batchnorm_hooks(cfg, model, evaluate),
        d2_hooks.PeriodicCheckpointer(trainer.checkpointer, **cfg.train.checkpointer) if main else None,
        d2_hooks.EvalHook(cfg.train.eval_period, evaluate),
        d2_hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                                period=cfg.train.log_period) if main else None,
    ])
    return trainer
