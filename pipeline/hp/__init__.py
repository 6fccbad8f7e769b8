"""Hidden Positives (docs/hp.md §2-§5): heads, LHP mix, reference pools, schedules and the loss.

Pure tensor code, no I/O: pipeline/hp/training.py wires these to the feature cache in the loop of pipeline/trainer.py.
"""

from pipeline.hp.heads import ProjectionHead, SegmentationHead, ema_update, lhp_mix
from pipeline.hp.loss import LossOutput, hp_loss, positive_masks
from pipeline.hp.pool import BACKENDS, PoolIndex, pick_patches
from pipeline.hp.schedule import lambda_at, renews_at

__all__ = [
    "BACKENDS",
    "LossOutput",
    "PoolIndex",
    "ProjectionHead",
    "SegmentationHead",
    "ema_update",
    "hp_loss",
    "lambda_at",
    "lhp_mix",
    "positive_masks",
    "renews_at",
    "pick_patches",
]
