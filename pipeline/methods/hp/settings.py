"""[hp]: Hidden Positives' settings, one typed field per key (values: pipeline/methods/hp/presets.toml)."""

from __future__ import annotations

from pipeline.settings import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_REAL,
    PoolBackend,
    number,
    section,
    within,
)


@section
class HpSection:
    """[hp]: Hidden Positives' head, loss, pools, optimiser and schedule (docs/hp.md §2-§5); HCL never reads it."""

    head_dim: int = within(POSITIVE)
    epochs: int = within(POSITIVE)
    batch_size: int = within(POSITIVE)
    tau: float = within(POSITIVE_REAL)
    alpha: float = within(NON_NEGATIVE)
    rho: float = within(FRACTION)
    pool_size: int = within(POSITIVE)
    renew_interval: int = within(POSITIVE)
    ema_m: float = within(FRACTION)
    warmup: int = within(COUNT)
    lr: float = within(POSITIVE_REAL)
    weight_decay: float = within(NON_NEGATIVE)
    grad_clip: float = within(POSITIVE_REAL)
    dropout: float = within(number(0, 1, high_open=True))
    seed: int = within(COUNT)
    pool_backend: PoolBackend
    anchor_tile: int = within(COUNT)  # 0: one round = one image's anchors
