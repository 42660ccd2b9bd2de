"""The evaluate stage on hand-made shards, a small real artifact and a small real teacher checkpoint.

The tiles are flat colours per class (plus noise), so k-means on RGB must segment them perfectly:
that pins the wiring (tile/label alignment, both protocols, matching) to a known answer, while
the untrained networks give arbitrary but deterministic scores.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from runtime.artifact import build_meta, write_artifact
from stages import evaluate as ev
from stages.baselines import KMeansBaseline, handcrafted_features, lab_from_rgb, rgb_features
from stages.checkpoints import TEACHER_FORMAT, build_teacher
from stages.datasets import read_index, stable_subset
from stages.metrics import GlobalProtocol, PerTileProtocol, cooccurrence, matched_agreement, share_figures
from stages.model import INPUT_MEAN, INPUT_SCALE, INPUT_STD, Encoder
from stages.params import EvaluateParams
from stages.rasterio_utils import write_geotiff

TILE = 32
CLASS_RGB = {1: (30, 60, 200), 2: (40, 170, 40), 3: (200, 190, 150)}  # water, tree, soil
NAMES = {"1": "water", "2": "tree canopy", "3": "bare soil"}


def make_tile(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three class regions (vertical bands of seeded widths), a few ignored pixels, noise."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(6, TILE - 6), 2, replace=False))
    label = np.ones((TILE, TILE), np.uint8)
    label[:, cuts[0]:] = 2
    label[:, cuts[1]:] = 3
    rgb = np.stack([np.array(CLASS_RGB[c], np.int16) for c in label.ravel()]).reshape(TILE, TILE, 3)
    rgb = np.clip(rgb + rng.integers(-6, 7, rgb.shape), 0, 255).astype(np.uint8)
    label[rng.random(label.shape) < 0.05] = 0  # unlabelled pixels, ignored in the truth only
    return rgb, label


def write_dataset(root: Path, n_tiles: int = 4, labels: bool = True, label_fn=None,
                  source_fn=lambda i: f"scene-{i:04d}", split: str = "val") -> Path:
    """A one-shard split (`val` by default) in the shard contract (see stages/datasets.py); tile i
    is cut from the raster `source_fn(i)` (by default a raster of its own)."""
    shard = root / split / "shard-00000"
    shard.mkdir(parents=True)
    lines = []
    for i in range(n_tiles):
        rgb, label = make_tile(i)
        if label_fn is not None:
            label = label_fn(i, label)
        item = f"scene-{i:04d}_r000000_c000000"
        transform = Affine(0.6, 0, 500000 + 100 * i, 0, -0.6, 4000000)
        write_geotiff(shard / f"{item}.tif", rgb.transpose(2, 0, 1), crs="EPSG:32611", transform=transform)
        if labels:
            write_geotiff(shard / f"{item}.label.tif", label, crs="EPSG:32611", transform=transform)
        lines.append(json.dumps({"item_id": item, "split": split, "input": f"{item}.tif",
                                 "target": f"{item}.label.tif" if labels else None,
                                 "source_item": source_fn(i), "group": f"area-{i % 2}",
                                 "window": [0, 0, TILE, TILE],
                                 "class_hist": None}))
    (shard / "index.jsonl").write_text("\n".join(lines) + "\n")
    (root / "summary.json").write_text(json.dumps({
        "dataset": "handmade", "num_classes": 3 if split == "val" else 0, "class_names": NAMES if split == "val" else {},
        "counts": {"val": 0, "train": 0, "metrics_train": 0, split: n_tiles},
        "class_hist": {}, "params_hash": "test", "pixel_size_m": {split: 0.6},
        "input_rescale": {"mode": "none", "limits": None}}))
    return root


def write_raw(root: Path, rasters: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """data/raw as ingest writes it (manifest.jsonl, dataset.json, images/, labels/) for
    {item_id: (rgb, label)}."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    lines = []
    for item, (rgb, label) in rasters.items():
        transform = Affine(0.6, 0, 500000, 0, -0.6, 4000000)
        write_geotiff(root / "images" / f"{item}.tif", rgb.transpose(2, 0, 1), crs="EPSG:32611", transform=transform)
        write_geotiff(root / "labels" / f"{item}.tif", label, crs="EPSG:32611", transform=transform)
        lines.append(json.dumps({"item_id": item, "image": f"images/{item}.tif", "label": f"labels/{item}.tif"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dataset.json").write_text(json.dumps({"num_classes": 3}))
    return root


def write_model(dst: Path, max_k: int = 4) -> Path:
    torch.manual_seed(0)
    enc = Encoder(width=8, depth=1, embed_dim=6).eval()
    layers, arrays = enc.export_layers()
    meta = build_meta(embed_dim=6, max_k=max_k, temperature=0.1, cluster_iters_default=3, smooth_iters_default=1,
                      input_mean=INPUT_MEAN, input_std=INPUT_STD, input_scale=INPUT_SCALE,
                      supports_learned_refine=False, receptive_field=enc.receptive_field,
                      git_commit="test", params_hash="test", created="2026-01-01T00:00:00+00:00")
    return write_artifact(dst, layers=layers, arrays=arrays, meta=meta, metrics={})


def write_teacher(dst: Path, max_k: int = 4) -> Path:
    """A teacher checkpoint as the train stage writes it (format, config, state_dict, val, fingerprint)."""
    config = {"width": 8, "depth": 1, "embed_dim": 6, "max_k": max_k, "temperature": 0.1, "cluster_iters": 2,
              "smooth_iters": 1, "refine_head": False, "seed": 0}
    model = build_teacher(config).eval()
    dst.mkdir(parents=True)
    torch.save({"format": TEACHER_FORMAT, "config": config, "state_dict": model.state_dict(),
                "val": {"metric": "none", "score": 0.0, "step": 0}, "fingerprint": "test"}, dst / "model.pt")
    return dst


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {"shards": write_dataset(root / "shards"), "model": write_model(root / "best"),
            "teacher": write_teacher(root / "teacher"), "root": root}


def small_params(**kw) -> EvaluateParams:
    return EvaluateParams(**{"k": 0, "seed": 0, "num_overlays": 2, "samples_per_tile": 256, "global_samples": 1024,
                             "kmeans_iters": 20, "kmeans_restarts": 2, "rasters": False, **kw})


def run_main(inputs, out: Path, evaluate_yaml: str = "", **override) -> int:
    """`python -m stages.evaluate` on a params file of its own (the repo's may be mid-edit)."""
    params = out.parent / "params.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    shards = Path(override.get("shards", inputs["shards"]))
    params.write_text(f"ingest:\n  dataset: {shards.name}\n"
                      "evaluate:\n  samples_per_tile: 256\n  global_samples: 1024\n  kmeans_iters: 20\n"
                      + (evaluate_yaml if "rasters:" in evaluate_yaml else evaluate_yaml + "  rasters: false\n"))
    argv = ["--params", str(params), "--shards", str(shards.parent),
            "--model", str(override.get("model", inputs["model"])),
            "--teacher", str(override.get("teacher", inputs["teacher"])), "--out", str(out),
            "--raw", str(override.get("raw", out.parent / "no_raw"))]
    return ev.main(argv)


@pytest.fixture(scope="module")
def result(inputs):
    out = inputs["root"] / "results" / "evaluate"
    metrics = ev.evaluate(inputs["shards"], inputs["model"], inputs["teacher"], out, small_params())
    return metrics, out


# ---------------------------------------------------------------------------------------------
# Baseline features
# ---------------------------------------------------------------------------------------------


def test_lab_known_colours():
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [128, 128, 128]]], np.uint8)
    lab = lab_from_rgb(rgb)[0]
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)  # sRGB red, D65
    np.testing.assert_allclose(lab[3], [53.59, 0, 0], atol=0.05)


def test_handcrafted_features_colour_and_texture():
    flat = np.full((20, 24, 3), 90, np.uint8)
    f = handcrafted_features(flat)
    assert f.shape == (20 * 24, 4) and f.dtype == np.float32
    np.testing.assert_allclose(f[:, :3], lab_from_rgb(flat).reshape(-1, 3), atol=1e-3)  # blur of a constant
    np.testing.assert_allclose(f[:, 3], 0, atol=1e-3)  # no texture
    checker = np.where((np.indices((20, 24)).sum(0) % 2)[..., None] == 1, 200, 20).astype(np.uint8).repeat(3, 2)
    tex = handcrafted_features(checker)[:, 3].reshape(20, 24)
    L = lab_from_rgb(checker)[..., 0]
    # Inside, a 9x9 window holds 41 of one and 40 of the other value: std ~ half the L difference.
    assert tex[10, 12] == pytest.approx((L.max() - L.min()) / 2, rel=0.01)
    with pytest.raises(ValueError, match="uint8"):
        handcrafted_features(flat.astype(np.float32))


def test_kmeans_restarts_keep_the_lowest_inertia():
    rng = np.random.default_rng(3)
    # Five blobs, three clusters: starts disagree, and the kept one must be the best of them.
    x = np.concatenate([rng.normal(c, 1.0, (40, 2)) for c in [(0, 0), (0, 9), (9, 0), (9, 9), (30, 30)]])
    x = x.astype(np.float32)
    inertia = lambda c: float(((x.astype(np.float64) - c[np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), 1)]) ** 2).sum())
    singles = [inertia(KMeansBaseline(rgb_features, iters=30, restarts=1).fit(x, 3, seed=s)) for s in range(1, 5)]
    assert min(singles) < singles[0]  # the first start is not the best one: restarts matter here
    best = KMeansBaseline(rgb_features, iters=30, restarts=4).fit(x, 3, seed=1)  # starts 1..4
    assert inertia(best) == pytest.approx(min(singles))
    with pytest.raises(ValueError, match="restarts"):
        KMeansBaseline(rgb_features, iters=30, restarts=0)


def test_per_group_global_scores_keep_the_splits_one_matching():
    # area "a" (9 tiles) fixes the split's matching: cluster 0 -> class 1, cluster 1 -> class 2.
    # Area "b" (1 tile) uses the clusters the other way round: perfect on its own, 0 under the split's.
    tile_a = (np.array([[0, 1]]), np.array([[1, 2]]))
    tile_b = (np.array([[1, 0]]), np.array([[1, 2]]))
    glob = GlobalProtocol(2, 2)
    group_glob = {"a": GlobalProtocol(2, 2), "b": GlobalProtocol(2, 2)}
    group_tile = {"a": PerTileProtocol(2, 2), "b": PerTileProtocol(2, 2)}
    for g, (pred, label) in [("a", tile_a)] * 9 + [("b", tile_b)]:
        for acc in (glob, group_glob[g], group_tile[g]):
            acc.add(pred, label)
    scores = ev.per_group_scores(glob, group_glob, group_tile)
    assert scores["a"]["tiles"] == 9 and scores["b"]["tiles"] == 1
    assert scores["a"]["global"]["miou"] == 1.0 and scores["b"]["global"]["miou"] == 0.0
    assert scores["b"]["per_tile"]["miou"] == 1.0  # matched on its own tile


def test_kmeans_baseline_separates_flat_colours():
    rgb, label = make_tile(7)
    b = KMeansBaseline(rgb_features, iters=20)
    feats = b.features(rgb)
    pred = b.labels(feats, rgb, b.fit(feats, 3, seed=0))
    acc = GlobalProtocol(3, 3)
    acc.add(pred, label)
    assert acc.result()["miou"] == 1.0


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def test_metrics_cover_every_method_and_protocol(result):
    metrics, out = result
    assert json.loads((out / "metrics.json").read_text()) == metrics
    per_class = json.loads((out / "per_class_iou.json").read_text())
    assert (metrics["k"], metrics["num_classes"], metrics["tiles"]) == (3, 3, 4)
    for method in ev.METHODS:
        for proto in ("global", "per_tile"):
            s, iou = metrics[method][proto], per_class[method][proto]
            assert set(s) == {"miou", "pixel_accuracy", "boundary_f"} and 0.0 <= s["boundary_f"] <= 1.0
            assert 0.0 <= s["miou"] <= 1.0 and 0.0 <= s["pixel_accuracy"] <= 1.0
            assert list(iou) == ["water", "tree canopy", "bare soil"]
            assert s["miou"] == pytest.approx(np.mean(list(iou.values())), abs=1e-5)
    for proto in ("global", "per_tile"):
        for b in ev.BASELINES:
            assert metrics["ratio_miou"][proto][b] == pytest.approx(
                metrics["model"][proto]["miou"] / metrics[b][proto]["miou"], rel=1e-4)
    per_group = json.loads((out / "per_group.json").read_text())
    for method in ev.METHODS:
        assert {g: r["tiles"] for g, r in per_group[method].items()} == {"area-0": 2, "area-1": 2}
        for r in per_group[method].values():
            assert 0.0 <= r["global"]["miou"] <= 1.0 and 0.0 <= r["per_tile"]["miou"] <= 1.0
    # the per-tile protocol sums matched confusions over tiles, so its areas bracket the split's score
    tile_scores = [r["per_tile"]["pixel_accuracy"] for r in per_group["model"].values()]
    assert min(tile_scores) - 1e-6 <= metrics["model"]["per_tile"]["pixel_accuracy"] <= max(tile_scores) + 1e-6


def test_label_free_figures_beside_the_labelled_scores(result):
    metrics, out = result
    assert (metrics["labelled"], metrics["split"]) == (True, "val")
    for method in ev.METHODS:
        f = metrics[method]["label_free"]
        assert 1.0 <= f["clusters_used"] <= 3.0 and 1 / 3 <= f["largest_share"] <= 1.0
        assert 0.0 < f["seed_agreement"] <= 1.0 and 0.0 <= f["jitter_agreement"] <= 1.0
    # Three flat colours: every seed finds the same three clusters in RGB.
    assert metrics["kmeans_rgb"]["label_free"]["seed_agreement"] == 1.0
    shares = json.loads((out / "cluster_shares.json").read_text())
    assert set(shares) == set(ev.METHODS)
    for method in ev.METHODS:
        assert set(shares[method]) == {"all", "area-0", "area-1"}
        assert sum(shares[method]["all"]) == pytest.approx(1.0, abs=1e-5) and len(shares[method]["all"]) == 3
    assert set(metrics["agreement_with_model"]) == set(ev.BASELINES)
    assert all(0.0 < v <= 1.0 for v in metrics["agreement_with_model"].values())


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # reading the PNG back
def test_a_set_without_labels_gets_label_free_figures_on_train(inputs, tmp_path, capsys):
    shards = write_dataset(tmp_path / "shards", n_tiles=3, labels=False, split="train")
    model = write_model(tmp_path / "best", max_k=8)
    teacher = write_teacher(tmp_path / "teacher", max_k=8)
    out = tmp_path / "results" / "evaluate"
    assert run_main(inputs, out, shards=shards, model=model, teacher=teacher, evaluate_yaml="  rasters: true\n") == 0
    printed = capsys.readouterr().out
    assert "no labelled val tiles" in printed and "label-free, 3 train tiles, k = 6" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["labelled"], metrics["split"], metrics["k"], metrics["tiles"]) == (False, "train", ev.UNLABELLED_K, 3)
    assert "rasters" not in metrics and "ratio_miou" not in metrics  # whole rasters are scored against labels
    for method in ev.METHODS:
        assert set(metrics[method]) == {"label_free"}
    assert json.loads((out / "plots" / "confusion.json").read_text()) == []
    assert json.loads((out / "per_class_iou.json").read_text()) == {}
    assert json.loads((out / "per_group.json").read_text())["model"] == {"area-0": {"tiles": 2}, "area-1": {"tiles": 1}}
    pngs = sorted((out / "plots" / "overlays").glob("*.png"))
    assert len(pngs) == 3  # evaluate.num_overlays (4) of the 3 tiles: image | clusters
    with rasterio.open(pngs[0]) as src:
        assert (src.height, src.width) == (TILE, 2 * TILE + ev.OVERLAY_GAP_PX)
        np.testing.assert_array_equal(src.read().transpose(1, 2, 0)[:, :TILE], make_tile(0)[0])


def test_matched_agreement_ignores_cluster_names():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (20, 20))
    renamed = np.array([2, 0, 3, 1])[a]
    assert matched_agreement(cooccurrence(a, renamed, 4)) == 1.0
    half = renamed.copy()
    half[:10] = (half[:10] + 1) % 4  # half the image relabelled: about half agrees after matching
    assert 0.45 < matched_agreement(cooccurrence(a, half, 4)) < 0.75


def test_share_figures_count_the_clusters_in_use():
    assert share_figures(np.array([5, 5, 5, 5]))["clusters_used"] == pytest.approx(4.0)
    one = share_figures(np.array([0, 9, 0]))
    assert (one["clusters_used"], one["largest_share"], one["shares"]) == (1.0, 1.0, [0.0, 1.0, 0.0])


def test_colour_shift_is_a_function_of_source_and_seed():
    rgb = make_tile(0)[0]
    shift = ev.colour_shift_for("scene-0000", 1.0, 0)
    np.testing.assert_array_equal(ev.apply_colour_shift(rgb, *shift),
                                  ev.apply_colour_shift(rgb, *ev.colour_shift_for("scene-0000", 1.0, 0)))
    assert not np.array_equal(shift[0], ev.colour_shift_for("scene-0001", 1.0, 0)[0])  # another image, another shift
    assert not np.array_equal(ev.apply_colour_shift(rgb, *shift), rgb)
    np.testing.assert_array_equal(ev.apply_colour_shift(rgb, *ev.colour_shift_for("scene-0000", 0.0, 0)), rgb)


def test_flat_colour_tiles_are_perfect_for_rgb_kmeans(result):
    metrics, _ = result
    for proto in ("global", "per_tile"):
        assert metrics["kmeans_rgb"][proto]["miou"] == 1.0
        assert metrics["kmeans_rgb"][proto]["pixel_accuracy"] == 1.0
        assert metrics["kmeans_rgb"][proto]["boundary_f"] == 1.0  # every edge where the labels have one


def test_labelled_pixel_count_ignores_zero(inputs, result):
    metrics, _ = result
    expected = sum(int((make_tile(i)[1] > 0).sum()) for i in range(4))
    assert metrics["labelled_pixels"] == expected < 4 * TILE * TILE


def test_model_scores_match_a_direct_runtime_run(inputs, result):
    """The stage's model numbers equal Model.predict_labels (what users call) scored by hand."""
    from runtime import load_model
    from runtime.model import PER_IMAGE_BALANCE

    metrics, _ = result
    model = load_model(inputs["model"])
    tiles = ev.load_val_tiles(inputs["shards"], 3)
    per_tile = PerTileProtocol(3, 3)
    for rgb, label in zip(tiles.images, tiles.labels):
        # per-tile protocol: centres fitted on the tile's own 256 sampled cells (all 64 here), balanced
        # as predict_labels balances them by default, from the stage's kmeans_restarts starts
        own = model.fit_centres([rgb], 3, seed=0, restarts=2, balance=PER_IMAGE_BALANCE)
        per_tile.add(model.predict_labels(rgb, 3, centres=own), label)
    assert metrics["model"]["per_tile"]["miou"] == pytest.approx(per_tile.result()["miou"], abs=1e-6)


def test_max_tiles_scores_a_fixed_subset(inputs, tmp_path):
    """evaluate.max_tiles scores exactly the stable subset, records how many of the split's tiles,
    and the model's numbers equal a direct runtime run on those tiles."""
    from runtime import load_model
    from runtime.model import PER_IMAGE_BALANCE

    metrics = ev.evaluate(inputs["shards"], inputs["model"], inputs["teacher"], tmp_path / "out",
                          small_params(max_tiles=2))
    assert metrics["tiles"] == 2 and metrics["split_tiles"] == 4
    tiles = ev.load_val_tiles(inputs["shards"], 3, max_tiles=2)
    assert tiles.item_ids == [r.item_id for r in stable_subset(read_index(inputs["shards"], "val"), 2)]
    assert tiles.split_tiles == 4
    model = load_model(inputs["model"])
    per_tile = PerTileProtocol(3, 3)
    for rgb, label in zip(tiles.images, tiles.labels):
        own = model.fit_centres([rgb], 3, seed=0, restarts=2, balance=PER_IMAGE_BALANCE)
        per_tile.add(model.predict_labels(rgb, 3, centres=own), label)
    assert metrics["model"]["per_tile"]["miou"] == pytest.approx(per_tile.result()["miou"], abs=1e-6)
    assert sum(g["tiles"] for g in json.loads((tmp_path / "out" / "per_group.json").read_text())["model"].values()) == 2


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_confusion_plot_and_overlays(result):
    metrics, out = result
    records = json.loads((out / "plots" / "confusion.json").read_text())
    assert {r["actual"] for r in records} == {"water", "tree canopy", "bare soil"}
    for name in ("water", "tree canopy", "bare soil"):
        assert sum(r["actual"] == name for r in records) == 100
    pngs = sorted((out / "plots" / "overlays").glob("*.png"))
    assert [p.stem for p in pngs] == ["scene-0000_r000000_c000000", "scene-0001_r000000_c000000"]
    assert not list((out / "plots" / "overlays").glob("*.xml"))  # no GDAL sidecars
    with rasterio.open(pngs[0]) as src:
        assert src.driver == "PNG" and (src.count, src.height, src.width) == (3, TILE, 3 * TILE + 2 * ev.OVERLAY_GAP_PX)
        panel = src.read().transpose(1, 2, 0)
    rgb, label = make_tile(0)
    np.testing.assert_array_equal(panel[:, :TILE], rgb)
    truth = panel[:, TILE + ev.OVERLAY_GAP_PX: 2 * TILE + ev.OVERLAY_GAP_PX]
    np.testing.assert_array_equal(truth, ev.PALETTE[label])


def test_overlay_colours_clusters_by_matched_class():
    rgb = np.zeros((2, 3, 3), np.uint8)
    label = np.array([[1, 2, 0], [2, 2, 1]], np.uint8)
    pred = np.array([[2, 0, 1], [0, 0, 1]], np.uint8)
    mapping = np.array([1, -1, 0])  # cluster 0 -> class 2, cluster 1 unmatched, cluster 2 -> class 1
    img = ev.overlay(rgb, label, pred, mapping)
    right = img[:, 2 * 3 + 2 * ev.OVERLAY_GAP_PX:]
    np.testing.assert_array_equal(right[0, 0], ev.PALETTE[1])
    np.testing.assert_array_equal(right[0, 1], ev.PALETTE[2])
    np.testing.assert_array_equal(right[0, 2], ev.UNMATCHED_COLOUR)


def test_deterministic_outputs(inputs, result):
    _, out = result
    out2 = inputs["root"] / "again"
    ev.evaluate(inputs["shards"], inputs["model"], inputs["teacher"], out2, small_params())
    for rel in ["metrics.json", "per_class_iou.json", "per_group.json", "plots/confusion.json",
                "plots/overlays/scene-0000_r000000_c000000.png"]:
        assert (out / rel).read_bytes() == (out2 / rel).read_bytes(), rel


def test_explicit_k_above_classes_counts_unmatched_clusters(inputs):
    out = inputs["root"] / "k4"
    metrics = ev.evaluate(inputs["shards"], inputs["model"], inputs["teacher"], out, small_params(k=4))
    assert metrics["k"] == 4
    # With 4 clusters on 3 flat colours, k-means splits one colour: the extra cluster is unmatched,
    # so RGB k-means can no longer be perfect in the global protocol.
    assert metrics["kmeans_rgb"]["global"]["miou"] < 1.0


def test_rasters_that_are_one_tile_score_exactly_as_their_tiles(inputs, tmp_path):
    """Each hand-made tile is a whole raster of its own: the whole-raster protocols must then give
    every method exactly its tile protocols' scores (same pixels, samples and fits)."""
    raw = write_raw(tmp_path / "raw", {f"scene-{i:04d}": make_tile(i) for i in range(4)})
    metrics = ev.evaluate(inputs["shards"], inputs["model"], inputs["teacher"], tmp_path / "out",
                          small_params(rasters=True), raw_dir=raw)
    assert metrics["rasters"] == 4 and metrics["raster_labelled_pixels"] == metrics["labelled_pixels"]
    for name in ev.METHODS:
        assert metrics[name]["rasters"]["global"] == metrics[name]["global"], name
        assert metrics[name]["rasters"]["per_raster"] == metrics[name]["per_tile"], name
    assert metrics["ratio_miou"]["rasters_global"] == metrics["ratio_miou"]["global"]
    per_class = json.loads((tmp_path / "out" / "per_class_iou.json").read_text())
    assert per_class["model"]["rasters_global"] == per_class["model"]["global"]
    assert per_class["kmeans_rgb"]["per_raster"] == {"water": 1.0, "tree canopy": 1.0, "bare soil": 1.0}


def test_whole_raster_protocol_runs_the_runtime_on_the_whole_raster(tmp_path):
    """Two tiles cut from one 32 x 64 raster: the raster is scored in one piece, and the model's
    scores equal a direct runtime run on the whole array (centres fitted on it, as evaluate fits
    them: plain for the global protocol, balanced for the raster's own)."""
    from runtime import load_model
    from runtime.model import PER_IMAGE_BALANCE

    (a, la), (b, lb) = make_tile(0), make_tile(1)
    big, big_label = np.concatenate([a, b], axis=1), np.concatenate([la, lb], axis=1)
    shards = write_dataset(tmp_path / "shards", n_tiles=2, source_fn=lambda i: "big-0000")
    raw = write_raw(tmp_path / "raw", {"big-0000": (big, big_label)})
    model_dir, teacher = write_model(tmp_path / "best"), write_teacher(tmp_path / "teacher")
    metrics = ev.evaluate(shards, model_dir, teacher, tmp_path / "out", small_params(rasters=True), raw_dir=raw)
    assert metrics["rasters"] == 1 and metrics["raster_labelled_pixels"] == int((big_label > 0).sum())
    model = load_model(model_dir)
    expect = {}
    for proto, balance in (("global", 0), ("per_raster", PER_IMAGE_BALANCE)):
        centres = model.fit_centres([big], 3, seed=0, restarts=2, balance=balance)
        one = PerTileProtocol(3, 3)
        one.add(model.predict_labels(big, 3, centres=centres), big_label)
        expect[proto] = one.result()["miou"]
    assert metrics["model"]["rasters"]["global"]["miou"] == pytest.approx(expect["global"], abs=1e-6)
    assert metrics["model"]["rasters"]["per_raster"]["miou"] == pytest.approx(expect["per_raster"], abs=1e-6)
    assert metrics["kmeans_rgb"]["rasters"]["global"]["miou"] == 1.0  # flat colours: RGB k-means is exact


def test_rasters_need_the_ingested_rasters(inputs, tmp_path):
    out = stale_out(tmp_path)
    assert run_main(inputs, out, evaluate_yaml="  rasters: true\n", raw=tmp_path / "empty") == 2
    assert not (out / "metrics.json").exists()
    raw = write_raw(tmp_path / "raw", {"scene-0000": make_tile(0)})  # scene-0001.. are missing
    with pytest.raises(ev.EvaluateError, match=r"no labelled item 'scene-0001', the source of val tiles"):
        ev.evaluate(inputs["shards"], inputs["model"], inputs["teacher"], tmp_path / "o", small_params(rasters=True),
                    raw_dir=raw)
    with pytest.raises(ev.EvaluateError, match="manifest.jsonl: missing; run the ingest stage first"):
        ev.evaluate(inputs["shards"], inputs["model"], inputs["teacher"], tmp_path / "o", small_params(rasters=True),
                    raw_dir=tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Bad input: clear message, exit 2, no stale metrics left
# ---------------------------------------------------------------------------------------------


def stale_out(tmp_path: Path) -> Path:
    out = tmp_path / "results" / "evaluate"
    (out / "plots").mkdir(parents=True)
    (out / "metrics.json").write_text('{"model": {"global": {"miou": 0.99}}}')
    (out / "per_class_iou.json").write_text("{}")
    (out / "per_group.json").write_text("{}")
    return out


def test_missing_model_exits_2_and_removes_stale_metrics(inputs, tmp_path, capsys):
    out = stale_out(tmp_path)
    assert run_main(inputs, out, model=tmp_path / "nope") == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path / "nope") in err and "export" in err
    assert not (out / "metrics.json").exists() and not (out / "plots").exists()
    assert not (out / "per_class_iou.json").exists() and not (out / "per_group.json").exists()


def test_val_without_labels_exits_2(inputs, tmp_path, capsys):
    shards = write_dataset(tmp_path / "shards", n_tiles=2, labels=False)
    out = stale_out(tmp_path)
    assert run_main(inputs, out, shards=shards) == 2
    err = capsys.readouterr().err
    assert "no label" in err and str(shards / "val") in err
    assert not (out / "metrics.json").exists()


def test_main_writes_metrics(inputs, tmp_path, capsys):
    out = tmp_path / "results" / "evaluate"
    assert run_main(inputs, out) == 0
    printed = capsys.readouterr().out
    assert "kmeans_features" in printed
    assert "global mIoU per group" in printed and "area-0" in printed and "area-1" in printed
    # a line per method even without a terminal (pytest's capture is not one)
    tiles = json.loads((out / "metrics.json").read_text())["tiles"]
    for name in ("model", "teacher", "kmeans_rgb", "kmeans_features"):
        assert re.search(rf"^{name}: {tiles} images scored in \d+\.\d s$", printed, re.M), name
    assert json.loads((out / "metrics.json").read_text())["kmeans_rgb"]["global"]["miou"] == 1.0


def test_all_ignored_labels_exit_2(inputs, tmp_path, capsys):
    shards = write_dataset(tmp_path / "shards", n_tiles=2, label_fn=lambda i, lab: np.zeros_like(lab))
    assert run_main(inputs, tmp_path / "out", shards=shards) == 2
    assert "nothing to score" in capsys.readouterr().err


def test_label_above_num_classes_exits_2_naming_the_file(inputs, tmp_path, capsys):
    def bad(i, lab):
        if i == 1:
            lab = lab.copy()
            lab[0, 0] = 7
        return lab

    shards = write_dataset(tmp_path / "shards", n_tiles=2, label_fn=bad)
    out = stale_out(tmp_path)
    assert run_main(inputs, out, shards=shards) == 2
    err = capsys.readouterr().err
    assert "scene-0001_r000000_c000000.label.tif" in err and "7" in err and "num_classes" in err
    assert not (out / "metrics.json").exists()


def test_missing_teacher_exits_2(inputs, tmp_path, capsys):
    assert run_main(inputs, tmp_path / "out", teacher=tmp_path / "no_teacher") == 2
    assert str(tmp_path / "no_teacher") in capsys.readouterr().err


def test_k_above_max_k_exits_2(inputs, tmp_path, capsys):
    assert run_main(inputs, tmp_path / "out", evaluate_yaml="  k: 9\n") == 2
    assert "max_k" in capsys.readouterr().err


def test_empty_val_split_exits_2(inputs, tmp_path, capsys):
    shards = write_dataset(tmp_path / "shards", n_tiles=0)
    assert run_main(inputs, tmp_path / "out", shards=shards) == 2
    assert "no tiles" in capsys.readouterr().err  # nor any train tiles to segment without labels
