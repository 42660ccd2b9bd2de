"""The ingest stage: synthetic and local providers, manifest, determinism, every bad input."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import REPO, blocky_labels, random_rgb, tiny_raw, tree_digest, write_params, write_raster

from stages import ingest as ingest_stage
from stages.ingest import IngestError, NoCRSWarning, ingest
from stages.params import ParamsError, parse_params
from stages.rasterio_utils import sha256_file

DUBAI = REPO.parent / "shared" / "datasets" / "dubai"


def _local(tmp_path, **local):
    raw = tiny_raw(**{"ingest.provider": "local", "ingest.dataset": "mine",
                      **{f"ingest.local.{k}": v for k, v in local.items()}})
    return parse_params(raw).ingest


def _run_main(tmp_path, raw, capsys):
    params = write_params(tmp_path / "params.yaml", raw)
    out = tmp_path / "out" / "raw"
    rc = ingest_stage.main(["--params", str(params), "--out", str(out)])
    return rc, capsys.readouterr().err, out


def _no_leftovers(out: Path):
    """Nothing half-written: no output folder and no temporary sibling."""
    assert not out.exists()
    leftovers = list(out.parent.glob(".*tmp*")) if out.parent.exists() else []
    assert leftovers == []


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


def test_synthetic_manifest_and_rasters(tmp_path, tiny_params):
    entries = ingest(tiny_params.ingest, tmp_path / "raw")
    root = tmp_path / "raw"
    assert [e["item_id"] for e in entries] == [f"scene-{i:04d}" for i in range(4)]
    assert sum(e["has_label"] for e in entries) == 3  # round(4 * 0.75)
    info = json.loads((root / "dataset.json").read_text())
    assert info["num_classes"] == 6 and info["class_names"]["1"] == "water" and info["class_names"]["6"] == "building"
    lines = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert lines == entries
    for e in entries:
        assert set(e) >= {"item_id", "image", "label", "crs", "transform", "width", "height", "bands",
                          "sha256", "has_label", "source"}
        assert e["sha256"] == sha256_file(root / e["image"])
        with rasterio.open(root / e["image"]) as src:
            assert (src.count, src.dtypes[0], src.width, src.height) == (3, "uint8", 128, 128)
            assert src.crs.to_string() == "EPSG:32611" and src.res == (0.6, 0.6)
            assert src.block_shapes[0] == (128, 128) and src.compression.name.lower() == "deflate"
            assert list(src.transform)[:6] == e["transform"]
        if e["has_label"]:
            with rasterio.open(root / e["label"]) as lab:
                values = lab.read(1)
                assert lab.transform == src.transform and values.min() >= 1 and values.max() <= 6


def test_synthetic_ingest_is_byte_identical(tmp_path, tiny_params):
    ingest(tiny_params.ingest, tmp_path / "a")
    ingest(tiny_params.ingest, tmp_path / "b")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    other = parse_params(tiny_raw(**{"ingest.seed": 1})).ingest
    ingest(other, tmp_path / "c")
    assert tree_digest(tmp_path / "c") != tree_digest(tmp_path / "a")


def test_rerun_replaces_output_atomically(tmp_path, tiny_params):
    out = tmp_path / "raw"
    ingest(tiny_params.ingest, out)
    (out / "stale.txt").write_text("from an older run")
    ingest(tiny_params.ingest, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


# --------------------------------------------------------------------------------------------
# local
# --------------------------------------------------------------------------------------------


def test_local_plain_images_without_crs_pair_by_stem(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    write_raster(imgs / "a_1.png", random_rgb(40, 50, 1), crs=None, transform=None, driver="PNG")
    write_raster(imgs / "b_2.jpg", random_rgb(30, 20, 2), crs=None, transform=None, driver="JPEG")
    write_raster(labs / "a_1.png", blocky_labels(40, 50, 5), crs=None, transform=None, driver="PNG")
    (imgs / "notes.txt").write_text("not a raster; ignored by suffix")
    with pytest.warns(NoCRSWarning, match="2 raster"):
        entries = ingest(_local(tmp_path, path=str(imgs), labels=str(labs)), tmp_path / "raw")
    by_id = {e["item_id"]: e for e in entries}
    assert set(by_id) == {"a_1", "b_2"}
    assert by_id["a_1"]["has_label"] and not by_id["b_2"]["has_label"]
    assert by_id["a_1"]["crs"] is None
    with rasterio.open(tmp_path / "raw" / by_id["a_1"]["image"]) as src:
        with rasterio.open(imgs / "a_1.png") as orig:
            assert np.array_equal(src.read(), orig.read())  # PNG is lossless: pixel-exact copy
    with rasterio.open(tmp_path / "raw" / by_id["a_1"]["label"]) as lab:
        assert np.array_equal(lab.read(1), blocky_labels(40, 50, 5))
    info = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert info["num_classes"] == 5 and info["class_names"] is None
    assert info["rescale"] == {"mode": "auto", "limits": None}


def test_declared_pixel_size_of_rasters_without_crs_reaches_the_shards(tmp_path, capsys):
    from stages.build_shards import build_shards
    from stages.params import ShardsParams

    imgs = tmp_path / "images"
    for i in range(3):
        write_raster(imgs / f"p{i}.png", random_rgb(64, 64, i), crs=None, transform=None, driver="PNG")
    with pytest.warns(NoCRSWarning, match=r"at the declared 0.3 m per pixel"):
        entries = ingest(_local(tmp_path, path=str(imgs), pixel_size_m=0.3), tmp_path / "raw")
    assert [e["pixel_size_m"] for e in entries] == [0.3] * 3
    summary = build_shards(tmp_path / "raw", tmp_path / "shards", "mine", ShardsParams(tile_size=32))
    assert summary["pixel_size_m"]["train"] == 0.3  # what export records as the training pixel size
    # without the declaration the size stays unknown
    with pytest.warns(NoCRSWarning, match="unknown ground pixel size"):
        entries = ingest(_local(tmp_path, path=str(imgs)), tmp_path / "raw")
    assert [e["pixel_size_m"] for e in entries] == [None] * 3
    # a raster with a CRS measures itself: declaring a size for it is an error
    write_raster(tmp_path / "geo" / "g.tif", random_rgb(16, 16))
    err = _bad_local(tmp_path, capsys, path=str(tmp_path / "geo"), pixel_size_m=0.3)
    assert "g.tif: has a CRS" in err and "ingest.local.pixel_size_m" in err


def test_local_regex_pairing_label_map_and_band_selection(tmp_path):
    imgs, labs = tmp_path / "img", tmp_path / "lab"
    naip = np.random.default_rng(0).integers(0, 256, (4, 32, 48), dtype=np.uint8)  # R, G, B, NIR
    write_raster(imgs / "naip_tile7.tif", naip)
    raw_labels = np.where(blocky_labels(32, 48, 3) == 1, 10, np.where(blocky_labels(32, 48, 3) == 2, 20, 255))
    write_raster(labs / "mask-tile7.tif", raw_labels.astype(np.uint8))
    params = _local(tmp_path, path=str(imgs / "*.tif"), labels=str(labs), label_regex=r"(tile\d+)",
                    label_map={10: 1, 20: 2, 255: 0}, bands=[3, 2, 1])
    (entry,) = ingest(params, tmp_path / "raw")
    with rasterio.open(tmp_path / "raw" / entry["image"]) as src:
        assert np.array_equal(src.read(), naip[[2, 1, 0]])
        assert src.crs.to_string() == "EPSG:32611"
    with rasterio.open(tmp_path / "raw" / entry["label"]) as lab:
        expected = np.select([raw_labels == 10, raw_labels == 20], [1, 2], 0)
        assert np.array_equal(lab.read(1), expected)


def test_source_nodata_is_kept_as_a_mask(tmp_path):
    rgb = random_rgb(40, 40, 3) | 1
    rgb[:, :, :10] = 0
    write_raster(tmp_path / "in" / "a.tif", rgb, nodata=0)
    (entry,) = ingest(_local(tmp_path, path=str(tmp_path / "in")), tmp_path / "raw")
    with rasterio.open(tmp_path / "raw" / entry["image"]) as src:
        mask = src.dataset_mask()
        assert np.array_equal(src.read(), rgb)
        assert (mask[:, :10] == 0).all() and (mask[:, 10:] == 255).all()


def test_label_nodata_becomes_ignore_before_the_map(tmp_path):
    write_raster(tmp_path / "in" / "a.tif", random_rgb(16, 16))
    raw = blocky_labels(16, 16, 2, block=4)
    raw[:4] = 255
    write_raster(tmp_path / "lab" / "a.tif", raw, nodata=255)
    (entry,) = ingest(_local(tmp_path, path=str(tmp_path / "in"), labels=str(tmp_path / "lab"),
                             label_map={1: 3, 2: 4}), tmp_path / "raw")
    with rasterio.open(tmp_path / "raw" / entry["label"]) as lab:
        assert np.array_equal(lab.read(1), np.select([raw == 1, raw == 2], [3, 4], 0))


def test_local_glob_with_unpaired_labels_warns(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    for stem in ("x1", "x2"):
        write_raster(imgs / f"{stem}.tif", random_rgb(16, 16))
        write_raster(labs / f"{stem}.tif", blocky_labels(16, 16, 2))
    with pytest.warns(ingest_stage.UnpairedLabelWarning):
        entries = ingest(_local(tmp_path, path=str(imgs / "x1.*"), labels=str(labs)), tmp_path / "raw")
    assert [e["item_id"] for e in entries] == ["x1"] and entries[0]["has_label"]


@pytest.mark.skipif(not DUBAI.is_dir(), reason="../shared/datasets/dubai is not present on this machine")
def test_local_ingests_dubai_as_it_is(tmp_path):
    params = _local(tmp_path, path=str(DUBAI / "images" / "t8_image_part_00[12].jpg"),
                    labels=str(DUBAI / "labels"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = ingest(params, tmp_path / "raw")
    assert any(issubclass(w.category, NoCRSWarning) for w in caught)
    assert [e["item_id"] for e in entries] == ["t8_image_part_001", "t8_image_part_002"]
    for e in entries:
        assert e["has_label"] and e["crs"] is None
        with rasterio.open(tmp_path / "raw" / e["image"]) as img, \
                rasterio.open(tmp_path / "raw" / e["label"]) as lab:
            assert (img.count, lab.count) == (3, 1) and (img.width, img.height) == (lab.width, lab.height)
            assert lab.read(1).max() <= 5


# --------------------------------------------------------------------------------------------
# bad input: clear message naming the file or key, exit code 2, nothing half-written
# --------------------------------------------------------------------------------------------


def _bad_local(tmp_path, capsys, **local):
    raw = tiny_raw(**{"ingest.provider": "local", **{f"ingest.local.{k}": v for k, v in local.items()}})
    rc, err, out = _run_main(tmp_path, raw, capsys)
    assert rc == 2 and "error: " in err
    _no_leftovers(out)
    return err


def test_missing_folder(tmp_path, capsys):
    err = _bad_local(tmp_path, capsys, path=str(tmp_path / "nowhere"))
    assert "nowhere" in err and "no such file or folder" in err


def test_empty_folder_and_empty_glob(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no raster" in _bad_local(tmp_path, capsys, path=str(tmp_path / "empty"))
    assert "matches no file" in _bad_local(tmp_path, capsys, path=str(tmp_path / "empty" / "*.tif"))
    assert "ingest.local.path: empty" in _bad_local(tmp_path, capsys, path="")


def test_file_gdal_cannot_open(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.tif").write_bytes(b"this is not a tiff" * 10)
    err = _bad_local(tmp_path, capsys, path=str(tmp_path / "in"))
    assert "junk.tif" in err and "cannot open" in err


@pytest.mark.parametrize("driver, suffix", [("GTiff", ".tif"), ("JPEG", ".jpg")])
def test_truncated_file(tmp_path, capsys, driver, suffix):
    path = tmp_path / "in" / f"cut{suffix}"
    extra = {"compress": "deflate"} if driver == "GTiff" else {}
    write_raster(path, random_rgb(256, 256), crs=None if driver == "JPEG" else "EPSG:32611",
                 transform=None if driver == "JPEG" else None, driver=driver, **extra)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _bad_local(tmp_path, capsys, path=str(path.parent))
    assert "cut" + suffix in err


@pytest.mark.parametrize("bands", [1, 2])
def test_one_or_two_band_raster(tmp_path, capsys, bands):
    write_raster(tmp_path / "in" / "grey.tif", random_rgb(16, 16)[:bands])
    err = _bad_local(tmp_path, capsys, path=str(tmp_path / "in"))
    assert "grey.tif" in err and f"found {bands} band(s)" in err


def test_non_uint8_raster_refused_with_rescale_none(tmp_path, capsys):
    write_raster(tmp_path / "in" / "deep.tif", random_rgb(16, 16).astype(np.uint16) * 200)
    raw = tiny_raw(**{"ingest.provider": "local", "ingest.rescale": "none",
                      "ingest.local.path": str(tmp_path / "in")})
    rc, err, out = _run_main(tmp_path, raw, capsys)
    assert rc == 2 and "deep.tif" in err and "rescale='none' needs 8-bit" in err
    _no_leftovers(out)


def test_16_bit_and_float_rasters_are_stretched_like_the_runtime(tmp_path):
    from runtime.rescale import percentile_limits, to_uint8

    rgb = random_rgb(40, 48)  # (3, H, W) uint8
    dn = rgb.astype(np.uint16) * 16 + 100
    refl = rgb.astype(np.float32) / 300.0
    refl[:, 5:9, 10:20] = np.nan
    write_raster(tmp_path / "in" / "a16.tif", dn)
    write_raster(tmp_path / "in" / "b8.tif", rgb)
    write_raster(tmp_path / "in" / "cf.tif", refl)
    entries = ingest(_local(tmp_path, path=str(tmp_path / "in")), tmp_path / "raw")
    by_id = {e["item_id"]: e for e in entries}
    expected = percentile_limits(dn.transpose(1, 2, 0))
    np.testing.assert_allclose(by_id["a16"]["rescale"], expected)
    assert by_id["b8"]["rescale"] is None
    with rasterio.open(tmp_path / "raw" / by_id["a16"]["image"]) as ds:
        assert ds.dtypes[0] == "uint8"
        np.testing.assert_array_equal(ds.read(), to_uint8(dn.transpose(1, 2, 0), expected).transpose(2, 0, 1))
    with rasterio.open(tmp_path / "raw" / by_id["b8"]["image"]) as ds:
        np.testing.assert_array_equal(ds.read(), rgb)  # 8-bit kept as it is
    with rasterio.open(tmp_path / "raw" / by_id["cf"]["image"]) as ds:
        valid = ds.read_masks(1) > 0
        assert not valid[5:9, 10:20].any() and valid.sum() == 40 * 48 - 4 * 10  # NaN -> nodata


def test_fixed_rescale_limits_map_every_raster_the_same_way(tmp_path):
    rgb = random_rgb(24, 32)
    write_raster(tmp_path / "in" / "a16.tif", rgb.astype(np.uint16) * 16 + 100)
    write_raster(tmp_path / "in" / "b16.tif", rgb[:, :, ::-1].astype(np.uint16) * 16 + 100)
    for limits in ([100, 4180], [100, 4180, 100, 4180, 100, 4180]):
        params = parse_params(tiny_raw(**{"ingest.provider": "local", "ingest.dataset": "mine",
                                          "ingest.rescale": "fixed", "ingest.rescale_limits": limits,
                                          "ingest.local.path": str(tmp_path / "in")})).ingest
        entries = ingest(params, tmp_path / "raw")
        assert [e["rescale"] for e in entries] == [[[100.0, 4180.0]] * 3] * 2
        info = json.loads((tmp_path / "raw" / "dataset.json").read_text())
        assert info["rescale"] == {"mode": "fixed", "limits": [[100, 4180]] * 3}
        with rasterio.open(tmp_path / "raw" / entries[0]["image"]) as ds:
            np.testing.assert_array_equal(ds.read(), rgb)  # (v * 16 + 100 - 100) * 255 / 4080 = v


@pytest.mark.parametrize("rescale, limits, message", [
    ("fixed", [], "rescale: fixed needs [low, high]"),
    ("fixed", [5, 5], "low < high"),
    ("fixed", [0, 1, 2], "three (low, high) pairs"),
    ("auto", [0, 4095], "only read with rescale: fixed"),
])
def test_rescale_limits_are_validated(rescale, limits, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(tiny_raw(**{"ingest.rescale": rescale, "ingest.rescale_limits": limits}))


def test_band_index_beyond_raster(tmp_path, capsys):
    write_raster(tmp_path / "in" / "rgb.tif", random_rgb(16, 16))
    err = _bad_local(tmp_path, capsys, path=str(tmp_path / "in"), bands=[2, 3, 4])
    assert "rgb.tif" in err and "ingest.local.bands" in err


def test_label_without_crs_and_different_shape(tmp_path, capsys):
    write_raster(tmp_path / "in" / "a.png", random_rgb(32, 32), crs=None, transform=None, driver="PNG")
    write_raster(tmp_path / "lab" / "a.png", blocky_labels(30, 32, 3), crs=None, transform=None, driver="PNG")
    err = _bad_local(tmp_path, capsys, path=str(tmp_path / "in"), labels=str(tmp_path / "lab"))
    assert "lab/a.png" in err and "cannot align" in err and "no CRS" in err


def test_label_values_outside_the_map(tmp_path, capsys):
    write_raster(tmp_path / "in" / "a.tif", random_rgb(16, 16))
    write_raster(tmp_path / "lab" / "a.tif", np.full((16, 16), 7, dtype=np.uint8))
    err = _bad_local(tmp_path, capsys, path=str(tmp_path / "in"), labels=str(tmp_path / "lab"),
                     label_map={1: 1, 2: 2})
    assert "lab/a.tif" in err and "[7]" in err and "label_map" in err


def test_params_errors_exit_2(tmp_path, capsys):
    rc, err, out = _run_main(tmp_path, tiny_raw(**{"ingest.synthetic.scene_size": "big"}), capsys)
    assert rc == 2 and "ingest.synthetic.scene_size" in err
    rc, err, out = _run_main(tmp_path, tiny_raw(**{"ingest.colour": 1}), capsys)
    assert rc == 2 and "ingest.colour" in err
    _no_leftovers(out)


@pytest.mark.parametrize("crs, expected", [("EPSG:4326", "expected a projected CRS"), ("EPSG:99999999", "not a CRS")])
def test_synthetic_crs_must_be_projected(tmp_path, capsys, crs, expected):
    rc, err, out = _run_main(tmp_path, tiny_raw(**{"ingest.synthetic.crs": crs}), capsys)
    assert rc == 2 and "ingest.synthetic.crs" in err and expected in err
    _no_leftovers(out)


def test_failed_run_keeps_previous_output(tmp_path, tiny_params):
    out = tmp_path / "raw"
    ingest(tiny_params.ingest, out)
    before = tree_digest(out)
    with pytest.raises(IngestError):
        ingest(_local(tmp_path, path=str(tmp_path / "missing")), out)
    write_raster(tmp_path / "in" / "grey.tif", random_rgb(8, 8)[:1])
    with pytest.raises(IngestError):
        ingest(_local(tmp_path, path=str(tmp_path / "in")), out)
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "raw"]
