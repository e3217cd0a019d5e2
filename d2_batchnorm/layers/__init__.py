"""
d2_batchnorm's normalization layers: :func:`get_norm` (detectron2's names plus ours),
:class:`SyncBatchNorm`, :class:`GhostBatchNorm`, :class:`LevelBatchNorm` (per-level or
shared statistics for heads shared across FPN levels) and the batch-statistics helpers.
"""
from .batch_norm import D2BN_NORM_NAMES, NORM_NAMES, get_norm, norm_options_from_config
from .batch_stats import (
    batch_norm_over_parts,
    local_power_sums,
    moments_from_power_sums,
    update_running_stats_,
)
from .ghost_batch_norm import GhostBatchNorm
from .level_norm import LEVEL_STATS, LevelBatchNorm
from .roi_shuffle import RoIShuffleState, shuffle_rois, unshuffle_rois
from .sync_batch_norm import SyncBatchNorm, check_sync_group_size, convert_sync_batchnorm

__all__ = [
    "D2BN_NORM_NAMES",
    "NORM_NAMES",
    "get_norm",
    "norm_options_from_config",
    "SyncBatchNorm",
    "check_sync_group_size",
    "convert_sync_batchnorm",
    "GhostBatchNorm",
    "LEVEL_STATS",
    "LevelBatchNorm",
    "batch_norm_over_parts",
    "local_power_sums",
    "moments_from_power_sums",
    "update_running_stats_",
    "RoIShuffleState",
    "shuffle_rois",
    "unshuffle_rois",
]
