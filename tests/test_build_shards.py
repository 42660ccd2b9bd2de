"""build_shards: tiling, grouped stable splits, label alignment invariants, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import GRID, UTM, blocky_labels, random_rgb, tiny_raw, tree_digest, write_params, write_raster
from rasterio.windows import Window

from stages import build_shards as bs
from stages.build_shards import ShardsError, build_shards, group_key, labelled_split
from stages.datasets import TileDataset, read_index
from stages.params import ShardsParams, parse_params
from stages.rasterio_utils import RasterError, open_raster, read_label_aligned


def make_raw(root: Path, items: list[dict], num_classes: int = 4, dataset: str = "t") -> Path:
    """A data/raw folder by hand: items have item_id, rgb (3, H, W), optional label (H, W) and
    optional crs / transform / label_crs / label_transform."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    lines = []
    for it in items:
        image = write_raster(root / "images" / f"{it['item_id']}.tif", it["rgb"], crs=it.get("crs", UTM),
                             transform=it.get("transform", GRID), nodata=it.get("nodata"))
        label = None
        if it.get("label") is not None:
            label = write_raster(root / "labels" / f"{it['item_id']}.tif", it["label"],
                                 crs=it.get("label_crs", it.get("crs", UTM)),
                                 transform=it.get("label_transform", it.get("transform", GRID)))
        lines.append(json.dumps({"item_id": it["item_id"], "image": image.relative_to(root).as_posix(),
                                 "label": label.relative_to(root).as_posix() if label else None}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dataset.json").write_text(json.dumps({"dataset": dataset, "num_classes": num_classes,
                                                   "class_names": None, "rescale": RESCALE}))
    return root


RESCALE = {"mode": "auto", "limits": None}  # dataset.json's record of how ingest made the pixels 8-bit


def shards(tile=32, **kw) -> ShardsParams:
    return ShardsParams(tile_size=tile, **kw)


def all_records(root: Path):
    return [r for s in bs.SPLITS for r in read_index(root, s)]


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def test_split_ratio_follows_the_fraction():
    keys = [f"area-{i}" for i in range(4000)]
    for fraction in (0.25, 0.5):
        share = np.mean([labelled_split(k, fraction) == "metrics_train" for k in keys])
        assert abs(share - fraction) < 0.03
    assert all(labelled_split(k, 0.0) == "val" for k in keys[:50])
    assert all(labelled_split(k, 1.0) == "metrics_train" for k in keys[:50])


def test_adding_rasters_never_moves_existing_tiles(tmp_path):
    def item(i):
        return {"item_id": f"r{i:02d}", "rgb": random_rgb(64, 64, i), "label": blocky_labels(64, 64, 4, i)}

    make_raw(tmp_path / "raw1", [item(i) for i in range(8)])
    make_raw(tmp_path / "raw2", [item(i) for i in range(20)])
    build_shards(tmp_path / "raw1", tmp_path / "s1", "t", shards())
    summary = build_shards(tmp_path / "raw2", tmp_path / "s2", "t", shards())
    before = {r.item_id: r.split for r in all_records(tmp_path / "s1" / "t")}
    after = {r.item_id: r.split for r in all_records(tmp_path / "s2" / "t")}
    assert len(before) == 8 * 4 and len(after) == 20 * 4
    assert all(after[k] == v for k, v in before.items())
    assert summary["counts"]["metrics_train"] > 0 and summary["counts"]["val"] > 0


def test_groups_never_straddle_splits_and_unlabelled_go_to_train(tmp_path):
    items = [{"item_id": f"t{t}_image_part_{p:03d}", "rgb": random_rgb(48, 48, 10 * t + p),
              "label": blocky_labels(48, 48, 4, p)} for t in range(1, 9) for p in range(1, 4)]
    items.append({"item_id": "t9_image_part_001", "rgb": random_rgb(48, 48, 99)})  # unlabelled
    make_raw(tmp_path / "raw", items)
    summary = build_shards(tmp_path / "raw", tmp_path / "s", "t", shards(group_regex=r"t(\d+)_"))
    split_of_group = {}
    for r in all_records(tmp_path / "s" / "t"):
        g = group_key(r.source_item, r"t(\d+)_")
        assert r.group == g  # the index carries each tile's group
        assert split_of_group.setdefault(g, r.split) == r.split
    assert split_of_group["9"] == "train"
    assert {"metrics_train", "val"} <= set(split_of_group.values())
    assert sorted(summary["groups"]["metrics_train"] + summary["groups"]["val"]) == sorted(str(t) for t in range(1, 9))


def test_train_fraction_moves_whole_labelled_groups_to_train_without_labels(tmp_path):
    keys = [f"area-{i}" for i in range(2000)]
    base = {k: labelled_split(k, 0.25) for k in keys}
    moved = {k: labelled_split(k, 0.25, 0.4) for k in keys}
    assert abs(np.mean([v == "train" for v in moved.values()]) - 0.4) < 0.04
    # Groups not sent to train keep the split they had without train_fraction.
    assert all(moved[k] == base[k] for k in keys if moved[k] != "train")

    items = [{"item_id": f"t{t}_p{p}", "rgb": random_rgb(32, 32, 10 * t + p), "label": blocky_labels(32, 32, 3, p)}
             for t in range(12) for p in range(2)]
    make_raw(tmp_path / "raw", items)
    summary = build_shards(tmp_path / "raw", tmp_path / "s", "t", shards(group_regex=r"t(\d+)_", train_fraction=0.5))
    train = read_index(tmp_path / "s" / "t", "train")
    assert train and all(r.target is None and r.class_hist is None for r in train)
    assert summary["class_hist"]["train"] == {}
    assert set(summary["groups"]["train"]).isdisjoint(summary["groups"]["val"] + summary["groups"]["metrics_train"])


def test_group_regex_must_match_every_item(tmp_path):
    make_raw(tmp_path / "raw", [{"item_id": "odd_name", "rgb": random_rgb(32, 32), "label": blocky_labels(32, 32, 2)}])
    with pytest.raises(ShardsError, match="odd_name"):
        build_shards(tmp_path / "raw", tmp_path / "s", "t", shards(group_regex=r"t(\d+)_"))
    assert not (tmp_path / "s" / "t").exists()


# --------------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------------


def test_tiles_are_georeferenced_windows_and_labels_count_each_pixel_once(tmp_path):
    rgb, label = random_rgb(70, 100, 3), blocky_labels(70, 100, 4, 3)
    make_raw(tmp_path / "raw", [{"item_id": "a", "rgb": rgb, "label": label}])
    summary = build_shards(tmp_path / "raw", tmp_path / "s", "t", shards(tile=32))
    records = all_records(tmp_path / "s" / "t")
    # 100 px wide -> tiles at cols 0, 32, 64 and one shifted inward to 68; rows 0, 32, 38.
    assert sorted({r.window[0] for r in records}) == [0, 32, 64, 68]
    assert sorted({r.window[1] for r in records}) == [0, 32, 38]
    total = np.zeros(5, dtype=np.int64)
    for r in records:
        col, row, w, h = r.window
        with rasterio.open(r.input) as tile, rasterio.open(r.target) as lab:
            assert tile.crs == rasterio.crs.CRS.from_string(UTM)
            assert tile.transform == GRID @ Affine.translation(col, row)
            assert np.array_equal(tile.read(), rgb[:, row:row + h, col:col + w])  # no padding needed
            tile_label = lab.read(1)
        truth = label[row:row + h, col:col + w]
        kept = tile_label > 0
        assert np.array_equal(tile_label[kept], truth[kept])
        total += np.bincount(tile_label.ravel(), minlength=5)
        assert r.class_hist == {str(c): int(n) for c, n in enumerate(np.bincount(tile_label.ravel(), minlength=5)) if c and n}
    assert np.array_equal(total[1:], np.bincount(label.ravel(), minlength=5)[1:])
    split = records[0].split
    assert summary["class_hist"][split] == {str(c): int(n) for c, n in enumerate(total) if c and n}


def test_blank_and_nodata_tiles_are_dropped(tmp_path):
    rgb = random_rgb(64, 96, 5)
    rgb[:, :, 32:64] = 0      # a nodata (value 0) block: tiles in it are 100 % invalid
    rgb[:, :32, 64:] = 200    # one constant-colour tile: blank although valid
    make_raw(tmp_path / "raw", [{"item_id": "a", "rgb": rgb, "nodata": 0}])
    summary = build_shards(tmp_path / "raw", tmp_path / "s", "t", shards(tile=32, max_blank_fraction=0.25))
    kept = {(r.window[0], r.window[1]) for r in all_records(tmp_path / "s" / "t")}
    assert kept == {(0, 0), (0, 32), (64, 32)}
    assert summary["dropped_blank_tiles"] == 3


def test_small_raster_gives_one_padded_tile_with_a_mask(tmp_path):
    rgb, label = random_rgb(20, 24, 6), blocky_labels(20, 24, 3, 6)
    make_raw(tmp_path / "raw", [{"item_id": "a", "rgb": rgb, "label": label}])
    build_shards(tmp_path / "raw", tmp_path / "s", "t", shards(tile=32, max_blank_fraction=0.6))
    (r,) = all_records(tmp_path / "s" / "t")
    with rasterio.open(r.input) as tile:
        mask = tile.read_masks(1)
        assert tile.width == 32 and (mask[:20, :24] == 255).all() and (mask[20:] == 0).all() and (mask[:, 24:] == 0).all()
    item = TileDataset(tmp_path / "s" / "t", r.split)[0]
    assert np.array_equal(item["image"][:20, :24], rgb.transpose(1, 2, 0)) and (item["label"][20:] == 0).all()


# --------------------------------------------------------------------------------------------
# label alignment (GDAL warping, nearest neighbour)
# --------------------------------------------------------------------------------------------


def test_alignment_is_pixel_exact_when_already_aligned(tmp_path):
    label = blocky_labels(64, 64, 5, 1, block=1)  # every pixel independent: any shift would show
    img = write_raster(tmp_path / "img.tif", random_rgb(64, 64))
    lab = write_raster(tmp_path / "lab.tif", label)
    with open_raster(img) as i, open_raster(lab) as lab_src:
        for win in (Window(0, 0, 64, 64), Window(16, 8, 32, 32), Window(48, 48, 32, 32)):
            out = read_label_aligned(lab_src, i, win)
            r, c = int(win.row_off), int(win.col_off)
            expected = np.zeros((32 if win.width == 32 else 64,) * 2, dtype=np.uint8)
            part = label[r:r + int(win.height), c:c + int(win.width)]
            expected[:part.shape[0], :part.shape[1]] = part
            assert out.shape == (int(win.height), int(win.width)) and np.array_equal(out, expected)


def test_alignment_of_coarser_shifted_label(tmp_path):
    # Label at 2x the pixel size, starting 8 image pixels right and down: nearest neighbour must
    # give label[(r - 8) // 2, (c - 8) // 2] inside its extent and 0 (ignore) outside.
    label = blocky_labels(24, 24, 6, 2, block=1)
    img = write_raster(tmp_path / "img.tif", random_rgb(64, 64))
    coarse = Affine(1.0, 0.0, GRID.c + 4.0, 0.0, -1.0, GRID.f - 4.0)
    lab = write_raster(tmp_path / "lab.tif", label, transform=coarse)
    with open_raster(img) as i, open_raster(lab) as lab_src:
        out = read_label_aligned(lab_src, i, Window(0, 0, 64, 64))
    rr, cc = np.mgrid[0:64, 0:64]
    inside = (rr >= 8) & (cc >= 8) & (rr < 8 + 48) & (cc < 8 + 48)
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[inside] = label[(rr[inside] - 8) // 2, (cc[inside] - 8) // 2]
    assert np.array_equal(out, expected)


def test_alignment_across_crs_preserves_class_values(tmp_path):
    # The same labels stored in Web Mercator (EPSG:3857), reprojected by GDAL: the aligned label has
    # the image's shape and grid, only values that exist in the source, and mostly agrees with the
    # truth (disagreement only near block edges).
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    truth = blocky_labels(96, 96, 4, 3, block=16)
    rgb = random_rgb(96, 96, 3)
    bounds = rasterio.transform.array_bounds(96, 96, GRID)  # west, south, east, north
    dst_t, w, h = calculate_default_transform(UTM, "EPSG:3857", 96, 96, *bounds, resolution=0.4)
    merc = np.zeros((h, w), dtype=np.uint8)
    reproject(truth, merc, src_transform=GRID, src_crs=UTM, dst_transform=dst_t, dst_crs="EPSG:3857",
              resampling=Resampling.nearest, dst_nodata=0)
    # build_shards must align it to the image grid tile by tile.
    make_raw(tmp_path / "raw", [{"item_id": "a", "rgb": rgb, "label": merc, "label_crs": "EPSG:3857",
                                 "label_transform": dst_t}])
    build_shards(tmp_path / "raw", tmp_path / "s", "t", shards(tile=32))
    records = all_records(tmp_path / "s" / "t")
    assert len(records) == 9
    agree = total = 0
    for r in records:
        col, row, _, _ = r.window
        with rasterio.open(r.target) as lab:
            assert lab.shape == (32, 32) and lab.transform == GRID @ Affine.translation(col, row)
            out = lab.read(1)
        assert set(np.unique(out)) <= set(np.unique(truth)) | {0}
        ref = truth[row:row + 32, col:col + 32]
        agree += int(((out == ref) | (out == 0)).sum())
        total += out.size
    assert agree / total > 0.97


def test_label_without_crs_and_different_shape_is_an_error(tmp_path):
    img = write_raster(tmp_path / "img.tif", random_rgb(32, 32), crs=None, transform=None)
    lab = write_raster(tmp_path / "lab.tif", blocky_labels(30, 32, 2), crs=None, transform=None)
    with open_raster(img) as i, open_raster(lab) as lab_src:
        with pytest.raises(RasterError, match="lab.tif.*no CRS and the shapes differ"):
            read_label_aligned(lab_src, i, Window(0, 0, 32, 32))
        # Same shape without CRS: the pixel grid is the alignment.
    lab2 = write_raster(tmp_path / "lab2.tif", blocky_labels(32, 32, 2), crs=None, transform=None)
    with open_raster(img) as i, open_raster(lab2) as lab_src:
        assert np.array_equal(read_label_aligned(lab_src, i, Window(0, 0, 32, 32)), blocky_labels(32, 32, 2))


# --------------------------------------------------------------------------------------------
# determinism, atomic output, bad input
# --------------------------------------------------------------------------------------------


def test_byte_identical_and_summary(tmp_path, tiny_dataset):
    params = parse_params(tiny_raw())
    build_shards(tiny_dataset.parents[1] / "raw", tmp_path / "again", "synthetic", params.shards)
    assert tree_digest(tmp_path / "again" / "synthetic") == tree_digest(tiny_dataset)
    summary = json.loads((tiny_dataset / "summary.json").read_text())
    assert summary["num_classes"] == 6 and summary["class_names"]["5"] == "road"
    assert summary["counts"] == {s: len(read_index(tiny_dataset, s)) for s in bs.SPLITS}
    assert summary["counts"]["train"] == 4 and summary["counts"]["metrics_train"] + summary["counts"]["val"] == 12
    assert len(summary["params_hash"]) == 64
    # the synthetic scenes are 0.6 m UTM grids near the central meridian (scale factor 0.9996): the
    # runtime resamples other rasters to the train split's ground sample distance
    assert summary["pixel_size_m"] == {s: pytest.approx(0.6 / 0.9996, abs=2e-6) for s in bs.SPLITS}


def test_median_pixel_size_is_unknown_when_any_tile_is():
    assert bs.median_pixel_size([0.5, 0.6, 2.0]) == 0.6
    assert bs.median_pixel_size([0.5, None]) is None  # e.g. a plain JPEG among GeoTIFFs
    assert bs.median_pixel_size([]) is None


def test_failure_keeps_previous_output_and_siblings(tmp_path):
    make_raw(tmp_path / "raw", [{"item_id": "a", "rgb": random_rgb(32, 32), "label": blocky_labels(32, 32, 2)}])
    out = tmp_path / "shards"
    build_shards(tmp_path / "raw", out, "t", shards())
    (out / "other-dataset").mkdir()
    before = tree_digest(out)
    make_raw(tmp_path / "raw", [{"item_id": "a", "rgb": random_rgb(32, 32), "label": np.full((32, 32), 9, np.uint8)}])
    with pytest.raises(ShardsError, match=r"labels/a.tif: label values \[9\] exceed num_classes=4"):
        build_shards(tmp_path / "raw", out, "t", shards())
    assert tree_digest(out) == before and sorted(p.name for p in out.iterdir()) == ["other-dataset", "t"]


def test_main_errors_exit_2(tmp_path, capsys):
    params = write_params(tmp_path / "p.yaml", tiny_raw())
    assert bs.main(["--params", str(params), "--raw", str(tmp_path / "none"), "--out", str(tmp_path / "s")]) == 2
    assert "none/manifest.jsonl: missing" in capsys.readouterr().err
    make_raw(tmp_path / "raw", [{"item_id": "a", "rgb": random_rgb(32, 32)}], dataset="other")
    assert bs.main(["--params", str(params), "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "s")]) == 2
    assert "ingest.dataset" in capsys.readouterr().err
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "num_classes": 6}))
    assert bs.main(["--params", str(params), "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "s")]) == 2
    assert "dataset.json: lacks 'rescale' (written by an older ingest: rerun it)" in capsys.readouterr().err
    (tmp_path / "raw" / "images" / "a.tif").write_bytes(b"garbage")  # the manifest still points at it
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "num_classes": 6,
                                                               "rescale": RESCALE}))
    assert bs.main(["--params", str(params), "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "s")]) == 2
    assert "images/a.tif: GDAL cannot open" in capsys.readouterr().err
    assert not (tmp_path / "s" / "synthetic").exists()
