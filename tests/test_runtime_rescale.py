"""Imagery that is not 8-bit: percentile / explicit stretches to the model's 0..255 input, per raster."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from runtime_fixtures import random_encoder, synthetic_rgb, write_encoder_artifact, write_raster

from runtime import percentile_limits, segment_raster, to_uint8
from runtime.cli import main
from runtime.errors import InputError
from runtime.model import load_model
from runtime.raster import NODATA
from runtime.rescale import check_limits

K = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=7)
    return write_encoder_artifact(tmp_path_factory.mktemp("model") / "best", enc)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def rgb():
    return synthetic_rgb(150, 133, seed=5)


def _labels(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.tags()


def test_to_uint8_maps_limits_linearly_and_clips():
    values = np.array([[[100, 1000, -5.0], [4180, 3000, 0.5], [50, 5000, 1.0]]])
    limits = np.array([[100, 4180], [1000, 3000], [0.0, 1.0]])
    out = to_uint8(values, limits)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[0, 0, 0], [255, 255, 128], [0, 255, 255]]])
    np.testing.assert_array_equal(check_limits((0, 10)), [[0, 10]] * 3)
    for bad in ((3, 3), (1, 2, 3), [[0, 1], [0, 1]], (0, np.inf), "wide"):
        with pytest.raises(InputError, match=r"low < high"):
            check_limits(bad)


def test_percentile_limits_ignore_invalid_pixels_and_refuse_flat_bands():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 4000, (60, 50, 3))
    valid = np.ones((60, 50), bool)
    valid[:10] = False
    values[:10] = 65535  # nodata-valued rows must not move the stretch
    values[20, 20, 1] = np.nan  # nor a NaN
    limits = percentile_limits(values, valid)
    for b in range(3):
        band = values[10:, :, b]
        band = band[np.isfinite(band)]
        np.testing.assert_allclose(limits[b], np.percentile(band, [2, 98]))
    values[..., 2] = 7.0
    with pytest.raises(InputError, match="band 3 of the RGB selection is constant"):
        percentile_limits(values, valid)
    with pytest.raises(InputError, match="no valid"):
        percentile_limits(values, np.zeros((60, 50), bool))


def test_16_bit_raster_with_explicit_limits_equals_its_8_bit_original(tmp_path, rgb, model):
    # a 12-bit sensor's digital numbers: v * 16 + 100; mapping 100..4180 back to 0..255 is exact
    eight = write_raster(tmp_path / "u8.tif", rgb)
    sixteen = write_raster(tmp_path / "u16.tif", rgb.astype(np.uint16) * 16 + 100)
    a = segment_raster(eight, tmp_path / "a.tif", K, model)
    b = segment_raster(sixteen, tmp_path / "b.tif", K, model, rescale=(100, 100 + 255 * 16), tile=48)
    np.testing.assert_array_equal(_labels(tmp_path / "a.tif")[0], _labels(tmp_path / "b.tif")[0])
    np.testing.assert_array_equal(a.centres, b.centres)
    assert a.rescale_limits is None and a.rescale == "8-bit input used as it is"
    assert b.rescale.startswith("uint16 input mapped from the given limits (R 100..4180")


def test_auto_stretches_16_bit_from_its_percentiles_tiled_equals_untiled(tmp_path, rgb, model):
    dn = rgb.astype(np.uint16) * 16 + 100
    dn[:9, :40] = 0  # nodata
    src = write_raster(tmp_path / "u16.tif", dn, nodata=0)
    whole = segment_raster(src, tmp_path / "whole.tif", K, model, tile=1024)
    tiled = segment_raster(src, tmp_path / "tiled.tif", K, model, tile=32)
    expected = percentile_limits(dn, ~(dn == 0).all(axis=2))
    np.testing.assert_allclose(whole.rescale_limits, expected)
    np.testing.assert_allclose(tiled.rescale_limits, expected)
    a, tags = _labels(tmp_path / "whole.tif")
    np.testing.assert_array_equal(a, _labels(tmp_path / "tiled.tif")[0])
    assert (a[:9, :40] == NODATA).all() and (a[9:] < K).all()
    assert "uint16 input stretched band by band from its 2-98 % percentile range" in tags["landseg_rescale"]
    # the raster path equals the array path fed with the same stretch and centres
    clean = write_raster(tmp_path / "clean.tif", rgb.astype(np.uint16) * 16 + 100)
    res = segment_raster(clean, tmp_path / "clean_out.tif", K, model)
    arr = to_uint8(rgb.astype(np.uint16) * 16 + 100, res.rescale_limits)
    np.testing.assert_array_equal(_labels(tmp_path / "clean_out.tif")[0],
                                  model.predict_labels(arr, K, centres=res.centres))


def test_float_reflectance_nan_is_nodata(tmp_path, rgb, model):
    refl = rgb.astype(np.float32) / 400.0
    refl[30:40, 50:70] = np.nan
    src = write_raster(tmp_path / "f32.tif", refl)
    res = segment_raster(src, tmp_path / "out.tif", K, model, tile=64)
    labels = _labels(tmp_path / "out.tif")[0]
    assert (labels[30:40, 50:70] == NODATA).all()
    assert (np.delete(labels, np.s_[30:40], axis=0) < K).all()
    assert res.rescale.startswith("float32 input stretched")


def test_cli_rescale_option(tmp_path, rgb, model_dir, capsys):
    src = write_raster(tmp_path / "u16.tif", rgb.astype(np.uint16) * 16 + 100)
    base = [str(src), "--k", str(K), "--model", str(model_dir)]
    assert main([base[0], str(tmp_path / "auto.tif"), *base[1:]]) == 0
    assert "uint16 input stretched band by band" in capsys.readouterr().err
    assert main([base[0], str(tmp_path / "lim.tif"), *base[1:], "--rescale", "100,4180"]) == 0
    assert "mapped from the given limits (R 100..4180, G 100..4180, B 100..4180)" in capsys.readouterr().err
    assert main([base[0], str(tmp_path / "six.tif"), *base[1:], "--rescale", "100,4180,0,5000,100,4180"]) == 0
    assert "G 0..5000" in capsys.readouterr().err
    assert main([base[0], str(tmp_path / "none.tif"), *base[1:], "--rescale", "none"]) == 2
    assert "rescale='none' needs 8-bit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([base[0], str(tmp_path / "x.tif"), *base[1:], "--rescale", "1,2,3"])
    assert e.value.code == 2 and "LOW,HIGH or six numbers" in capsys.readouterr().err
    assert not (tmp_path / "none.tif").exists() and not (tmp_path / "x.tif").exists()


def test_resampled_16_bit_raster_is_stretched_and_written_on_its_own_grid(tmp_path, rgb, model):
    src = write_raster(tmp_path / "u16.tif", rgb.astype(np.uint16) * 16 + 100, pixel=0.3)
    res = segment_raster(src, tmp_path / "out.tif", K, model, pixel_size=0.6, tile=32)
    labels, tags = _labels(tmp_path / "out.tif")
    assert labels.shape == rgb.shape[:2] and (labels < K).all()
    assert res.resolution.startswith("resampled from 0.3 m to 0.6 m") and "uint16 input stretched" in tags["landseg_rescale"]


def test_auto_follows_the_models_training_mapping(tmp_path, rgb):
    from runtime.errors import ArtifactError

    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=7)
    fixed = load_model(write_encoder_artifact(tmp_path / "fixed", enc,
                                              input_rescale={"mode": "fixed", "limits": [[100, 4180]] * 3}))
    stretched = load_model(write_encoder_artifact(tmp_path / "pct", enc,
                                                  input_rescale={"mode": "percentile", "limits": None}))
    dn = write_raster(tmp_path / "u16.tif", rgb.astype(np.uint16) * 16 + 100)
    eight = write_raster(tmp_path / "u8.tif", rgb)
    # trained on 12-bit data mapped from 100..4180: new 16-bit rasters get exactly that mapping
    res = segment_raster(dn, tmp_path / "a.tif", K, fixed)
    assert res.rescale.startswith("uint16 input mapped from the model's training limits (R 100..4180")
    segment_raster(dn, tmp_path / "b.tif", K, fixed, rescale=(100, 4180))
    np.testing.assert_array_equal(_labels(tmp_path / "a.tif")[0], _labels(tmp_path / "b.tif")[0])
    assert segment_raster(eight, tmp_path / "c.tif", K, fixed).rescale == "8-bit input used as it is"
    # trained on images stretched one by one: 8-bit rasters are stretched too
    res = segment_raster(eight, tmp_path / "d.tif", K, stretched)
    assert res.rescale.startswith("uint8 input stretched band by band")
    np.testing.assert_allclose(res.rescale_limits, percentile_limits(rgb))
    # an explicit choice wins over the record
    assert segment_raster(eight, tmp_path / "e.tif", K, stretched, rescale="none").rescale_limits is None
    for bad in ({"mode": "fixed", "limits": None}, {"mode": "stretch", "limits": None},
                {"mode": "auto"}, {"mode": "fixed", "limits": [[5, 1]] * 3}):
        with pytest.raises(ArtifactError, match="'input_rescale' must be"):
            write_encoder_artifact(tmp_path / "bad", enc, input_rescale=bad)
