"""When things happen during HP training: the λ ramp (docs/hp.md §5) and Pool_sp renewal (§4)."""

from __future__ import annotations


def lambda_at(t: int, warmup: int, total: int) -> float:
    """λ at global iteration t (from 0): 0 while t ≤ warmup, else (t − warmup)/(T − warmup), T = total (§5)."""
    if t <= warmup:
        return 0.0
    if total <= warmup:
        raise ValueError(f"lambda_at: iteration {t} lies past warmup {warmup} >= total iterations {total}")
    return (t - warmup) / (total - warmup)


def renews_at(iteration_in_epoch: int, renew_interval: int) -> bool:
    """Pool_sp is rebuilt every renew_interval iterations within the epoch, but not at iteration 0 (§4)."""
    if renew_interval <= 0:
        raise ValueError(f"renews_at: renew_interval must be positive, got {renew_interval}")
    return iteration_in_epoch != 0 and iteration_in_epoch % renew_interval == 0
