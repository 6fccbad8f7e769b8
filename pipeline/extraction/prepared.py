"""The folder `prepare` writes (prepared/<split>/: images/, labels/, samples.txt, labelled.txt), read back.

Kept apart from the prepare stage so that the features stage and the benches read crops without importing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import Config
from pipeline.extraction import timing


def crops_per_image(config: Config, split: str) -> int:
    """Crops `prepare` writes per source image; they are listed consecutively in samples.txt."""
    return 5 if split == "train" and config["prepare"]["five_crop"] else 1


def read_prepared(directory: str | Path) -> tuple[list[str], bool]:
    """The sample names (in store order) and whether labels exist, as `prepare` wrote them."""
    directory = Path(directory)
    names = (directory / "samples.txt").read_text().split()
    labelled = (directory / "labelled.txt").read_text().strip() == "1"
    return names, labelled


def load_prepared(directory: str | Path, names: list[str], labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack the prepared images (and labels) of `names` (timed as the features run's "decode")."""
    directory = Path(directory)
    with timing.timed("decode"):
        images = np.stack([np.asarray(Image.open(directory / "images" / f"{n}.png").convert("RGB")) for n in names])
        labels = None
        if labelled:
            labels = np.stack([np.asarray(Image.open(directory / "labels" / f"{n}.png")) for n in names])
    return images, labels
