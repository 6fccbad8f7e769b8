"""What the cluster probe found on images without labels (docs/evaluation.md, "Without labels"). No I/O.

With no labels there is nothing to score and no Hungarian matching: a val image's segments are the cluster probe's
ids themselves. `ClusterTally` streams over the predictions once and keeps, per cluster, its share of the pixels,
the number of images it appears in, and its best example crops (the images where it covers the most pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def example_crop(image: np.ndarray, mask: np.ndarray, min_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(crop, mask crop): the bounding box of `mask` in `image`, grown about its centre to at least `min_fraction`
    of the image's side on each axis (a thin segment still shows its surroundings), clipped to the image."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("example_crop: the mask is empty")
    box = []
    for lo, hi, side in ((ys.min(), ys.max() + 1, mask.shape[0]), (xs.min(), xs.max() + 1, mask.shape[1])):
        want = max(hi - lo, min(side, int(np.ceil(min_fraction * side))))
        start = int(np.clip((lo + hi - want) // 2, 0, side - want))
        box.append(slice(start, start + want))
    return image[box[0], box[1]], mask[box[0], box[1]]


@dataclass
class ClusterTally:
    """Per-cluster statistics of cluster maps fed in image order; `examples` crops kept per cluster."""

    k: int
    examples: int = 4
    pixels: np.ndarray = field(init=False)
    images: np.ndarray = field(init=False)
    total: int = 0
    seen: int = 0
    # cluster -> [(its pixels in the image, image index, crop, mask crop)], most pixels first
    best: dict[int, list[tuple[int, int, np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pixels = np.zeros(self.k, np.int64)
        self.images = np.zeros(self.k, np.int64)

    def add(self, images: np.ndarray, clusters: np.ndarray) -> None:
        """(B, H, W, 3) images and their (B, H, W) cluster ids (0..k-1), the next B images of the split."""
        for image, ids in zip(images, clusters, strict=True):
            index, self.seen = self.seen, self.seen + 1
            counts = np.bincount(ids.ravel(), minlength=self.k)[: self.k]
            self.pixels += counts
            self.images += counts > 0
            self.total += ids.size
            for c in np.flatnonzero(counts):
                kept = self.best.setdefault(int(c), [])
                if len(kept) < self.examples or counts[c] > kept[-1][0]:  # ties: the earlier image stays
                    kept.append((int(counts[c]), index, *example_crop(image, ids == c)))
                    kept.sort(key=lambda e: (-e[0], e[1]))
                    del kept[self.examples:]

    def table(self) -> list[dict[str, int | float]]:
        """One row per cluster: its pixels, their share of all pixels (%), and the images it appears in."""
        return [{"id": c, "pixels": int(self.pixels[c]), "images": int(self.images[c]),
                 "pixel_share": round(100 * float(self.pixels[c]) / max(self.total, 1), 2)} for c in range(self.k)]
