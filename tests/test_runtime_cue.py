"""The optional texture cue (runtime.cue): parity with scipy, what is clustered, seamless tiling."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from runtime_fixtures import encoder_meta, random_encoder, synthetic_rgb, write_encoder_artifact, write_raster
from scipy import ndimage

from runtime import segment_raster
from runtime.artifact import ArtifactError
from runtime.cue import dark_tophat_cells, grey_closing
from runtime.errors import InputError
from runtime.model import Model, load_model

CUE = {"kind": "dark_tophat", "size": 15, "scale": 2.5}


@pytest.mark.parametrize("shape", [(37, 53), (8, 5), (64, 64)])
@pytest.mark.parametrize("size", [3, 7, 15])
def test_grey_closing_equals_scipy(shape, size):
    x = np.random.default_rng(size).random(shape).astype(np.float32)
    np.testing.assert_array_equal(grey_closing(x, size), ndimage.grey_closing(x, size=(size, size)))


@pytest.mark.parametrize("shape", [(67, 93), (64, 64), (5, 3)])
def test_dark_tophat_cells_are_cell_means_of_the_scipy_tophat(shape):
    rgb = synthetic_rgb(*shape, seed=2)
    light = rgb.astype(np.float32).mean(axis=2) / 255
    th = ndimage.grey_closing(light, size=(15, 15)) - light
    got = dark_tophat_cells(rgb, 15)
    assert got.shape == (-(-shape[0] // 4), -(-shape[1] // 4)) and got.dtype == np.float32
    for i, j in [(0, 0), (got.shape[0] - 1, got.shape[1] - 1), (got.shape[0] // 2, got.shape[1] // 3)]:
        np.testing.assert_allclose(got[i, j], th[4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(), rtol=1e-5, atol=1e-7)
    assert np.all(got >= 0)


def test_tophat_is_large_on_narrow_dark_lines_and_zero_on_flat_ground():
    rgb = np.full((64, 64, 3), 200, np.uint8)
    rgb[:, 32:36] = 40  # a 4 px dark road, exactly cell column 8
    cells = dark_tophat_cells(rgb, 15)
    np.testing.assert_allclose(cells[:, 8], (200 - 40) / 255, rtol=1e-6)  # closing fills the road
    assert cells[:, 0].max() == 0 and cells[:, 15].max() == 0 and cells[:, 7].max() == 0


@pytest.mark.parametrize("size", [2, 1, 4.0, True])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError, match="odd integer"):
        dark_tophat_cells(np.zeros((8, 8, 3), np.uint8), size)


def _model(enc, cue=CUE) -> Model:
    layers, arrays = enc.export_layers()
    return Model(layers, arrays, encoder_meta(enc, cue=cue))


def test_embed_cells_appends_the_cue_and_renormalises():
    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=3)
    rgb = synthetic_rgb(50, 42, seed=1)
    plain, cued = _model(enc, cue=None), _model(enc)
    assert plain.cluster_dim == 8 and cued.cluster_dim == 9
    a, b = plain.embed_cells(rgb), cued.embed_cells(rgb)
    assert b.shape == a.shape[:2] + (9,)
    np.testing.assert_allclose(np.linalg.norm(b, axis=2), 1.0, atol=1e-5)
    cue = CUE["scale"] * dark_tophat_cells(rgb, 15)
    np.testing.assert_allclose(b[..., 8] * np.sqrt(1 + cue ** 2), cue, atol=1e-5)
    np.testing.assert_allclose(b[..., :8] * np.sqrt(1 + cue[..., None] ** 2), a, atol=1e-5)
    np.testing.assert_array_equal(cued.embed(rgb), plain.embed(rgb))  # the network's output alone
    labels = cued.predict_labels(rgb, 4)
    assert labels.shape == rgb.shape[:2]
    with pytest.raises(InputError, match=r"embed_dim \+ 1"):
        cued.predict_labels(rgb, 4, centres=np.eye(4, 8, dtype=np.float32))
    cued.predict_labels(rgb, 4, centres=np.eye(4, 9, dtype=np.float32))


@pytest.mark.parametrize("cue", [{"kind": "dark_tophat", "size": 14, "scale": 1.0},
                                 {"kind": "dark_tophat", "size": 15, "scale": 0},
                                 {"kind": "bright_tophat", "size": 15, "scale": 1.0},
                                 {"kind": "dark_tophat", "size": 15}, "dark_tophat"])
def test_bad_cue_meta_is_refused(cue):
    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=3)
    with pytest.raises(ArtifactError, match="'cue'"):
        _model(enc, cue=cue)


def test_artifact_centres_have_the_cue_column(tmp_path):
    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=3)
    ok = load_model(write_encoder_artifact(tmp_path / "a", enc, centres={4: np.eye(4, 9, dtype=np.float32)}, cue=CUE))
    assert ok.artifact_centres(4).shape == (4, 9)
    with pytest.raises(ArtifactError, match="centres_k4"):
        write_encoder_artifact(tmp_path / "b", enc, centres={4: np.eye(4, 8, dtype=np.float32)}, cue=CUE)


def test_tiled_equals_untiled_with_the_cue(tmp_path):
    # a shallow encoder (receptive field 23 px) whose halo must grow to hold the cue's 15 px element
    enc = random_encoder(width=16, depth=1, embed_dim=8, seed=7)
    model = load_model(write_encoder_artifact(tmp_path / "m", enc, cue=CUE))
    assert enc.receptive_field < 2 * (15 - 1) + 4 <= model.halo(0)
    rgb = synthetic_rgb(203, 178, seed=3)
    rgb[120:126, 60:90] = 0  # a nodata strip inside a tile
    src = write_raster(tmp_path / "rgb.tif", rgb, nodata=0)
    whole = segment_raster(src, tmp_path / "whole.tif", 4, model, tile=1024)
    tiled = segment_raster(src, tmp_path / "tiled.tif", 4, model, tile=32)
    assert whole.tiles == 1 and tiled.tiles > 1
    np.testing.assert_array_equal(whole.centres, tiled.centres)
    with rasterio.open(tmp_path / "whole.tif") as a, rasterio.open(tmp_path / "tiled.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
