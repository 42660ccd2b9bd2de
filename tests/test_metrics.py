"""Hungarian-matched scores on hand-made cases whose right answer is known."""

import numpy as np
import pytest

from stages.metrics import (
    GlobalProtocol,
    PerTileProtocol,
    confusion,
    hungarian_mapping,
    hungarian_scores,
    matched_confusion,
    row_percent_records,
    scores_from_matched,
)


def two_class_mask(h=8, w=8, split=6):
    """Class 1 in columns < split, class 2 elsewhere (3:1 for the default)."""
    t = np.ones((h, w), np.uint8)
    t[:, split:] = 2
    return t


def test_permuted_perfect_prediction_scores_one():
    rng = np.random.default_rng(0)
    target = rng.integers(1, 5, size=(16, 16)).astype(np.uint8)  # classes 1..4
    perm = np.array([2, 0, 3, 1])  # class c (0-based) -> cluster perm[c]
    pred = perm[target - 1]
    s = hungarian_scores(confusion(pred, target, 4, 4))
    assert s["miou"] == 1.0 and s["pixel_accuracy"] == 1.0
    assert s["per_class_iou"] == [1.0] * 4
    assert [s["mapping"][perm[c]] for c in range(4)] == [0, 1, 2, 3]


def test_all_one_prediction_on_two_class_mask():
    target = two_class_mask()  # 75 % class 1, 25 % class 2
    pred = np.zeros_like(target)
    s = hungarian_scores(confusion(pred, target, 2, 2))
    # cluster 0 -> class 1: IoU 48/64; class 2 gets the empty cluster: IoU 0.
    assert s["per_class_iou"] == pytest.approx([0.75, 0.0])
    assert s["miou"] == pytest.approx(0.375)
    assert s["pixel_accuracy"] == pytest.approx(0.75)


def test_ignored_pixels_do_not_count():
    target = two_class_mask()
    pred = (target == 2).astype(np.uint8)
    s_clean = hungarian_scores(confusion(pred, target, 2, 2))
    # Mark a block ignored (0) and put garbage predictions there: the score must not move.
    target_ign, pred_ign = target.copy(), pred.copy()
    target_ign[:3, :] = 0
    pred_ign[:3, :] = 1 - pred_ign[:3, :]
    conf = confusion(pred_ign, target_ign, 2, 2)
    assert conf.sum() == target.size - 3 * target.shape[1]
    s_ign = hungarian_scores(conf)
    assert s_ign["miou"] == s_clean["miou"] == 1.0
    # Negative truth values (signed label rasters) are ignored too.
    target_neg = target_ign.astype(np.int16)
    target_neg[:3, :] = -1
    assert (confusion(pred_ign, target_neg, 2, 2) == conf).all()


def test_ignore_only_in_truth_prediction_never_masked():
    # A cluster id that is only predicted on ignored pixels still exists; a cluster predicted on
    # labelled pixels always counts, whatever its id.
    target = np.array([[1, 1, 2, 2, 0, 0]])
    pred = np.array([[0, 0, 1, 1, 2, 2]])
    s = hungarian_scores(confusion(pred, target, 3, 2))
    assert s["miou"] == 1.0
    pred_wrong = np.array([[0, 2, 1, 1, 2, 2]])  # cluster 2 leaks onto a class-1 pixel
    s = hungarian_scores(confusion(pred_wrong, target, 3, 2))
    assert s["pixel_accuracy"] == pytest.approx(3 / 4)


def test_more_clusters_than_classes_unmatched_cluster_is_error():
    target = two_class_mask()  # 48 px class 1, 16 px class 2
    pred = np.where(target == 1, 0, 1)
    pred[:, :2] = 2  # 16 px of class 1 go to a third cluster
    s = hungarian_scores(confusion(pred, target, 3, 2))
    assert s["mapping"] == [0, 1, -1]
    assert s["per_class_iou"] == pytest.approx([32 / 48, 1.0])
    assert s["miou"] == pytest.approx((32 / 48 + 1.0) / 2)
    assert s["pixel_accuracy"] == pytest.approx(48 / 64)
    m = matched_confusion(confusion(pred, target, 3, 2), np.array(s["mapping"]))
    assert m.tolist() == [[32, 0, 16], [0, 16, 0]]


def test_per_tile_and_global_protocols_differ_when_ids_swap_between_tiles():
    t = two_class_mask(split=4)  # 32 px of each class
    a = (t == 2).astype(np.uint8)  # tile A: class 1 -> cluster 0
    b = 1 - a                       # tile B: the same partition, ids swapped
    per_tile, glob = PerTileProtocol(2, 2), GlobalProtocol(2, 2)
    for pred in (a, b):
        per_tile.add(pred, t)
        glob.add(pred, t)
    assert per_tile.result()["miou"] == 1.0 and per_tile.result()["pixel_accuracy"] == 1.0
    # Globally each cluster covers half of each class: IoU = 32 / (64 + 64 - 32) = 1/3.
    assert glob.result()["miou"] == pytest.approx(1 / 3)
    assert glob.result()["pixel_accuracy"] == pytest.approx(0.5)


def test_protocols_agree_when_ids_are_consistent():
    rng = np.random.default_rng(1)
    per_tile, glob = PerTileProtocol(3, 3), GlobalProtocol(3, 3)
    for _ in range(4):
        t = rng.integers(0, 4, size=(8, 8))  # 0 = ignored
        pred = (t + 1) % 3  # the same permutation on every tile; ignored pixels predicted too
        per_tile.add(pred, t)
        glob.add(pred, t)
    assert glob.result()["miou"] == per_tile.result()["miou"] == 1.0
    assert glob.mapping().tolist() == [1, 2, 0]  # cluster (c + 1) % 3 holds class c


def test_per_tile_weights_tiles_by_pixels():
    # Tile 1: 60 px, perfect. Tile 2: 4 px of class 1, all wrong cluster on a 2-class tile.
    t1 = np.ones((6, 10), np.uint8)
    t1[:, 5:] = 2
    p1 = (t1 == 2).astype(np.uint8)
    t2 = np.array([[1, 1, 2, 2]])
    p2 = np.array([[0, 1, 1, 0]])  # any matching gets 2 of 4 right
    acc = PerTileProtocol(2, 2)
    acc.add(p1, t1)
    acc.add(p2, t2)
    m = acc.matched
    assert m.sum() == 64 and np.trace(m[:, :2]) == 62
    assert acc.result()["pixel_accuracy"] == pytest.approx(62 / 64)


def test_class_absent_from_truth_is_nan_and_left_out_of_miou():
    target = np.array([[1, 1, 2, 2]])
    pred = np.array([[0, 0, 1, 1]])
    s = hungarian_scores(confusion(pred, target, 3, 3))
    assert np.isnan(s["per_class_iou"][2])
    assert s["miou"] == 1.0


def test_scores_from_matched_shape_and_values():
    with pytest.raises(ValueError, match=r"\(C, C \+ 1\)"):
        scores_from_matched(np.zeros((2, 2)))
    s = scores_from_matched(np.array([[3, 1, 0], [0, 2, 2]]))
    assert s["per_class_iou"] == pytest.approx([3 / 4, 2 / 5])
    assert s["pixel_accuracy"] == pytest.approx(5 / 8)


def test_bad_inputs_raise():
    t = two_class_mask()
    with pytest.raises(ValueError, match="exceeds the number of classes"):
        confusion(np.zeros_like(t), t + 1, 2, 2)
    with pytest.raises(ValueError, match="cluster ids"):
        confusion(np.full_like(t, 5), t, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((3, 3)), t, 2, 2)
    with pytest.raises(ValueError, match="mapping"):
        matched_confusion(np.zeros((3, 2)), np.array([0, 1]))


def test_hungarian_mapping_is_one_to_one_and_maximal():
    conf = np.array([[5, 4, 0], [4, 0, 0], [0, 0, 1]])
    # Greedy (cluster 0 -> class 0) gets 5 + 0 + 1; the optimum is 4 + 4 + 1.
    assert hungarian_mapping(conf).tolist() == [1, 0, 2]


def test_row_percent_records_rows_sum_to_100_and_round_fairly():
    matched = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 5, 990, 5]])
    names = ["water", "tree", "road"]
    recs = row_percent_records(matched, names)
    count = lambda a, p: sum(r["actual"] == a and r["predicted"] == p for r in recs)
    assert sum(r["actual"] == "water" for r in recs) == 100
    assert sorted(count("water", p) for p in names) == [33, 33, 34]
    assert not any(r["actual"] == "tree" for r in recs)  # absent from truth: no row
    # 99 % exactly, then 0.5 % each to tree and unmatched: the tie goes to the first column.
    assert (count("road", "road"), count("road", "tree"), count("road", "unmatched")) == (99, 1, 0)
    with pytest.raises(ValueError):
        row_percent_records(matched, names[:2])


def test_boundary_score_counts_edges_within_two_pixels():
    from stages.metrics import BoundaryScore

    label = np.ones((20, 20), np.uint8)
    label[:, 10:] = 2
    renamed = np.where(label == 1, 5, 0)  # other ids, the same edge
    score = BoundaryScore()
    score.add(renamed, label)
    assert score.result() == {"precision": 1.0, "recall": 1.0, "f_score": 1.0}

    near, far = np.zeros_like(label), np.zeros_like(label)
    near[:, 12:] = 1  # 2 px off: still found
    far[:, 16:] = 1   # 6 px off: neither right nor found
    for pred, f in ((near, 1.0), (far, 0.0)):
        score = BoundaryScore()
        score.add(pred, label)
        assert score.result()["f_score"] == f

    flat = BoundaryScore()
    flat.add(np.zeros_like(label), label)  # no edge predicted: nothing found
    r = flat.result()
    assert np.isnan(r["precision"]) and (r["recall"], r["f_score"]) == (0.0, 0.0)


def test_boundary_score_ignores_unlabelled_pixels_and_sums_images():
    from stages.metrics import BoundaryScore

    label = np.ones((20, 20), np.uint8)
    label[:, 10:] = 2
    label[:5] = 0  # ignored rows: an edge predicted there does not count
    pred = (label == 2).astype(np.uint8)
    pred[:5] = np.arange(20) % 2  # edges everywhere, but all in the ignored rows
    score = BoundaryScore()
    score.add(pred, label)
    assert score.result() == {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    half = np.zeros_like(label)
    half[:, 10:] = 1
    half[:, :3] = 1  # a wrong edge at column 2
    score.add(half, label)
    r = score.result()
    assert r["recall"] == 1.0 and 0.5 < r["precision"] < 1.0  # 15 + 15 right of 15 + 30 predicted
    assert r["precision"] == (15 + 15) / (15 + 30)
    no_edges = BoundaryScore()
    no_edges.add(pred, np.ones_like(label))  # labels without an edge: recall and F undefined
    assert np.isnan(no_edges.result()["recall"]) and np.isnan(no_edges.result()["f_score"])
