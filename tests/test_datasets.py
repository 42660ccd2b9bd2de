"""Shard reading: index validation (no escaping the root), TileDataset, RandomWindowBatches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import random_rgb, write_raster

from stages.datasets import (
    DatasetError,
    RandomWindowBatches,
    TileDataset,
    TileRecord,
    read_index,
    read_summary,
    split_sources,
    stable_subset,
)


def _copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    return root


def _rewrite_first(root: Path, split: str, **changes) -> None:
    index = root / split / "shard-00000" / "index.jsonl"
    lines = index.read_text().splitlines()
    entry = json.loads(lines[0])
    entry.update(changes)
    lines[0] = json.dumps(entry)
    index.write_text("\n".join(lines) + "\n")


def test_read_index_records(tiny_dataset):
    val = read_index(tiny_dataset, "val") + read_index(tiny_dataset, "metrics_train")
    train = read_index(tiny_dataset, "train")
    assert len(train) == 4 and len(val) == 12
    for r in train:
        assert r.target is None and r.class_hist is None and r.input.is_file() and r.input.is_absolute()
    for r in val:
        assert r.target.is_file() and sum(r.class_hist.values()) > 0
        assert r.item_id.startswith(r.source_item) and r.window[2:] == (64, 64)


@pytest.mark.parametrize("field, value", [
    ("input", "../../../../etc/passwd"),
    ("input", "/etc/passwd"),
    ("target", "../../../outside.label.tif"),
])
def test_paths_escaping_the_root_are_rejected(tiny_dataset, tmp_path, field, value):
    root = _copy(tiny_dataset, tmp_path)
    _rewrite_first(root, "val", **{field: value})
    with pytest.raises(DatasetError, match="rejected, not followed"):
        read_index(root, "val")


def test_symlink_escaping_the_root_is_rejected(tiny_dataset, tmp_path):
    root = _copy(tiny_dataset, tmp_path)
    outside = write_raster(tmp_path / "outside.tif", random_rgb(64, 64))
    (root / "train" / "shard-00000" / "evil.tif").symlink_to(outside)
    _rewrite_first(root, "train", input="evil.tif")
    with pytest.raises(DatasetError, match="outside the dataset root"):
        read_index(root, "train")


def test_malformed_index_and_missing_split(tiny_dataset, tmp_path):
    root = _copy(tiny_dataset, tmp_path)
    with pytest.raises(DatasetError, match="split 'test' not found"):
        read_index(root, "test")
    _rewrite_first(root, "val", window=[0, 0, 64])
    with pytest.raises(DatasetError, match=r"index.jsonl:1: window"):
        read_index(root, "val")
    (root / "train" / "shard-00000" / "index.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"index.jsonl:1: not valid JSON"):
        read_index(root, "train")


def test_tile_dataset_items(tiny_dataset):
    ds = TileDataset(tiny_dataset, "val", require_labels=True)
    item = ds[0]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (64, 64, 3)
    assert item["label"].dtype == np.uint8 and item["label"].shape == (64, 64)
    assert item["item_id"] == ds.records[0].item_id
    counts = np.bincount(item["label"].ravel(), minlength=7)
    assert {str(c): int(n) for c, n in enumerate(counts) if c and n} == ds.records[0].class_hist
    assert TileDataset(tiny_dataset, "train")[0]["label"] is None
    with pytest.raises(DatasetError, match="without labels"):
        TileDataset(tiny_dataset, "train", require_labels=True)


def _records(ids) -> list[TileRecord]:
    return [TileRecord(i, "val", Path(f"/d/{i}.tif"), None, "src", "g", (0, 0, 4, 4), None) for i in ids]


def test_stable_subset_is_capped_nested_ordered_and_independent_of_order():
    ids = [f"scene{s}_r{r:06d}_c000000" for s in range(5) for r in range(0, 2560, 256)]  # 50 tiles
    records = _records(ids)
    assert stable_subset(records, 0) == records and stable_subset(records, 50) == records
    assert stable_subset(records, 500) == records
    chosen = {n: [r.item_id for r in stable_subset(records, n)] for n in (1, 10, 11, 30)}
    for n, kept in chosen.items():
        assert len(kept) == n
        assert kept == [i for i in ids if i in kept]  # index order kept
    assert set(chosen[10]) < set(chosen[11]) < set(chosen[30])  # raising the cap only adds tiles
    # the choice depends on the ids alone, not on where they sit in the index
    assert {r.item_id for r in stable_subset(records[::-1], 10)} == set(chosen[10])
    assert len({i.split("_")[0] for i in chosen[30]}) == 5  # spread over the source scenes
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(DatasetError, match="max_tiles"):
            stable_subset(records, bad)


def test_tile_dataset_max_tiles(tiny_dataset):
    full = TileDataset(tiny_dataset, "val", require_labels=True)
    capped = TileDataset(tiny_dataset, "val", require_labels=True, max_tiles=2)
    assert len(full) > 2 and len(capped) == 2 and capped.split_tiles == len(full) == full.split_tiles
    assert capped.records == stable_subset(full.records, 2)
    with pytest.raises(DatasetError, match="without labels"):  # the whole split is checked, not the subset
        TileDataset(tiny_dataset, "train", require_labels=True, max_tiles=1)


def test_random_windows_are_a_pure_function_of_seed_and_step(tiny_dataset):
    sources = split_sources(tiny_dataset, "train")
    a = RandomWindowBatches(sources, [16, 24, 32], batch_size=5, seed=3)
    b = RandomWindowBatches(sources, [16, 24, 32], batch_size=5, seed=3)
    for step in (0, 1, 2, 7):
        x, s = a.batch(step)
        assert s == [16, 24, 32][step % 3] and x.shape == (5, s, s, 3) and x.dtype == np.uint8
        assert np.array_equal(x, b.batch(step)[0])
    # Resuming at step 7 replays exactly what an uninterrupted run draws there.
    it = b.iter_from(7)
    assert np.array_equal(next(it)[0], a.batch(7)[0]) and np.array_equal(next(it)[0], a.batch(8)[0])
    assert not np.array_equal(a.batch(7)[0], RandomWindowBatches(sources, [16, 24, 32], 5, seed=4).batch(7)[0])
    # Streaming from disk gives the same windows as the in-memory cache.
    disk = RandomWindowBatches(sources, [16, 24, 32], batch_size=5, seed=3, in_memory=False)
    assert np.array_equal(disk.batch(4)[0], a.batch(4)[0])


def test_windows_are_crops_of_the_sources_and_sizes_uniform(tmp_path):
    # Two rasters whose pixels encode their own coordinates: every window must be a real crop.
    def coded(h, w, tag):
        r, c = np.mgrid[0:h, 0:w]
        return np.stack([r % 256, c % 256, np.full((h, w), tag)]).astype(np.uint8)

    srcs = [write_raster(tmp_path / "a.tif", coded(80, 120, 1)), write_raster(tmp_path / "b.tif", coded(50, 50, 2))]
    batches = RandomWindowBatches(srcs, [20, 60], batch_size=16, seed=0, sampling="uniform")
    sizes = set()
    for step in range(20):
        x, s = batches.batch(step)
        sizes.add(s)
        for win in x:
            tag = win[0, 0, 2]
            assert (win[..., 2] == tag).all()
            r0, c0 = int(win[0, 0, 0]), int(win[0, 0, 1])
            assert np.array_equal(win[..., 0], (r0 + np.arange(s))[:, None].repeat(s, 1) % 256)
            assert np.array_equal(win[..., 1], (c0 + np.arange(s))[None, :].repeat(s, 0) % 256)
            if s == 60:
                assert tag == 1  # b.tif (50 x 50) cannot hold a 60 px window
    assert sizes == {20, 60}


def test_padded_tiles_never_yield_padding(tmp_path):
    # A tile padded at a raster edge (mask) only serves windows inside its valid part.
    from stages.rasterio_utils import write_geotiff
    rgb = np.zeros((3, 64, 64), dtype=np.uint8)
    rgb[:, :40, :48] = random_rgb(40, 48, 1) | 1
    mask = np.zeros((64, 64), dtype=bool)
    mask[:40, :48] = True
    write_geotiff(tmp_path / "t.tif", rgb, crs=None, transform=None, mask=mask)
    x, s = RandomWindowBatches([tmp_path / "t.tif"], [32], batch_size=64, seed=0).batch(0)
    assert (x > 0).all()
    with pytest.raises(DatasetError, match="no source has a valid 48x48 window"):
        RandomWindowBatches([tmp_path / "t.tif"], [48], batch_size=1, seed=0)


def test_bad_sources(tmp_path):
    with pytest.raises(DatasetError, match="no sources"):
        RandomWindowBatches([], [16], 1, 0)
    grey = write_raster(tmp_path / "grey.tif", random_rgb(32, 32)[:1])
    with pytest.raises(DatasetError, match="grey.tif: expected a 3-band uint8"):
        RandomWindowBatches([grey], [16], 1, 0)
    with pytest.raises(DatasetError, match="sampling"):
        RandomWindowBatches([grey], [16], 1, 0, sampling="random")


GOOD_SUMMARY = {"num_classes": 5, "counts": {"train": 3, "val": 2}, "pixel_size_m": {"train": 0.3},
                "input_rescale": {"mode": "none", "limits": None}}


@pytest.mark.parametrize("change, drop, expected", [
    ({"num_classes": -1}, None, "expected an integer num_classes >= 0, got -1"),
    ({"num_classes": True}, None, "expected an integer num_classes >= 0, got True"),
    ({"counts": {"train": "3"}}, None, "expected 'counts'"),
    ({"counts": None}, None, "expected 'counts'"),
    ({}, "input_rescale", "missing key 'input_rescale'"),
])
def test_read_summary_names_the_file_and_the_key(tmp_path, change, drop, expected):
    summary = {k: v for k, v in {**GOOD_SUMMARY, **change}.items() if k != drop}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DatasetError, match="summary.json") as err:
        read_summary(tmp_path)
    assert expected in str(err.value)


def test_read_summary_missing_or_invalid_file(tmp_path):
    with pytest.raises(DatasetError, match="shard summary not found"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps(GOOD_SUMMARY))
    assert read_summary(tmp_path) == GOOD_SUMMARY
