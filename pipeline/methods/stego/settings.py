"""[stego] and [stego_cache]: STEGO's training and what it adds to the cache, one typed field per key (values:
pipeline/methods/stego/presets.toml; docs/stego.md §5)."""

from __future__ import annotations

from pipeline.settings import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_REAL, integer, number, section, within


@section
class StegoSection:
    """[stego]: the head, the contrastive-correlation loss and its optimiser (docs/stego.md §2-§4)."""

    head_dim: int = within(POSITIVE)  # D
    batch_size: int = within(integer(2))  # negatives are other images of the batch (§3.6)
    max_steps: int = within(COUNT)  # batches to train (the reference counts steps); 0: `epochs` instead
    epochs: int = within(POSITIVE)
    lr: float = within(POSITIVE_REAL)
    feature_samples: int = within(POSITIVE)  # S
    neg_samples: int = within(POSITIVE)
    num_neighbors: int = within(POSITIVE)  # the positive is drawn from neighbour ranks 1..num_neighbors
    pointwise: bool
    zero_clamp: bool
    stabilize: bool
    w_intra: float = within(NON_NEGATIVE)
    w_inter: float = within(NON_NEGATIVE)
    w_neg: float = within(NON_NEGATIVE)
    b_intra: float = within(number(-1, 1))
    b_inter: float = within(number(-1, 1))
    b_neg: float = within(number(-1, 1))
    correspondence_weight: float = within(NON_NEGATIVE)
    dropout: float = within(number(0, 1, high_open=True))  # the three Dropout2d draws of §2
    seed: int = within(COUNT)


@section
class StegoCacheSection:
    """[stego_cache]: the neighbour table and the mirrored val features STEGO adds to the HP cache (docs/stego.md §1,
    §6); each is its own stage, rebuilt only when its own keys change."""

    knn_size: int = within(POSITIVE)  # neighbours kept per crop (the reference: 30)
    knn_dropout: float = within(FRACTION)  # the reference's Dropout2d before pooling (0.1); 0: none
    knn_seed: int = within(COUNT)
    flip_tta: bool  # mirrored val features for the reference's flip averaging; false: none, and the report says so
