"""Cluster-to-class scores: confusion matrices and Hungarian-matched IoU.

Unsupervised clusters have arbitrary ids, so a prediction is scored after matching clusters to
classes one-to-one (scipy's Hungarian solver, maximising matched pixels). Conventions:
- ground-truth labels <= 0 are ignored; classes are 1..C (row/column c-1 of the matrices);
- every predicted pixel of a non-ignored truth pixel counts: a cluster left unmatched (more
  clusters than classes) counts as an error for the class it covers.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion(pred: np.ndarray, target: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """(num_clusters, num_classes) pixel counts of cluster i on class j+1, truth <= 0 ignored."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
    keep = target > 0
    p = pred[keep].astype(np.int64)
    t = target[keep].astype(np.int64) - 1
    if p.size and (p.min() < 0 or p.max() >= num_clusters):
        raise ValueError(f"predicted cluster ids must lie in [0, {num_clusters}), got {p.min()}..{p.max()}")
    if t.size and t.max() >= num_classes:
        raise ValueError(f"label value {t.max() + 1} exceeds the number of classes {num_classes}")
    return np.bincount(p * num_classes + t, minlength=num_clusters * num_classes).reshape(
        num_clusters, num_classes)


def hungarian_scores(conf: np.ndarray) -> dict:
    """Match clusters to classes one-to-one on a confusion matrix; IoU per class and accuracy.

    Returns {"miou", "per_class_iou" (list, NaN for classes absent from truth and prediction),
    "pixel_accuracy", "mapping" (cluster -> class index or -1)}. mIoU averages over classes
    present in the truth.
    """
    conf = np.asarray(conf, dtype=np.float64)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    num_clusters, num_classes = conf.shape
    mapping = np.full(num_clusters, -1, dtype=np.int64)
    mapping[rows] = cols
    inter = np.zeros(num_classes)
    pred_area = np.zeros(num_classes)
    for r, c in zip(rows, cols):
        inter[c] = conf[r, c]
        pred_area[c] = conf[r].sum()
    true_area = conf.sum(axis=0)
    union = true_area + pred_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    present = true_area > 0
    total = conf.sum()
    return {
        "miou": float(np.nanmean(np.where(present, iou, np.nan))) if present.any() else float("nan"),
        "per_class_iou": [float(v) for v in iou],
        "pixel_accuracy": float(inter.sum() / total) if total > 0 else float("nan"),
        "mapping": mapping.tolist(),
    }
