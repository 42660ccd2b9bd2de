"""segment_raster: seamless tiling, nodata, georeferencing, output format, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from runtime_fixtures import random_encoder, synthetic_rgb, write_encoder_artifact, write_raster

from runtime import fit_shared_centres, segment_raster
from runtime.errors import Cancelled, InputError, OutputExistsError, RasterReadError
from runtime.model import load_model
from runtime.raster import NODATA

K = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=7)
    centres = np.eye(K, 8, dtype=np.float32)
    return write_encoder_artifact(tmp_path_factory.mktemp("model") / "best", enc, centres={K: centres})


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def rgb():
    img = synthetic_rgb(203, 178, seed=3)  # neither side a multiple of 4 or of the tile
    img[:13, :21] = 0  # a nodata corner
    img[120:126, 60:90] = 0  # and a nodata strip inside a tile
    return img


@pytest.fixture(scope="module")
def src(tmp_path_factory, rgb):
    return write_raster(tmp_path_factory.mktemp("src") / "rgb.tif", rgb, nodata=0)


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile, ds


def test_tiled_equals_untiled_exactly(tmp_path, src, model):
    whole = segment_raster(src, tmp_path / "whole.tif", K, model, tile=1024)
    tiled = segment_raster(src, tmp_path / "tiled.tif", K, model, tile=32)
    odd = segment_raster(src, tmp_path / "odd.tif", K, model, tile=52)
    assert whole.tiles == 1 and tiled.tiles == 7 * 6 and odd.tiles == 4 * 4
    np.testing.assert_array_equal(whole.centres, tiled.centres)
    a, b, c = (_read(tmp_path / f"{n}.tif")[0] for n in ("whole", "tiled", "odd"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert len(np.unique(a[a != NODATA])) >= 2
    # density-balanced centres (`balance`) are fitted once per raster too: tiled still equals untiled
    bal_whole = segment_raster(src, tmp_path / "bw.tif", K, model, tile=1024, balance=16)
    bal_tiled = segment_raster(src, tmp_path / "bt.tif", K, model, tile=32, balance=16)
    np.testing.assert_array_equal(bal_whole.centres, bal_tiled.centres)
    assert not np.array_equal(bal_whole.centres, whole.centres)
    np.testing.assert_array_equal(_read(tmp_path / "bw.tif")[0], _read(tmp_path / "bt.tif")[0])


def test_tiled_equals_untiled_with_a_deep_encoder(tmp_path, src):
    # a deeper encoder has a larger receptive field: the halo must grow with it
    enc = random_encoder(width=16, depth=6, embed_dim=8, seed=9)
    model = load_model(write_encoder_artifact(tmp_path / "m", enc))
    assert model.meta["receptive_field"] == enc.receptive_field == 7 + 6 * 16  # 16 px per block
    whole = segment_raster(src, tmp_path / "whole.tif", K, model, tile=1024)
    tiled = segment_raster(src, tmp_path / "tiled.tif", K, model, tile=32)
    np.testing.assert_array_equal(_read(tmp_path / "whole.tif")[0], _read(tmp_path / "tiled.tif")[0])
    assert whole.tiles == 1 and tiled.tiles > 1


def test_tiled_equals_untiled_with_colour_guided_smoothing_and_labels(tmp_path, src):
    # the smoothing and label weights come from each cell's own pixels and each pixel's colour: a
    # tile's halo gives them exactly
    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=7)
    guided = load_model(write_encoder_artifact(tmp_path / "g", enc, smooth_iters=4, smooth_colour_sigma=0.1,
                                              smooth_colour_floor=0.3, label_colour_sigma=0.05))
    plain = load_model(write_encoder_artifact(tmp_path / "p", enc, smooth_iters=4))
    results = {}
    for name, model, tile in (("whole", guided, 1024), ("tiled", guided, 32), ("odd", guided, 52),
                              ("plain", plain, 1024)):
        res = segment_raster(src, tmp_path / f"{name}.tif", K, model, tile=tile)
        results[name] = (res, _read(tmp_path / f"{name}.tif")[0])
    np.testing.assert_array_equal(results["whole"][1], results["tiled"][1])
    np.testing.assert_array_equal(results["whole"][1], results["odd"][1])
    np.testing.assert_array_equal(results["whole"][0].centres, results["plain"][0].centres)
    assert not np.array_equal(results["whole"][1], results["plain"][1])  # the guidance changes the map


def test_raster_labels_equal_array_prediction_with_the_same_centres(tmp_path, rgb):
    # without nodata the raster path is exactly the array path
    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=7)
    clean = synthetic_rgb(90, 70, seed=4)
    path = write_raster(tmp_path / "clean.tif", clean)
    model = load_model(write_encoder_artifact(tmp_path / "m", enc))
    res = segment_raster(path, tmp_path / "out.tif", K, model, tile=32)
    expected = model.predict_labels(clean, K, centres=res.centres)
    np.testing.assert_array_equal(_read(tmp_path / "out.tif")[0], expected)


def test_nodata_georeferencing_and_format_are_kept(tmp_path, src, rgb, model):
    res = segment_raster(src, tmp_path / "out.tif", K, model, tile=64, overviews=True)
    labels, profile, _ = _read(tmp_path / "out.tif")
    nodata = (rgb == 0).all(axis=2)
    assert (labels[nodata] == NODATA).all()
    assert (labels[~nodata] < K).all()
    # the pixel count of every cluster is what the file holds (tag and result)
    np.testing.assert_array_equal(res.cluster_pixels, np.bincount(labels[~nodata], minlength=K))
    assert res.nodata_pixels == nodata.sum() > 0
    with rasterio.open(src) as s, rasterio.open(tmp_path / "out.tif") as o:
        assert o.crs == s.crs and o.transform == s.transform
        assert (o.width, o.height, o.count, o.dtypes[0]) == (s.width, s.height, 1, "uint8")
        assert o.nodata == NODATA
        assert o.profile["tiled"] and o.compression.name.lower() == "deflate"
        assert o.overviews(1) == [2]
        cmap = o.colormap(1)
        assert len({cmap[i] for i in range(K)}) == K and cmap[NODATA][3] == 0
        assert o.tags()["landseg_k"] == str(K)
        assert json.loads(o.tags()["landseg_cluster_pixels"]) == res.cluster_pixels.tolist()


def test_masks_are_read_only_where_gdal_reports_nodata(tmp_path, rgb, model, monkeypatch):
    from runtime import io_rasterio

    plain = write_raster(tmp_path / "plain.tif", rgb)
    with_nodata = write_raster(tmp_path / "nodata.tif", rgb, nodata=0)
    with io_rasterio.open_source(plain) as a, io_rasterio.open_source(with_nodata) as b:
        assert a.all_valid([1, 2, 3]) and not b.all_valid([1, 2, 3])
    read_masks = io_rasterio.Source.read_masks
    calls = []
    monkeypatch.setattr(io_rasterio.Source, "read_masks", lambda self, *a: calls.append(a) or read_masks(self, *a))
    with monkeypatch.context() as m:
        m.setattr(io_rasterio.Source, "all_valid", lambda self, bands: False)
        segment_raster(plain, tmp_path / "read.tif", K, model, tile=64)
    assert calls
    calls.clear()
    segment_raster(plain, tmp_path / "skipped.tif", K, model, tile=64)
    assert calls == []  # an all-valid raster's masks are all 255: not read
    np.testing.assert_array_equal(_read(tmp_path / "skipped.tif")[0], _read(tmp_path / "read.tif")[0])
    segment_raster(with_nodata, tmp_path / "masked.tif", K, model, tile=64)
    assert calls  # a nodata value makes masks that are read


def test_artifact_and_given_centres(tmp_path, src, model):
    res = segment_raster(src, tmp_path / "a.tif", K, model, centres="artifact")
    np.testing.assert_array_equal(res.centres, model.artifact_centres(K))
    given = segment_raster(src, tmp_path / "b.tif", K, model, centres=res.centres, tile=48)
    np.testing.assert_array_equal(_read(tmp_path / "a.tif")[0], _read(tmp_path / "b.tif")[0])
    assert given.centres_source == "given"
    with pytest.raises(InputError, match=rf"no precomputed centres for k=3 \(it has them for k = {K}\)"):
        segment_raster(src, tmp_path / "c.tif", 3, model, centres="artifact")
    assert not (tmp_path / "c.tif").exists()


def test_four_bands_need_a_band_selection(tmp_path, rgb, model):
    rgbn = np.concatenate([rgb, rgb[..., :1]], axis=2)
    # NIR first, then R, G, B, as four plain bands
    path = write_raster(tmp_path / "rgbn.tif", rgbn[..., [3, 0, 1, 2]], photometric="minisblack")
    with pytest.raises(InputError, match=r"has 4 bands; say which three are red, green and blue"):
        segment_raster(path, tmp_path / "out.tif", K, model)
    assert not (tmp_path / "out.tif").exists()
    with pytest.raises(InputError, match=r"band\(s\) \[5\] out of range"):
        segment_raster(path, tmp_path / "out.tif", K, model, bands=(2, 3, 5))
    segment_raster(path, tmp_path / "out.tif", K, model, bands=(2, 3, 4), centres="artifact")
    plain = write_raster(tmp_path / "rgb.tif", rgb)
    segment_raster(plain, tmp_path / "ref.tif", K, model, centres="artifact")
    np.testing.assert_array_equal(_read(tmp_path / "out.tif")[0], _read(tmp_path / "ref.tif")[0])
    # RGBA: GDAL's alpha band is the nodata mask
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    alpha[50:60, 70:100] = 0
    rgba = write_raster(tmp_path / "rgba.tif", np.concatenate([rgb, alpha], axis=2))
    segment_raster(rgba, tmp_path / "rgba_out.tif", K, model, bands=(1, 2, 3), centres="artifact")
    got = _read(tmp_path / "rgba_out.tif")[0]
    assert (got[50:60, 70:100] == NODATA).all()
    keep = alpha[..., 0] > 0
    assert (got[keep] != NODATA).all()


@pytest.mark.parametrize("bands", [1, 2])
def test_one_or_two_band_rasters_are_refused(tmp_path, rgb, model, bands):
    path = write_raster(tmp_path / "few.tif", rgb[..., :bands])
    with pytest.raises(InputError, match=f"has {bands} band\\(s\\); an RGB raster"):
        segment_raster(path, tmp_path / "out.tif", K, model, bands=(1, 1, 1))
    assert not (tmp_path / "out.tif").exists()


def test_bad_arguments_and_inputs_are_refused(tmp_path, src, rgb, model):
    out = tmp_path / "out.tif"
    for k in (1, 9):
        with pytest.raises(InputError, match=r"k must be an integer in 2\.\.8"):
            segment_raster(src, out, k, model)
    with pytest.raises(InputError, match="multiple of 4"):
        segment_raster(src, out, K, model, tile=30)
    with pytest.raises(InputError, match="restarts must be an integer >= 1"):
        segment_raster(src, out, K, model, restarts=0)
    with pytest.raises(InputError, match="balance must be an integer >= 0"):
        segment_raster(src, out, K, model, balance=-1)
    wide = write_raster(tmp_path / "u16.tif", rgb.astype(np.uint16) * 200)
    with pytest.raises(InputError, match=r"u16.tif: bands \[1, 2, 3\] are uint16; rescale='none' needs 8-bit"):
        segment_raster(wide, out, K, model, rescale="none")
    for bad in ("stretch", (5, 5), (1, 2, 3)):
        with pytest.raises(InputError, match="rescale"):
            segment_raster(wide, out, K, model, rescale=bad)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(RasterReadError, match="junk.tif: GDAL cannot read"):
        segment_raster(junk, out, K, model)
    with pytest.raises(RasterReadError, match="missing.tif"):
        segment_raster(tmp_path / "missing.tif", out, K, model)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.tif", "u16.tif"]


def test_existing_output_is_refused_unless_overwrite(tmp_path, src, model):
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="exists"):
        segment_raster(src, out, K, model)
    assert out.read_bytes() == b"precious"
    segment_raster(src, out, K, model, overwrite=True)
    assert _read(out)[0].shape == (203, 178)


def test_cancel_and_interruption_leave_no_partial_output(tmp_path, src, model):
    out = tmp_path / "out.tif"
    calls = []
    with pytest.raises(Cancelled, match="cancelled after 3 of"):
        segment_raster(src, out, K, model, tile=32, progress=lambda d, n: calls.append((d, n)),
                       cancel=lambda: len(calls) >= 3)
    assert calls == [(1, 42), (2, 42), (3, 42)]
    # a cancel is the user's choice, not bad input: callers that report LandsegError as a failure
    # (a QGIS task, a batch script) can tell them apart
    from runtime.errors import LandsegError

    assert not issubclass(Cancelled, LandsegError)

    def interrupt(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_raster(src, out, K, model, tile=32, progress=interrupt)
    assert list(tmp_path.iterdir()) == []  # neither dst nor the temporary file


# --- centres shared by several rasters (fit_shared_centres) ---------------------------------------


@pytest.mark.parametrize("balance", [0, 16])
def test_shared_centres_of_one_raster_equal_the_centres_segment_raster_fits(tmp_path, src, model, balance):
    own = segment_raster(src, tmp_path / "own.tif", K, model, balance=balance, seed=3)
    shared = fit_shared_centres([src], K, model, balance=balance, seed=3)
    np.testing.assert_array_equal(shared.centres, own.centres)
    assert shared.sources == [str(src)] and len(shared.cells) == 1 and len(shared.notes) == 1
    assert "own resolution" in shared.notes[0] and "8-bit input used as it is" in shared.notes[0]


def test_shared_centres_draw_from_each_raster_in_proportion_to_its_valid_area(tmp_path, model):
    a = write_raster(tmp_path / "a.tif", synthetic_rgb(96, 96, seed=1))
    big = synthetic_rgb(192, 192, seed=2)  # four times the area of a
    b = write_raster(tmp_path / "b.tif", big)
    half = synthetic_rgb(96, 96, seed=4)
    half[:48] = 0  # nodata on whole stride-4 cells: exactly half of c is valid
    c = write_raster(tmp_path / "c.tif", half, nodata=0)
    shared = fit_shared_centres([a, b, c], K, model, samples=1100)
    assert shared.cells == [200, 800, 100]  # areas 9216 : 36864 : 4608 valid pixels
    assert shared.centres.shape == (K, 8) and shared.centres.dtype == np.float32
    # a raster that is nodata everywhere contributes nothing, and is not an error among others
    empty = write_raster(tmp_path / "empty.tif", np.zeros((64, 64, 3), np.uint8), nodata=0)
    assert fit_shared_centres([a, empty], K, model, samples=500).cells == [500, 0]
    with pytest.raises(InputError, match="no valid .* of any of the 1 raster"):
        fit_shared_centres([empty], K, model)


def test_shared_centres_cluster_the_covers_of_all_rasters_together(tmp_path, model):
    # a and b each hold one cover: centres fitted on both give each raster one id and the two
    # rasters different ids; centres fitted on one raster alone spend the second cluster inside it
    # (on its edge cells), so that raster is no longer one id (96 % here)
    rng = np.random.default_rng(0)

    def one_cover(colour):
        return np.clip(np.array(colour, np.float64) + rng.normal(0, 4, (96, 96, 3)), 0, 255).astype(np.uint8)

    a = write_raster(tmp_path / "a.tif", one_cover([30, 60, 140]))
    b = write_raster(tmp_path / "b.tif", one_cover([200, 180, 140]))

    def main_ids(centres):
        found = []
        for name, path in (("a", a), ("b", b)):
            segment_raster(path, tmp_path / f"{name}2.tif", 2, model, centres=centres, overwrite=True)
            ids, counts = np.unique(_read(tmp_path / f"{name}2.tif")[0], return_counts=True)
            found.append((ids[counts.argmax()], counts.max() / counts.sum()))
        return found

    (id_a, pure_a), (id_b, pure_b) = main_ids(fit_shared_centres([a, b], 2, model).centres)
    assert pure_a == pure_b == 1.0 and id_a != id_b
    (_, pure_a), _ = main_ids(fit_shared_centres([a], 2, model).centres)
    assert pure_a < 0.99


def test_shared_centres_refuse_bad_input(tmp_path, src, rgb, model):
    with pytest.raises(InputError, match="no rasters given"):
        fit_shared_centres([], K, model)
    with pytest.raises(InputError, match=r"k must be an integer in 2\.\.8"):
        fit_shared_centres([src], 9, model)
    with pytest.raises(RasterReadError, match="missing.tif: GDAL cannot read"):
        fit_shared_centres([src, tmp_path / "missing.tif"], K, model)
    rgbn = write_raster(tmp_path / "rgbn.tif", np.concatenate([rgb, rgb[..., :1]], axis=2), photometric="minisblack")
    with pytest.raises(InputError, match="rgbn.tif: has 4 bands"):
        fit_shared_centres([src, rgbn], K, model)
    with pytest.raises(InputError, match="balance must be an integer >= 0"):
        fit_shared_centres([src], K, model, balance=-1)
