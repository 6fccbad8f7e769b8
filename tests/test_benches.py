"""Benches time equal work on both sides of every ratio, and say how much each side did."""

import pytest

from benches.train import cycle_epochs
from pipeline.methods.hp.schedule import renews_at


def test_cache_side_runs_as_many_iterations_as_asked_across_epochs():
    """A bench store smaller than the timed iterations: the cache side starts new epochs instead of stopping
    (it once timed 4 cache iterations against 21 reference ones and reported a ratio of 132)."""
    asked_epochs = []

    def epoch(e):
        asked_epochs.append(e)
        return iter([f"e{e}b0", f"e{e}b1", f"e{e}b2", f"e{e}b3"])  # 4 batches per epoch (64 images / batch 16)

    steps = list(cycle_epochs(epoch, 21))
    assert [i for i, _ in steps] == list(range(21))
    assert steps[4][1] == "e1b0" and steps[-1][1] == "e5b0" and asked_epochs == [0, 1, 2, 3, 4, 5]
    renewals = sum(renews_at(i, 5) for i, _ in steps)
    assert renewals == sum(renews_at(i, 5) for i in range(21))  # the reference side's count at the same interval


def test_an_empty_epoch_is_an_error_not_an_endless_loop():
    with pytest.raises(ValueError, match="smaller than one batch"):
        list(cycle_epochs(lambda e: iter([]), 3))


def test_bare_side_of_bench_features_makes_the_stages_passes():
    """Per image: one clean pass plus one per photometric view, batched by chunk, as the features stage does."""
    import numpy as np

    from benches.features import bare_forward_seconds

    seen = []
    _, passes = bare_forward_seconds(lambda x: seen.append(len(x)), np.zeros((7, 8, 8, 3), np.uint8), 2, 3)
    assert passes == 7 * (1 + 2) == sum(seen)
    assert seen == [3, 6, 3, 6, 1, 2]  # chunks of 3, 3, 1 images; each with its views in one batch


def test_distinct_images_figures_follow_each_presets_settings():
    """`bench train`'s data-order figures are computed with each preset's own batch, chunk, buffer, seeds and
    epochs ([hp] and [train]), and hp-pipe's plan is within 1 % of an i.i.d. shuffle (issue 9's target)."""
    from benches.order import TRAIN_IMAGES, distinct_images_figures
    from pipeline.config import load_config

    figures = distinct_images_figures()
    for dataset, n_images in TRAIN_IMAGES.items():
        prefix = "" if dataset == "cocostuff27" else f"{dataset}_"
        config, setup = load_config(dataset), figures[f"{prefix}distinct_images_setup"]
        assert setup == {"images": n_images, "crops_per_image": 5, "batch_size": config["hp"]["batch_size"],
                         "chunk_size": config["features"]["chunk_size"],
                         "buffer_chunks": config["train"]["buffer_chunks"], "epochs": config["hp"]["epochs"],
                         "features_seed": config["features"]["seed"], "train_seed": config["hp"]["seed"]}
        assert 0.99 <= figures[f"{prefix}distinct_images_over_iid"] <= 1.01
