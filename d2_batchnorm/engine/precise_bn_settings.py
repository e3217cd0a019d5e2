"""
PreciseBN's settings, resolved once from a config (yacs ``TEST.PRECISE_BN``, a LazyConfig's
``train.precise_bn``) and a world size: every "0 means ..." default is applied here, and
the hook, the checkpoint tool and the audit read the result.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

from ..config_kinds import adapt

__all__ = ["PreciseBNSettings"]


@dataclass(frozen=True)
class PreciseBNSettings:
    """
    What a PreciseBN run does, for ``world_size`` workers:

    * ``period``: run every ``period`` iterations and after the last one
      (``PERIOD``; 0: ``TEST.EVAL_PERIOD``; 0 again: only after the last);
    * ``num_iter`` batches per worker, or ``num_samples`` images over all workers (not None
      when ``NUM_SAMPLES`` > 0, and then taking precedence);
    * ``ims_per_batch``: images per worker per batch (``IMS_PER_BATCH``; 0: the training
      batch per worker);
    * ``datasets``: what the statistics are computed on (``DATASETS``; empty: the training
      datasets);
    * ``eval_ema``: also evaluate with the EMA statistics before replacing them
      (``EVAL_EMA``, with population statistics at inference and a test set);
    * ``target_rel_error``: > 0 stops a run once every module's relative standard error is
      at most this (``TARGET_REL_ERROR``; ``num_samples`` / ``num_iter`` stay the cap).
    """

    enabled: bool
    period: int
    num_iter: int
    num_samples: Optional[int]
    ims_per_batch: int
    datasets: Tuple[str, ...]
    eval_ema: bool
    target_rel_error: float = 0.0
    world_size: int = 1

    @classmethod
    def from_config(cls, cfg, world_size: int = 1) -> "PreciseBNSettings":
        kind = adapt(cfg, world_size)
        value = kind.get
        return cls(
            enabled=bool(value("TEST.PRECISE_BN.ENABLED")),
            period=value("TEST.PRECISE_BN.PERIOD") or value("TEST.EVAL_PERIOD"),
            num_iter=value("TEST.PRECISE_BN.NUM_ITER"),
            num_samples=value("TEST.PRECISE_BN.NUM_SAMPLES") or None,
            ims_per_batch=value("TEST.PRECISE_BN.IMS_PER_BATCH") or kind.images_per_worker(world_size),
            datasets=tuple(value("TEST.PRECISE_BN.DATASETS")) or tuple(kind.train_datasets()),
            eval_ema=bool(value("TEST.PRECISE_BN.EVAL_EMA")) and value("TEST.BN_STATS") == "population"
            and kind.has_test_set(),
            target_rel_error=float(value("TEST.PRECISE_BN.TARGET_REL_ERROR")),
            world_size=world_size,
        )

    @property
    def images(self) -> int:
        """Images over all workers per run: ``num_samples``, else ``num_iter`` batches."""
        return self.num_samples or self.num_iter * self.ims_per_batch * self.world_size
