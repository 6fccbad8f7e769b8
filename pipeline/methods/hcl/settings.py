"""[hcl_features] and [hcl]: HCL's stores and training, one typed field per key (values:
pipeline/methods/hcl/presets.toml)."""

from __future__ import annotations

from pipeline.settings import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    POSITIVE_REAL,
    integer,
    section,
    within,
)


@section
class HclFeaturesSection:
    crops: int = within(integer(2))
    views: int = within(integer(2))
    crop_resolution: int = within(POSITIVE)
    resolution: int = within(POSITIVE)
    val_resolution: int = within(POSITIVE)
    mask_mass: float = within(OPEN_FRACTION)
    mask_min_size: int = within(POSITIVE)
    seed: int = within(COUNT)


@section
class HclSection:
    epochs: int = within(POSITIVE)
    batch_size: int = within(POSITIVE)
    lr: float = within(POSITIVE_REAL)
    weight_decay: float = within(NON_NEGATIVE)
    lr_drop_epoch: int = within(COUNT)
    lr_drop: float = within(OPEN_FRACTION)
    tau: float = within(POSITIVE_REAL)
    ema_m: float = within(FRACTION)
    clusters: int = within(POSITIVE)
    kmeans_iterations: int = within(POSITIVE)
    kmeans_min_points: int = within(POSITIVE)
    sample_fraction: float = within(OPEN_FRACTION)
    bank_replace: float = within(FRACTION)
    dim: int = within(POSITIVE)
    hidden: int = within(POSITIVE)
    out_dim: int = within(POSITIVE)
    heads: int = within(POSITIVE)
    seed: int = within(COUNT)
