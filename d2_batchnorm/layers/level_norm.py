"""
``LevelBatchNorm``: BatchNorm for a head shared across FPN levels, with per-level or
shared (joint) statistics, for training and for population statistics separately.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_int
from ..distributed import active_sync_group, check_sync_group_size
from .batch_stats import BatchNormNd, ChannelMoments, batch_norm_over_parts, row_of, update_running_stats_

__all__ = ["LevelBatchNorm", "PerLevelNorms", "LEVEL_STATS"]

#: allowed statistics modes of :class:`LevelBatchNorm` (training and population)
LEVEL_STATS = ("per_level", "shared")


class LevelBatchNorm(BatchNormNd):
    """
    ONE BatchNorm module for a conv layer shared by L FPN levels, called once per forward
    with the list of the L level tensors ``[x_1, ..., x_L]``, x_i of shape (N, C, H_i, W_i).

    Training statistics (``stats``):

    * ``"per_level"``: level i is normalized by its own batch mean/variance (what
      detectron2's ``CycleBatchNormList`` does, in one call);
    * ``"shared"``: every level is normalized by the joint statistics of all levels, i.e.
      those of BN over the concatenation of all levels' values, computed from per-level
      power sums (n_i, S_i, Q_i) — no feature map is concatenated::

          mean = sum_i S_i / sum_i n_i,   var = sum_i Q_i / sum_i n_i - mean^2

    Population statistics (``population_stats``, default: same as ``stats``) decide the
    running buffers and what inference uses:

    * ``"per_level"``: buffers of shape (L, C); row i is the EMA of level i's batch
      statistics, and level i is normalized by row i at inference;
    * ``"shared"``: buffers of shape (C,), the EMA of the joint statistics, used for all
      levels at inference.

    Mixed settings (training per-level, population shared, or the reverse) are the
    train/test-inconsistent variants the paper compares. The affine (gamma, beta) is one
    (C,) pair shared by all levels (``share_affine=True``) or one (L, C) row per level.

    With ``sync_group_size`` not None the statistics are synchronized across the workers
    of a sync group as by :class:`SyncBatchNorm`, whose docstring also holds what both do
    with ``running_var``, memory formats and float16/bfloat16 inputs. ``sync_stats``, the
    flag of every synchronized norm, is True iff built with a ``sync_group_size``; setting
    it to False gives per-worker statistics.
    """

    def __init__(
        self,
        num_features: int,
        num_levels: int,
        stats: str = "per_level",
        population_stats: str = "",
        share_affine: bool = True,
        sync_group_size: Optional[int] = None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.num_levels = check_int("num_levels", num_levels, 1)
        self.stats = check_choice("stats", stats, LEVEL_STATS)
        self.population_stats = check_choice("population_stats", population_stats or stats, LEVEL_STATS)
        self.share_affine = share_affine
        if sync_group_size is not None:
            check_sync_group_size(sync_group_size)
        self.sync_group_size = sync_group_size
        self.sync_stats = sync_group_size is not None
        if affine and not share_affine:
            self.weight = nn.Parameter(torch.ones(num_levels, num_features))
            self.bias = nn.Parameter(torch.zeros(num_levels, num_features))
        if track_running_stats and self.population_stats == "per_level":
            self.running_mean = torch.zeros(num_levels, num_features)
            self.running_var = torch.ones(num_levels, num_features)

    def extra_repr(self):
        return super().extra_repr() + (
            f", num_levels={self.num_levels}, stats={self.stats}, "
            f"population_stats={self.population_stats}, share_affine={self.share_affine}, "
            f"sync_group_size={self.sync_group_size}"
        )

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            features: list of L tensors (N, C, H_i, W_i) (any (N, C, *) works).
        Returns:
            list of L normalized tensors of the same shapes and dtypes.
        """
        if not isinstance(features, (list, tuple)) or len(features) != self.num_levels:
            got = f"a list of {len(features)}" if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(
                f"LevelBatchNorm expects a list of num_levels = {self.num_levels} tensors "
                f"(one per FPN level); got {got}"
            )
        if not (self.training or self.running_mean is None):
            return [
                F.batch_norm(
                    x, row_of(self.running_mean, i), row_of(self.running_var, i),
                    row_of(self.weight, i), row_of(self.bias, i), False, 0.0, self.eps,
                )
                for i, x in enumerate(features)
            ]
        group = active_sync_group(self.sync_group_size or 0) if self.sync_stats else False
        ys, sums, moments = batch_norm_over_parts(
            features, self.weight, self.bias, self.eps, group, joint=self.stats == "shared"
        )
        if self.population_stats != self.stats:
            rows = sums if self.population_stats == "per_level" else sums.sum(0, keepdim=True)
            moments = ChannelMoments.from_power_sums(rows)
        update_running_stats_(self, moments)
        return ys


class PerLevelNorms(nn.ModuleList):
    """
    L norm modules for L FPN levels, called like :class:`LevelBatchNorm` with the list of
    the L level tensors ``[x_1, ..., x_L]``: ``y_i = norm_i(x_i)``. What
    :func:`d2_batchnorm.layers.convert_for_inference` makes of a ``LevelBatchNorm`` with
    per-level population statistics or affine: L ``nn.BatchNorm2d``, the one of level i
    holding row i of the (L, C) buffers and parameters. Unlike ``LevelBatchNorm`` it
    compiles with ``torch.jit.script``. ``num_levels`` marks, as on ``LevelBatchNorm``, a
    norm that takes all levels at once.
    """

    def __init__(self, norms: Sequence[nn.Module]):
        super().__init__(norms)
        self.num_levels = len(norms)

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            features: list of L tensors (N, C, H_i, W_i).
        Returns:
            list of L normalized tensors, level i by norm i.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"PerLevelNorms expects a list of {self.num_levels} tensors (one per FPN level)")
        outputs: List[torch.Tensor] = []
        for i, norm in enumerate(self):
            outputs.append(norm(features[i]))
        return outputs
