"""
d2_batchnorm's normalization layers: :func:`get_norm` (detectron2's names plus ours) and
the converters of a built model's norms (:func:`convert_for_inference`: standard modules
for export), :class:`SyncBatchNorm`, :class:`GhostBatchNorm`,
:class:`LevelBatchNorm` (per-level or shared statistics for heads shared across FPN
levels), the RoI shuffle, and the per-channel statistics they share (:mod:`.batch_stats`).
"""
from .batch_norm import (
    D2BN_NORM_NAMES,
    INFERENCE_CONVERTED_NORMS,
    NORM_NAMES,
    convert_batchnorm,
    convert_for_inference,
    convert_sync_batchnorm,
    get_norm,
    norm_options_from_config,
    set_ema_momentum,
)
from .batch_stats import ChannelMoments, batch_norm_over_parts, update_running_stats_
from .ghost_batch_norm import GhostBatchNorm
from .level_norm import LEVEL_STATS, LevelBatchNorm, PerLevelNorms
from .roi_shuffle import RoIShuffleState, shuffle_rois, unshuffle_rois
from .sync_batch_norm import SyncBatchNorm

__all__ = [k for k, v in globals().items() if not k.startswith("_") and not isinstance(v, type(batch_norm))]
