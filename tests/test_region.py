"""`segment_region` / `python -m runtime segment-region` on a 2-worker Dask LocalCluster: one legend
for several rasters, the labels of `segment_raster` run one by one with the same shared centres, a
corrupt raster reported while the others complete, a VRT over the outputs, and reruns that skip
complete outputs (recognised by their tags) and redo the others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio
from conftest import REPO
from runtime_fixtures import random_encoder, synthetic_rgb, write_encoder_artifact, write_raster

from runtime import fit_shared_centres, load_model, segment_raster
from runtime.region import REGION_TAG, segment_region

pytest.importorskip("dask.distributed")

PIXEL = 0.6


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    """Four tiles of a mosaic (mixed sizes, one with a nodata corner) and a corrupt file."""
    root = tmp_path_factory.mktemp("region")
    model = write_encoder_artifact(root / "model", random_encoder(width=8, depth=1, embed_dim=6))
    tiles = root / "tiles"
    tiles.mkdir()
    sources = []
    for i, (h, w, row, col) in enumerate([(160, 192, 0, 0), (160, 128, 0, 192), (96, 192, 160, 0),
                                          (96, 128, 160, 192)]):
        rgb = synthetic_rgb(h, w, seed=10 + i)
        nodata = None
        if i == 2:
            rgb[:40, :50] = 0
            nodata = 0
        origin = (500000.0 + col * PIXEL, 4000000.0 - row * PIXEL)
        sources.append(str(write_raster(tiles / f"tile_{i}.tif", rgb, nodata=nodata, origin=origin, pixel=PIXEL)))
    corrupt = tiles / "tile_9.tif"
    corrupt.write_bytes(b"II*\x00" + os.urandom(3000))
    return root, model, sources, str(corrupt)


def _labels(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_region_equals_segment_raster_with_the_shared_centres(region, tmp_path):
    root, model, sources, corrupt = region
    out = tmp_path / "out"
    result = segment_region(sources[:2] + [corrupt] + sources[2:], out, 4, model, workers=2, samples=4000)
    assert set(result.failed) == {corrupt} and "tile_9.tif" in result.failed[corrupt]
    assert sorted(result.written) == sorted(sources) and not result.skipped
    # the same centres as fit_shared_centres over the readable rasters, in the order given
    shared = fit_shared_centres(sources[:2] + sources[2:], 4, load_model(model), samples=4000)
    np.testing.assert_array_equal(result.centres, shared.centres)
    m = load_model(model)
    for src in sources:
        expected = tmp_path / "one.tif"
        segment_raster(src, expected, 4, m, centres=result.centres, overwrite=True)
        (got,) = result.outputs[src]
        np.testing.assert_array_equal(_labels(got), _labels(expected))
        with rasterio.open(got) as ds:
            assert ds.tags()[REGION_TAG] and ds.crs == rasterio.open(src).crs
    assert (_labels(result.outputs[sources[2]][0])[:40, :50] == 255).all()  # nodata stays nodata
    # the VRT shows the mosaic: every tile at its place, one colour table
    with rasterio.open(result.vrt) as vrt:
        assert (vrt.width, vrt.height) == (320, 256)
        mosaic = vrt.read(1)
        np.testing.assert_array_equal(mosaic[160:, 192:], _labels(result.outputs[sources[3]][0]))
        np.testing.assert_array_equal(mosaic[:160, :192], _labels(result.outputs[sources[0]][0]))
        assert vrt.colormap(1)[0][:3] == (31, 119, 180)

    # a rerun skips what is complete, and redoes an output whose tag is not this run's
    stamps = {s: os.stat(result.outputs[s][0]).st_mtime_ns for s in sources}
    with rasterio.open(result.outputs[sources[1]][0], "r+") as ds:
        ds.update_tags(**{REGION_TAG: "another run"})
    again = segment_region(sources, out, 4, model, workers=2, samples=4000)
    assert again.written == [sources[1]] and sorted(again.skipped) == sorted(sources[:1] + sources[2:])
    assert all(os.stat(again.outputs[s][0]).st_mtime_ns == stamps[s] for s in again.skipped)
    # other centres (another k) make every output incomplete
    assert sorted(segment_region(sources, out, 3, model, workers=2, samples=4000).written) == sorted(sources)


def test_killed_run_resumes_and_the_cli_reports_failures(region, tmp_path):
    root, model, sources, corrupt = region
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "runtime", "segment-region", *sources, corrupt, "--out-dir", str(out),
           "--k", "4", "--model", str(model), "--workers", "2", "--samples", "4000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("tile_*.tif")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its workers, mid-run
    proc.communicate()
    first = {p.name for p in out.glob("tile_*.tif")}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"error: {corrupt}:" in done.stderr and "Traceback" not in done.stderr
    # outputs complete before the kill are skipped, the rest written
    assert f"{4 - len(first)} written, {len(first)} already complete, 1 failed" in done.stdout
    assert {p.name for p in out.glob("tile_*.tif")} == {f"tile_{i}.tif" for i in range(4)}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left behind
    assert (out / "region.vrt").is_file()


def test_duplicate_names_and_missing_dask_are_clear_errors(region, tmp_path, monkeypatch):
    root, model, sources, _ = region
    (tmp_path / "a").mkdir()
    twin = tmp_path / "a" / "tile_0.tif"
    twin.write_bytes(open(sources[0], "rb").read())
    proc = subprocess.run([sys.executable, "-m", "runtime", "segment-region", sources[0], str(twin), "--out-dir",
                           str(tmp_path / "out"), "--k", "4", "--model", str(model)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "would both be written to" in proc.stderr
    assert "Traceback" not in proc.stderr
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "nodask"))
    (tmp_path / "nodask" / "dask").mkdir(parents=True)
    (tmp_path / "nodask" / "dask" / "__init__.py").write_text("raise ImportError('no dask here')\n")
    proc = subprocess.run([sys.executable, "-m", "runtime", "segment-region", sources[0], "--out-dir",
                           str(tmp_path / "out2"), "--k", "4", "--model", str(model)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "pip install 'dask[distributed]'" in proc.stderr, proc.stderr


def test_a_raster_larger_than_a_block_is_one_task_per_block_without_seams(region, tmp_path):
    """Blocks of one raster (windows with the tiles' halo) join into exactly its labels: the VRT
    over the block outputs equals segment_raster on the whole raster with the same centres."""
    root, model, sources, _ = region
    result = segment_region([sources[0]], tmp_path / "out", 4, model, workers=2, samples=4000, block=64, tile=32)
    parts = result.outputs[sources[0]]
    assert len(parts) == 3 * 3 and all(p.is_file() for p in parts)  # 160 x 192 px in 64 px blocks
    assert parts[0].name == "tile_0_r0_c0.tif" and parts[-1].name == "tile_0_r128_c128.tif"
    whole = tmp_path / "whole.tif"
    segment_raster(sources[0], whole, 4, load_model(model), centres=result.centres)
    with rasterio.open(result.vrt) as vrt, rasterio.open(whole) as ref:
        assert (vrt.width, vrt.height) == (ref.width, ref.height) and vrt.transform == ref.transform
        np.testing.assert_array_equal(vrt.read(1), ref.read(1))
    assert segment_region([sources[0]], tmp_path / "out", 4, model, workers=2, samples=4000, block=64,
                          tile=32).skipped == [sources[0]]


def test_window_needs_given_centres_an_aligned_origin_and_the_raster_inside(region, tmp_path):
    from runtime.errors import InputError

    _, model, sources, _ = region
    m = load_model(model)
    c = fit_shared_centres([sources[0]], 4, m, samples=4000).centres
    for kw, words in ((dict(window=(0, 0, 64, 64)), "a window needs given centres"),
                      (dict(centres=c, window=(2, 0, 64, 64)), "multiple of the model's stride"),
                      (dict(centres=c, window=(128, 0, 64, 64)), "is not inside the 160 x 192 raster")):
        with pytest.raises(InputError, match=words):
            segment_raster(sources[0], tmp_path / "w.tif", 4, m, **kw)
        assert not (tmp_path / "w.tif").exists()
