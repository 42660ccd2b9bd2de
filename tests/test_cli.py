"""The command line: `python -m runtime segment ...` / `landseg-segment`, and `python -m runtime info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from runtime_fixtures import random_encoder, synthetic_rgb, write_encoder_artifact, write_raster

from runtime.cli import cluster_share_lines, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = write_encoder_artifact(root / "best", random_encoder(width=8, depth=1, embed_dim=4))
    src = write_raster(root / "in.tif", synthetic_rgb(70, 90, seed=1))
    return root, model, src


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_help_explains_inputs_outputs_and_options(tmp_path):
    res = _run("--help", cwd=tmp_path)
    assert res.returncode == 0
    for text in ("IN", "OUT", "--k", "--model", "--bands", "--tile", "--overwrite", "--overviews",
                 "nodata", "cluster id", "examples:", "exit status"):
        assert text in res.stdout, text


def test_segment_writes_output_and_reuses_saved_centres(setup, tmp_path):
    root, model, src = setup
    out, centres = tmp_path / "out.tif", tmp_path / "c.npy"
    res = _run("segment", src, out, "--k", 3, "--model", model, "--tile", 32, "--overviews",
               "--save-centres", centres, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stderr and "3 clusters" in res.stderr
    assert "clusters (% of valid pixels): 0: " in res.stderr
    assert "own resolution: the model does not record its training pixel size" in res.stderr
    with rasterio.open(out) as ds:
        labels = ds.read(1)
        assert labels.shape == (70, 90) and labels.max() < 3 and ds.overviews(1) == [2]
    assert np.load(centres).shape == (3, 4)
    # the console-script form (no sub-command) with saved centres and a different tile reproduces it
    assert main([str(src), str(tmp_path / "again.tif"), "--k", "3", "--model", str(model),
                 "--centres", str(centres), "--quiet"]) == 0
    with rasterio.open(tmp_path / "again.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), labels)


def test_cluster_shares_name_the_near_empty_clusters():
    assert cluster_share_lines(np.array([600, 400])) == ["clusters (% of valid pixels): 0: 60.0, 1: 40.0"]
    lines = cluster_share_lines(np.array([985, 5, 10, 0]))
    assert lines[0] == "clusters (% of valid pixels): 0: 98.5, 1: 0.5, 2: 1.0, 3: 0.0"
    assert lines[1].startswith("note: clusters 1, 3 cover less than 1 % of the valid pixels")
    assert "--k 4" in lines[1]
    assert cluster_share_lines(np.array([990, 10, 0]))[1].startswith("note: cluster 2 covers less")
    assert cluster_share_lines(np.zeros(3, np.int64)) == ["clusters: no valid pixel (every output pixel is nodata)"]


def test_raster_without_georeferencing_gets_one_note_not_rasterio_warnings(setup, tmp_path):
    root, model, _ = setup
    src = tmp_path / "plain.tif"  # like a JPEG: no CRS, no geotransform
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(src, "w", driver="GTiff", width=40, height=36, count=3, dtype="uint8") as ds:
            ds.write(synthetic_rgb(36, 40, seed=2).transpose(2, 0, 1))
    res = _run("segment", src, tmp_path / "out.tif", "--k", 2, "--model", model, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "NotGeoreferencedWarning" not in res.stderr
    assert f"note: {src} has no CRS and no geotransform, so {tmp_path / 'out.tif'} has none either" in res.stderr
    georef = _run("segment", setup[2], tmp_path / "geo.tif", "--k", 2, "--model", model, cwd=tmp_path)
    assert georef.returncode == 0 and "no CRS and no geotransform" not in georef.stderr


def test_pixel_size_option(setup, tmp_path, capsys):
    root, model, src = setup
    assert main([str(src), str(tmp_path / "coarse.tif"), "--k", "3", "--model", str(model),
                 "--pixel-size", "1.2"]) == 0
    assert "resampled from 0.6 m to 1.2 m" in capsys.readouterr().err
    with rasterio.open(tmp_path / "coarse.tif") as ds, rasterio.open(src) as s:
        assert (ds.width, ds.height, ds.transform) == (s.width, s.height, s.transform)
    for bad in ("0", "-1", "fine"):
        with pytest.raises(SystemExit) as e:
            main([str(src), str(tmp_path / "x.tif"), "--k", "3", "--model", str(model), "--pixel-size", bad])
        assert e.value.code == 2 and "auto, native or a positive number of metres" in capsys.readouterr().err
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize("extra,message", [
    (["--k", "12"], "k must be an integer in 2..8"),
    (["--k", "3", "--tile", "30"], "multiple of 4"),
    (["--k", "3", "--model", "nowhere"], "model artifact directory not found"),
    (["--k", "3", "--centres", "missing.npy"], "cannot read centres"),
    (["--k", "3", "--balance", "-2"], "balance must be an integer >= 0"),
])
def test_bad_input_exits_2_with_a_message_and_no_output(setup, tmp_path, capsys, extra, message):
    root, model, src = setup
    args = [str(src), str(tmp_path / "out.tif"), "--model", str(model), *extra]
    if "--model" in extra:
        args = [str(src), str(tmp_path / "out.tif"), *extra]
    assert main(["segment", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out.tif").exists()


def test_existing_output_and_unreadable_input_exit_2(setup, tmp_path, capsys):
    root, model, src = setup
    out = tmp_path / "out.tif"
    out.write_bytes(b"keep")
    assert main([str(src), str(out), "--k", "3", "--model", str(model)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    assert main([str(bad), str(tmp_path / "o.tif"), "--k", "3", "--model", str(model)]) == 2
    assert "GDAL cannot read" in capsys.readouterr().err


def test_fit_centres_over_several_rasters_then_segment_each_with_them(setup, tmp_path, capsys):
    root, model, src = setup
    other = write_raster(tmp_path / "other.tif", synthetic_rgb(60, 140, seed=5))
    out = tmp_path / "area.npy"
    assert main(["fit-centres", str(src), str(other), "--k", "3", "--model", str(model), "--out", str(out),
                 "--samples", "800"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}: 3 centres fitted on 800 cells of 2 raster(s)" in err
    # cells by area: 70 x 90 and 60 x 140 pixels
    assert f"{src}: 343 cells; at the raster's own resolution" in err and f"{other}: 457 cells; at the" in err
    assert "--centres" in err and not list(tmp_path.glob(".area.npy*"))
    centres = np.load(out)
    assert centres.shape == (3, 4) and centres.dtype == np.float32
    for i, raster in enumerate((src, other)):
        assert main(["segment", str(raster), str(tmp_path / f"s{i}.tif"), "--k", "3", "--model", str(model),
                     "--centres", str(out), "--quiet"]) == 0
        with rasterio.open(tmp_path / f"s{i}.tif") as ds:
            assert ds.tags()["landseg_centres"] == "given"
    # an existing --out is kept unless --overwrite, and a bad input writes nothing
    before = out.read_bytes()
    assert main(["fit-centres", str(src), "--k", "3", "--model", str(model), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["fit-centres", str(src), "--k", "3", "--model", str(model), "--out", str(out), "--overwrite",
                 "--quiet"]) == 0
    assert out.read_bytes() != before
    fresh = tmp_path / "fresh.npy"
    assert main(["fit-centres", str(src), str(tmp_path / "missing.tif"), "--k", "3", "--model", str(model),
                 "--out", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.tif" in err and not fresh.exists()
    assert main(["fit-centres", str(src), "--k", "12", "--model", str(model), "--out", str(fresh)]) == 2
    assert "k must be an integer in 2..8" in capsys.readouterr().err and not fresh.exists()


def test_info_prints_meta_and_metrics(setup, capsys):
    root, model, src = setup
    assert main(["info", "--model", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["meta"]["format"] == "landseg-segmenter" and info["metrics"] == {"note": "random weights"}


def test_console_script_is_installed_and_runs(tmp_path):
    # declared in pyproject.toml as landseg-segment = runtime.cli:main (installed by `make setup`)
    script = Path(sys.executable).parent / "landseg-segment"
    assert script.exists(), f"{script} missing: reinstall the project (pip install -e .)"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage: landseg-segment")
