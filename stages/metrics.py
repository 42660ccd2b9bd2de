"""Cluster-to-class scores: confusion matrices, Hungarian matching and the two protocols.

Unsupervised clusters have arbitrary ids, so a prediction is scored after matching clusters to
classes one-to-one (scipy's Hungarian solver, maximising matched pixels). Conventions:
- ground-truth labels <= 0 are ignored (in the truth only); classes are 1..C (row/column c-1);
- every predicted pixel of a non-ignored truth pixel counts: a cluster left unmatched (more
  clusters than classes) counts as an error for the class it covers.

Two protocols (both reported by `evaluate`):
- per tile: each tile's clusters are matched to classes on that tile alone (partition quality:
  is each tile cut along class boundaries?). The matched (class x class) confusions of all tiles
  are summed and IoU is computed once from the sum, so big tiles weigh by their pixels.
- global: one matching for the whole split from the summed raw (cluster x class) confusion (the
  same cluster id must mean the same class on every tile).
Both end in a matched confusion `(C, C + 1)`: rows are true classes, columns the class a pixel's
cluster was matched to, the last column "matched to no class". `scores_from_matched` turns that
into IoU and accuracy, so the two protocols share one definition of IoU.

`BoundaryScore` scores the edges of a map against the labels' edges within 2 px (no matching
needed), and `cooccurrence` / `matched_agreement` / `share_figures` give evaluate's label-free
figures.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt
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


def hungarian_mapping(conf: np.ndarray) -> np.ndarray:
    """cluster -> matched class index (0-based) or -1, maximising matched pixels one-to-one."""
    conf = np.asarray(conf, dtype=np.float64)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def matched_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Raw (clusters, C) confusion + cluster->class mapping -> (C, C + 1) matched confusion.

    Entry [t, p] counts pixels of true class t whose cluster is matched to class p; column C
    counts pixels whose cluster is matched to no class (always errors).
    """
    conf = np.asarray(conf, dtype=np.int64)
    num_clusters, num_classes = conf.shape
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.shape != (num_clusters,):
        raise ValueError(f"mapping has shape {mapping.shape}, expected ({num_clusters},)")
    out = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for cluster, cls in enumerate(mapping):
        out[:, cls if cls >= 0 else num_classes] += conf[cluster]
    return out


def scores_from_matched(matched: np.ndarray) -> dict:
    """IoU per class, mIoU and pixel accuracy from a (C, C + 1) matched confusion.

    IoU_c = TP / (TP + FP + FN) with TP = [c, c], true area = row c, predicted area = column c.
    per_class_iou is NaN for a class absent from both truth and prediction; mIoU averages over
    classes present in the truth (pixels predicted as an absent class still count: they are
    false negatives in their true class's row).
    """
    matched = np.asarray(matched, dtype=np.float64)
    num_classes = matched.shape[0]
    if matched.shape != (num_classes, num_classes + 1):
        raise ValueError(f"matched confusion must be (C, C + 1), got {matched.shape}")
    inter = np.diag(matched[:, :num_classes])
    true_area = matched.sum(axis=1)
    pred_area = matched[:, :num_classes].sum(axis=0)
    union = true_area + pred_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    present = true_area > 0
    total = matched.sum()
    return {
        "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
        "per_class_iou": [float(v) for v in iou],
        "pixel_accuracy": float(inter.sum() / total) if total > 0 else float("nan"),
    }


def hungarian_scores(conf: np.ndarray) -> dict:
    """Match clusters to classes one-to-one on a confusion matrix; IoU per class and accuracy.

    Returns {"miou", "per_class_iou" (list, NaN for classes absent from truth and prediction),
    "pixel_accuracy", "mapping" (cluster -> class index or -1)}. mIoU averages over classes
    present in the truth.
    """
    mapping = hungarian_mapping(conf)
    return {**scores_from_matched(matched_confusion(conf, mapping)), "mapping": mapping.tolist()}


class PerTileProtocol:
    """Per-tile protocol: each tile matched on its own, matched confusions summed over tiles."""

    def __init__(self, num_clusters: int, num_classes: int):
        if num_clusters < 1 or num_classes < 1:
            raise ValueError(f"need >= 1 cluster and class, got {num_clusters}, {num_classes}")
        self.num_clusters, self.num_classes = num_clusters, num_classes
        self.matched = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.tiles = 0

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        conf = confusion(pred, target, self.num_clusters, self.num_classes)
        self.matched += matched_confusion(conf, hungarian_mapping(conf))
        self.tiles += 1

    def result(self) -> dict:
        return scores_from_matched(self.matched)


class GlobalProtocol:
    """Global protocol: raw confusions summed over tiles, one matching for the whole split."""

    def __init__(self, num_clusters: int, num_classes: int):
        if num_clusters < 1 or num_classes < 1:
            raise ValueError(f"need >= 1 cluster and class, got {num_clusters}, {num_classes}")
        self.num_clusters, self.num_classes = num_clusters, num_classes
        self.confusion = np.zeros((num_clusters, num_classes), dtype=np.int64)
        self.tiles = 0

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        self.confusion += confusion(pred, target, self.num_clusters, self.num_classes)
        self.tiles += 1

    def mapping(self) -> np.ndarray:
        return hungarian_mapping(self.confusion)

    @property
    def matched(self) -> np.ndarray:
        return matched_confusion(self.confusion, self.mapping())

    def result(self) -> dict:
        return scores_from_matched(self.matched)


def cooccurrence(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """(k, k) pixel counts of cluster i in labelling `a` on cluster j in labelling `b` (same shape)."""
    if a.shape != b.shape:
        raise ValueError(f"labellings differ in shape: {a.shape} != {b.shape}")
    return np.bincount(a.ravel().astype(np.int64) * k + b.ravel(), minlength=k * k).reshape(k, k)


def matched_agreement(cooc: np.ndarray) -> float:
    """Share of pixels on which two labellings agree once their cluster ids are matched one-to-one
    (Hungarian, maximising agreed pixels): 1 = the same partition under other names."""
    cooc = np.asarray(cooc, dtype=np.float64)
    total = cooc.sum()
    if total == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(cooc, maximize=True)
    return float(cooc[rows, cols].sum() / total)


def share_figures(counts: np.ndarray) -> dict:
    """Pixel shares of clusters 0..k-1, the largest share and the effective number of clusters
    (exp of the shares' entropy: k when all are equal, 1 when one cluster takes everything)."""
    counts = np.asarray(counts, dtype=np.float64)
    shares = counts / counts.sum() if counts.sum() > 0 else np.zeros_like(counts)
    nz = shares[shares > 0]
    return {"shares": [float(v) for v in shares], "largest_share": float(shares.max(initial=0.0)),
            "clusters_used": float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0}


def row_percent_records(matched: np.ndarray, class_names: list[str], unmatched_name: str = "unmatched"
                        ) -> list[dict]:
    """A matched confusion as records for DVC's `confusion` plot template (which counts records).

    Each true class (row) becomes exactly 100 {"actual", "predicted"} records, one per percent of
    its pixels (largest-remainder rounding), so the plot reads as a row-normalised confusion in
    percent, small classes stay visible and the file stays small whatever the pixel count. Rows of
    classes absent from the truth give no records; the "unmatched" column appears only if used.
    """
    matched = np.asarray(matched, dtype=np.int64)
    num_classes = matched.shape[0]
    if matched.shape != (num_classes, num_classes + 1) or len(class_names) != num_classes:
        raise ValueError(f"expected a (C, C + 1) matrix and C names, got {matched.shape} and {len(class_names)}")
    columns = list(class_names) + [unmatched_name]
    records = []
    for t, row in enumerate(matched):
        total = row.sum()
        if total == 0:
            continue
        exact = row * 100.0 / total
        units = np.floor(exact).astype(np.int64)
        # Hand the remaining units to the largest remainders (ties: lowest column), so a row sums to 100.
        order = sorted(range(len(row)), key=lambda j: (-(exact[j] - units[j]), j))
        for j in order[: 100 - units.sum()]:
            units[j] += 1
        for j, n in enumerate(units):
            records += [{"actual": class_names[t], "predicted": columns[j]}] * int(n)
    return records


# Boundary scores: how well the map's edges follow the labels' edges, whatever the cluster ids.
BOUNDARY_TOLERANCE_PX = 2


def boundary_map(ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """bool (H, W): pixels whose right or lower neighbour holds another id, both pixels `valid`."""
    edge = np.zeros(ids.shape, dtype=bool)
    right = (ids[:, 1:] != ids[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    down = (ids[1:] != ids[:-1]) & valid[1:] & valid[:-1]
    edge[:, :-1] |= right
    edge[:-1] |= down
    return edge


def _within(edge: np.ndarray, of: np.ndarray, tolerance: float) -> int:
    """Pixels of `edge` within `tolerance` pixels (Euclidean) of a pixel of `of`."""
    if not edge.any() or not of.any():
        return 0
    return int((edge & (distance_transform_edt(~of) <= tolerance)).sum())


class BoundaryScore:
    """Boundary precision, recall and F-score of a predicted map against the labels, summed over
    images (the boundary F-measure of the BSDS and Cityscapes benchmarks, on pixel counts).

    Boundaries are `boundary_map`s over labelled pixels only (truth > 0, so neither the edge of an
    ignored area nor a cluster edge inside one counts). A predicted boundary pixel is right when a
    label boundary lies within `tolerance` pixels (precision); a label boundary pixel is found when
    a predicted one does (recall); F = 2PR / (P + R). Cluster ids need no matching: an edge is
    where the ids change.
    """

    def __init__(self, tolerance: float = BOUNDARY_TOLERANCE_PX):
        self.tolerance = tolerance
        self.pred_hits = self.pred_total = self.truth_hits = self.truth_total = 0

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
        valid = target > 0
        truth_edge, pred_edge = boundary_map(target, valid), boundary_map(pred, valid)
        self.pred_hits += _within(pred_edge, truth_edge, self.tolerance)
        self.pred_total += int(pred_edge.sum())
        self.truth_hits += _within(truth_edge, pred_edge, self.tolerance)
        self.truth_total += int(truth_edge.sum())

    def result(self) -> dict:
        """{"precision", "recall", "f_score"}. Precision is NaN when no edge was predicted (F is then
        0: no label edge was found); recall and F are NaN when the labels have no edge."""
        nan = float("nan")
        p = self.pred_hits / self.pred_total if self.pred_total else nan
        r = self.truth_hits / self.truth_total if self.truth_total else nan
        if not self.truth_total:
            f = nan
        elif not self.pred_total or p + r == 0:
            f = 0.0
        else:
            f = 2 * p * r / (p + r)
        return {"precision": p, "recall": r, "f_score": f}
