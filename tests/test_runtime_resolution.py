"""segment_raster at the training ground sample distance: pixel sizes from the CRS, the resampling
plan, and labels written back on the raster's own grid."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from runtime_fixtures import random_encoder, synthetic_rgb, write_encoder_artifact, write_raster

from runtime import segment_raster
from runtime.errors import ArtifactError, Cancelled, InputError
from runtime.model import load_model
from runtime.raster import NODATA
from runtime.resolution import plan_resolution, resample_image, to_source_grid
from runtime.source import ground_pixel_size_m

K = 4
TRAIN_M = 0.6


@pytest.fixture(scope="module")
def encoder():
    return random_encoder(width=16, depth=1, embed_dim=8, seed=7)


@pytest.fixture(scope="module")
def model(tmp_path_factory, encoder):
    centres = {K: np.eye(K, 8, dtype=np.float32)}
    return load_model(write_encoder_artifact(tmp_path_factory.mktemp("m") / "best", encoder, centres=centres,
                                             training_pixel_size_m=TRAIN_M))


def test_ground_pixel_size_from_the_crs():
    utm = CRS.from_epsg(32611)
    # UTM near its central meridian: ground metres = grid metres / 0.9996 (the zone's scale factor)
    assert ground_pixel_size_m(utm, from_origin(500000, 4000000, 0.6, 0.6)) == pytest.approx(0.6 / 0.9996, rel=1e-4)
    # non-square pixels: the side of the square of equal area
    assert ground_pixel_size_m(utm, from_origin(500000, 4000000, 0.5, 2.0)) == pytest.approx(1.0, rel=1e-3)
    # Web Mercator at 60 degrees north: a "metre" of the CRS is cos(60) = 0.5 ground metres
    y60 = 8399737.89  # EPSG:3857 northing of latitude 60
    assert ground_pixel_size_m(CRS.from_epsg(3857), from_origin(0, y60, 2.0, 2.0)) == pytest.approx(1.0, rel=5e-3)
    # degrees: 1e-5 degree of latitude is about 1.11 m, of longitude at 60 degrees north half that
    deg = ground_pixel_size_m(CRS.from_epsg(4326), from_origin(10.0, 60.0, 1e-5, 1e-5), 10, 10)
    assert deg == pytest.approx((1.1165 * 0.5583) ** 0.5, rel=2e-3)
    # US survey feet (New York Long Island state plane): about 0.3048 m
    assert ground_pixel_size_m(CRS.from_epsg(2263), from_origin(1000000, 200000, 1.0, 1.0)) == pytest.approx(0.3048, rel=1e-3)
    # the centre of the grid counts: 100 x 100 km of Web Mercator spans latitudes of different scale
    assert ground_pixel_size_m(None, from_origin(0, 0, 1.0, 1.0)) is None
    assert ground_pixel_size_m(CRS.from_wkt('LOCAL_CS["local",UNIT["metre",1]]'), from_origin(0, 0, 1.0, 1.0)) is None


def test_plan_resolution(model, tmp_path, encoder):
    plan = lambda px, how="auto": plan_resolution(px, model, how, "x.tif")
    assert plan(0.6).scale == 1.0
    assert plan(0.7).scale == 1.0 and "own 0.7 m" in plan(0.7).note  # within RESAMPLE_TOLERANCE
    half = plan(1.2)
    assert half.scale == pytest.approx(0.5) and half.working_m == TRAIN_M and "resampled from 1.2 m to 0.6 m" in half.note
    assert plan(0.3).scale == pytest.approx(2.0)
    assert plan(0.3 * (1 + 1e-8)).scale == 2.0  # snapped: the working grid nests in the raster's
    assert plan(1.2, "native").scale == 1.0
    assert plan(1.2, 2.4).scale == pytest.approx(2.0)
    unknown_gsd = plan(None)
    assert unknown_gsd.scale == 1.0 and unknown_gsd.working_m is None and "0.6 m" in unknown_gsd.note
    with pytest.raises(InputError, match="CRS"):
        plan(None, 0.6)
    for bad in (0, -1.0, float("nan"), "coarse", True):
        with pytest.raises(InputError, match="pixel_size"):
            plan(0.6, bad)
    unknown_model = load_model(write_encoder_artifact(tmp_path / "u", encoder))
    assert plan_resolution(1.2, unknown_model, "auto", "x").scale == 1.0


def test_artifact_rejects_a_bad_training_pixel_size(tmp_path, encoder):
    with pytest.raises(ArtifactError, match="training_pixel_size_m"):
        write_encoder_artifact(tmp_path / "bad", encoder, training_pixel_size_m=-0.5)


@pytest.fixture(scope="module")
def utm_model(tmp_path_factory, encoder):
    """The model with the ground pixel size of write_raster's 0.6 m UTM grid (0.6 / 0.9996 m)."""
    gsd = ground_pixel_size_m(CRS.from_epsg(32611), from_origin(500000.0, 4000000.0, 0.6, 0.6), 77, 90)
    return load_model(write_encoder_artifact(tmp_path_factory.mktemp("u") / "best", encoder,
                                             training_pixel_size_m=gsd))


def test_finer_raster_is_segmented_at_the_training_resolution(tmp_path, utm_model):
    """A 0.3 m raster whose 2 x 2 blocks repeat a 0.6 m raster: resampled to 0.6 m (2 x 2 means of
    equal pixels), its labels are the 0.6 m raster's labels repeated 2 x 2, on the 0.3 m grid;
    tiled equals untiled; the raster's nodata stays nodata."""
    coarse = synthetic_rgb(90, 77, seed=5)
    coarse[coarse.sum(axis=2) == 0] = 1
    fine = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)
    fine[:6, :10] = 0  # nodata, 2 x 2 aligned and not
    fine[101:104, 51:58] = 0
    coarse_src = write_raster(tmp_path / "coarse.tif", coarse, nodata=0, pixel=0.6)
    fine_src = write_raster(tmp_path / "fine.tif", fine, nodata=0, pixel=0.3)
    ref = segment_raster(coarse_src, tmp_path / "ref.tif", K, utm_model)  # centres fitted at 0.6 m, reused below
    assert ref.pixel_size_m == pytest.approx(0.6, rel=1e-3) and "own 0.6 m" in ref.resolution
    res = segment_raster(fine_src, tmp_path / "auto.tif", K, utm_model, centres=ref.centres)
    assert res.pixel_size_m == pytest.approx(0.6, rel=1e-3) and "resampled from 0.3 m to 0.6 m" in res.resolution
    tiled = segment_raster(fine_src, tmp_path / "tiled.tif", K, utm_model, centres=ref.centres, tile=32)
    native = segment_raster(fine_src, tmp_path / "native.tif", K, utm_model, centres=ref.centres, pixel_size="native")
    with rasterio.open(fine_src) as f, rasterio.open(res.dst) as a:
        assert (a.width, a.height, a.transform, a.crs) == (f.width, f.height, f.transform, f.crs)
        auto = a.read(1)
        assert "resampled" in a.tags()["landseg_resolution"]
    with rasterio.open(ref.dst) as r:
        expected = np.repeat(np.repeat(r.read(1), 2, axis=0), 2, axis=1)
    assert len(np.unique(expected[expected != NODATA])) >= 3  # a real segmentation, not one cluster
    nodata = (fine == 0).all(axis=2)
    assert (auto[nodata] == NODATA).all()
    # pixels whose whole reach (the model's halo, in 0.3 m pixels) holds no nodata of the fine raster:
    # nearer ones see the neutral fill where the 0.6 m reference saw real pixels
    from scipy.ndimage import binary_dilation

    reach = 2 * utm_model.halo()
    far = ~binary_dilation(nodata, np.ones((2 * reach + 1, 2 * reach + 1), dtype=bool)) & (expected != NODATA)
    assert far.mean() > 0.3
    np.testing.assert_array_equal(auto[far], expected[far])
    with rasterio.open(tiled.dst) as t:
        np.testing.assert_array_equal(t.read(1), auto)
    with rasterio.open(native.dst) as n:
        assert (n.read(1) != auto).any()  # "native" really runs at 0.3 m


def test_coarser_raster_is_upsampled_and_written_on_its_own_grid(tmp_path, model):
    img = synthetic_rgb(61, 70, seed=2)
    src = write_raster(tmp_path / "coarse.tif", img, pixel=1.5)  # no nodata: edges masked by alpha
    res = segment_raster(src, tmp_path / "out.tif", K, model)
    assert res.pixel_size_m == pytest.approx(0.6) and "from 1.5 m" in res.resolution  # the model's 0.6 m
    with rasterio.open(src) as s, rasterio.open(res.dst) as o:
        assert (o.width, o.height, o.transform) == (s.width, s.height, s.transform)
        labels = o.read(1)
    assert labels.max() < K  # every pixel is inside the source: none nodata
    assert len(np.unique(labels)) > 1


@pytest.mark.parametrize("mask", ["alpha", "internal"])
def test_masked_raster_is_resampled_and_keeps_its_nodata(tmp_path, model, mask):
    img = synthetic_rgb(100, 120, seed=1)
    valid = np.full((100, 120), 255, np.uint8)
    valid[:30, :40] = 0
    if mask == "alpha":  # RGBA: GDAL carries the alpha band into the warped VRT
        src = write_raster(tmp_path / "in.tif", np.concatenate([img, valid[..., None]], axis=2), pixel=0.3)
    else:
        src = write_raster(tmp_path / "in.tif", img, pixel=0.3)
        with rasterio.open(src, "r+") as ds:
            ds.write_mask(valid)
    res = segment_raster(src, tmp_path / "out.tif", K, model, bands=(1, 2, 3))
    assert "resampled from 0.3 m" in res.resolution
    with rasterio.open(res.dst) as out:
        labels = out.read(1)
    assert (labels[:30, :40] == NODATA).all() and (labels[30:, 40:] < K).all()
    # counted on the raster's own grid, after the labels went back to it
    counts = np.bincount(labels.ravel(), minlength=256)
    np.testing.assert_array_equal(res.cluster_pixels, counts[:K])
    assert res.nodata_pixels == counts[NODATA] and counts[K:NODATA].sum() == 0


@pytest.mark.parametrize("dst_crs", ["EPSG:3857", "EPSG:4326"])
def test_reprojected_raster_keeps_its_ground_pixel_size(tmp_path, dst_crs):
    """A 0.6 m UTM raster warped to Web Mercator (pixels ~0.6 / cos(36 deg) 'metres') or to degrees
    still measures ~0.6 ground metres, so pixel_size="auto" leaves it alone."""
    from rasterio.warp import calculate_default_transform

    src = write_raster(tmp_path / "utm.tif", synthetic_rgb(64, 64, seed=4), pixel=0.6)
    with rasterio.open(src) as s:
        transform, w, h = calculate_default_transform(s.crs, dst_crs, s.width, s.height, *s.bounds)
        native = ground_pixel_size_m(s.crs, s.transform, s.width, s.height)
    nominal = abs(transform.a)
    assert ground_pixel_size_m(CRS.from_string(dst_crs), transform, w, h) == pytest.approx(native, rel=0.02)
    if dst_crs == "EPSG:3857":  # the CRS's own unit is far from ground metres at 36 degrees north
        assert nominal == pytest.approx(native / np.cos(np.radians(36.1)), rel=0.02)


def test_resampled_run_reports_progress_and_can_be_cancelled_while_writing_back(tmp_path, model):
    src = write_raster(tmp_path / "in.tif", synthetic_rgb(100, 120, seed=6), pixel=0.3)
    calls = []
    segment_raster(src, tmp_path / "out.tif", K, model, tile=64, progress=lambda d, n: calls.append((d, n)))
    # 0.3 m -> 0.6 m: 50 x 60 working pixels = 1 tile of 64, then 2 x 2 blocks of 64 written back
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    calls.clear()
    with pytest.raises(Cancelled, match="while writing labels back"):
        segment_raster(src, tmp_path / "cancelled.tif", K, model, tile=64,
                       progress=lambda d, n: calls.append((d, n)), cancel=lambda: len(calls) >= 2)
    assert not (tmp_path / "cancelled.tif").exists() and list(tmp_path.glob(".*")) == []


def test_raster_without_crs_is_resampled_at_its_declared_pixel_size(tmp_path, model, capsys):
    """The finer-raster check without a CRS: a 0.3 m scan declared as such is segmented at the
    model's 0.6 m and its labels are the 0.6 m scan's labels (declared 0.6 m) repeated 2 x 2."""
    from runtime.cli import main

    coarse = synthetic_rgb(60, 52, seed=6)
    fine = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)
    coarse_src = write_raster(tmp_path / "coarse.tif", coarse, crs=None, pixel=1.0)
    fine_src = write_raster(tmp_path / "fine.tif", fine, crs=None, pixel=1.0)  # pixel units, not metres
    ref = segment_raster(coarse_src, tmp_path / "ref.tif", K, model, raster_pixel_size_m=0.6)
    assert "own 0.6 m" in ref.resolution
    res = segment_raster(fine_src, tmp_path / "fine_out.tif", K, model, centres=ref.centres,
                         raster_pixel_size_m=0.3, tile=32)
    assert res.pixel_size_m == pytest.approx(0.6) and "resampled from 0.3 m to 0.6 m" in res.resolution
    with rasterio.open(ref.dst) as r, rasterio.open(res.dst) as f:
        expected = np.repeat(np.repeat(r.read(1), 2, axis=0), 2, axis=1)
        assert f.crs is None and (f.width, f.height) == (fine.shape[1], fine.shape[0])
        np.testing.assert_array_equal(f.read(1), expected)
    unknown = segment_raster(fine_src, tmp_path / "as_is.tif", K, model)
    assert "declare the raster's size (raster_pixel_size_m)" in unknown.resolution
    with pytest.raises(InputError, match="has a CRS, which gives its pixel size"):
        segment_raster(write_raster(tmp_path / "geo.tif", coarse), tmp_path / "x.tif", K, model,
                       raster_pixel_size_m=0.6)
    with pytest.raises(InputError, match="raster_pixel_size_m must be a positive number"):
        segment_raster(fine_src, tmp_path / "x.tif", K, model, raster_pixel_size_m=-1)
    model_dir = tmp_path / "m"
    assert main([str(fine_src), str(tmp_path / "cli.tif"), "--k", str(K), "--model",
                 str(write_encoder_artifact(model_dir, random_encoder(width=16, depth=1, embed_dim=8, seed=7),
                                            training_pixel_size_m=TRAIN_M)),
                 "--raster-pixel-size", "0.3"]) == 0
    assert "resampled from 0.3 m to 0.6 m" in capsys.readouterr().err
    assert not (tmp_path / "x.tif").exists()


# -- arrays: Model.predict_labels(..., pixel_size_m=...) ------------------------------------------


def test_resample_image_averages_areas_and_interpolates_bilinearly():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    up2 = np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)
    assert np.array_equal(resample_image(up2, 2.0), rgb)  # the 2 x 2 means of a repeated image
    assert resample_image(rgb, 3.0).shape == (2, 3, 3)  # ceil(n / scale) per axis
    # the last working pixel of a 7-px axis at scale 3 covers source pixel 6 alone (the rest is
    # beyond the edge and left out of the average)
    assert np.array_equal(resample_image(rgb, 3.0)[0, 2], np.rint(rgb[0:3, 6].astype(float).mean(0)).astype(np.uint8))
    # area weights at a fractional scale: pixel 1 of scale 1.5 is half of source 1 and all of 2
    row = np.array([[[0, 0, 0], [30, 30, 30], [90, 90, 90]]], dtype=np.uint8)
    assert resample_image(row, 1.5)[0, 1, 0] == round((0.5 * 30 + 90) / 1.5)
    # bilinear when refining: centres of a 2x upsampling sit a quarter pixel from the source's
    ramp = np.array([[[0] * 3, [100] * 3]], dtype=np.uint8)
    assert resample_image(ramp, 0.5)[0, :, 0].tolist() == [0, 25, 75, 100]
    flat = np.full((5, 9, 3), 77, dtype=np.uint8)
    for scale in (0.5, 1.5, 2.5):
        assert (resample_image(flat, scale) == 77).all()


def test_to_source_grid_takes_the_working_pixel_under_each_centre():
    work = np.arange(6).reshape(2, 3)
    assert np.array_equal(to_source_grid(work, 2.0, 4, 6), np.repeat(np.repeat(work, 2, 0), 2, 1))
    assert to_source_grid(work, 2.0, 3, 5).shape == (3, 5)  # a partial last working pixel
    fine = np.arange(16).reshape(4, 4)  # a working grid twice as fine: every second pixel, leading dims kept
    assert np.array_equal(to_source_grid(np.stack([fine, -fine]), 0.5, 2, 2),
                          np.stack([[[5, 7], [13, 15]], [[-5, -7], [-13, -15]]]))


def test_predict_labels_resamples_an_array_of_known_pixel_size(model):
    rgb = synthetic_rgb(96, 80, seed=3)
    centres = model.fit_centres([rgb], K)
    native = model.predict_labels(rgb, K, centres=centres)
    assert len(np.unique(native)) == K  # the comparisons below are between real segmentations
    # the same scene at 0.3 m (each pixel repeated 2 x 2): averaged back to 0.6 m, segmented there,
    # and the labels repeated onto the 0.3 m grid, exactly
    fine = np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)
    labels = model.predict_labels(fine, K, centres=centres, pixel_size_m=TRAIN_M / 2)
    assert np.array_equal(labels, np.repeat(np.repeat(native, 2, axis=0), 2, axis=1))
    proba = model.predict_proba(fine, K, centres=centres, pixel_size_m=TRAIN_M / 2)
    assert proba.shape == (K, 192, 160) and np.array_equal(proba.argmax(0), labels)
    assert not np.array_equal(labels, model.predict_labels(fine, K, centres=centres))  # not the native run
    # within RESAMPLE_TOLERANCE, or of unknown size: the array as it is
    assert np.array_equal(model.predict_labels(rgb, K, centres=centres, pixel_size_m=0.7), native)
    assert np.array_equal(model.predict_labels(rgb, K, centres=centres, pixel_size_m=None), native)
    coarse = model.predict_labels(rgb, K, centres=centres, pixel_size_m=1.2)  # refined 2x, labels back
    assert coarse.shape == rgb.shape[:2] and coarse.dtype == np.uint8
    for bad in (0, -0.3, float("inf"), "0.3", True):
        with pytest.raises(InputError, match="pixel_size_m"):
            model.predict_labels(rgb, K, centres=centres, pixel_size_m=bad)


def test_pixel_size_of_an_array_is_ignored_with_a_warning_without_a_training_size(tmp_path, encoder):
    unknown = load_model(write_encoder_artifact(tmp_path / "u", encoder, centres={K: np.eye(K, 8, dtype=np.float32)}))
    rgb = synthetic_rgb(64, 64, seed=1)
    centres = unknown.fit_centres([rgb], K)
    with pytest.warns(UserWarning, match="does not record its training pixel size"):
        labels = unknown.predict_labels(rgb, K, centres=centres, pixel_size_m=0.3)
    assert np.array_equal(labels, unknown.predict_labels(rgb, K, centres=centres))
