"""Hidden Positives (docs/hp.md §2-§5): heads, LHP mix, reference pools, schedules and the loss.

Pure tensor code, no I/O: pipeline/methods/hp/training.py wires these to the feature cache in the loop of
pipeline/training/trainer.py.
"""

from pipeline.methods.hp.heads import ProjectionHead, SegmentationHead, ema_update, lhp_mix
from pipeline.methods.hp.loss import LossOutput, hp_loss, positive_masks
from pipeline.methods.hp.pool import BACKENDS, PoolIndex, pick_patches
from pipeline.methods.hp.schedule import lambda_at, renews_at

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
