"""Segmentation metrics from one confusion matrix (docs/hp.md §8). Pure numpy, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion_matrix(pred: np.ndarray, label: np.ndarray, n_pred: int, n_classes: int) -> np.ndarray:
    """(n_classes, n_pred) counts of label c predicted as p; labels outside 0..n_classes-1 are ignored."""
    label = np.asarray(label).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    keep = (label >= 0) & (label < n_classes)
    return np.bincount(label[keep] * n_pred + pred[keep], minlength=n_classes * n_pred).reshape(n_classes, n_pred)


def hungarian_match(confusion: np.ndarray) -> np.ndarray:
    """cluster -> class, maximizing matched pixels over the whole confusion matrix (one-to-one).

    Clusters left without a class (more clusters than classes) map to -1 and count as wrong.
    """
    rows, cols = linear_sum_assignment(confusion, maximize=True)  # rows: classes, cols: clusters
    mapping = np.full(confusion.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def remap_confusion(confusion: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Class x cluster counts -> class x class counts under `mapping` (unmatched clusters dropped from TP)."""
    n = confusion.shape[0]
    out = np.zeros((n, n + 1), dtype=confusion.dtype)  # last column: clusters matched to no class
    for cluster, cls in enumerate(mapping):
        out[:, cls if cls >= 0 else n] += confusion[:, cluster]
    return out


@dataclass
class Scores:
    miou: float
    acc: float
    iou: list[float | None]  # per class; None where IoU is undefined (class absent from labels and predictions)


def scores(confusion: np.ndarray) -> Scores:
    """mIoU over classes with a defined IoU, and pixel accuracy, from a (classes x classes[+1]) matrix."""
    n = confusion.shape[0]
    tp = np.diag(confusion[:, :n]).astype(np.float64)
    fn = confusion.sum(1) - tp
    fp = confusion[:, :n].sum(0) - tp
    denom = tp + fp + fn
    iou = [float(t / d) if d > 0 else None for t, d in zip(tp, denom, strict=True)]
    defined = [v for v in iou if v is not None]
    total = confusion.sum()
    return Scores(miou=float(np.mean(defined)) if defined else 0.0, acc=float(tp.sum() / total) if total else 0.0,
                  iou=iou)
