"""The two raster I/O backends give the same result: `segment` and `fit-centres` run by QGIS's kind of
Python (GDAL's own bindings; importing rasterio, torch, scipy or stages raises) against the same
commands in this environment (rasterio), on the same inputs and options.

The numpy-only side runs `/usr/bin/python3` (Debian's, as QGIS uses it; LANDSEG_QGIS_PYTHON
overrides) through tests/numpy_only_python.py. Where that Python lacks `osgeo.gdal` the tests are
skipped, except under CI, where they fail: `.ci/run` installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from runtime_fixtures import random_encoder, synthetic_rgb, write_encoder_artifact, write_raster

from runtime.cli import main as runtime_main

REPO = Path(__file__).resolve().parents[1]
QGIS_PYTHON = os.environ.get("LANDSEG_QGIS_PYTHON", "/usr/bin/python3")
RUNNER = REPO / "tests" / "numpy_only_python.py"


def _gdal_python() -> str | None:
    """Why the numpy-only Python cannot run the GDAL backend, or None when it can."""
    try:
        done = subprocess.run([QGIS_PYTHON, "-c", "from osgeo import gdal; import numpy"], capture_output=True,
                              text=True, timeout=60)
    except OSError as e:
        return f"{QGIS_PYTHON}: {e}"
    return None if done.returncode == 0 else f"{QGIS_PYTHON}: {done.stderr.strip().splitlines()[-1]}"


_MISSING = _gdal_python()
if _MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the GDAL backend tests, but {_MISSING} (.ci/run installs python3-gdal)")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"no GDAL bindings: {_MISSING}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("backends")
    write_encoder_artifact(w / "model", random_encoder(width=8, depth=1, embed_dim=4, seed=3), training_pixel_size_m=0.6)
    rgb = synthetic_rgb(157, 203, seed=1)  # odd sizes: partial tiles and cells at the edges
    write_raster(w / "geo.tif", rgb)
    with rasterio.open(w / "plain.tif", "w", driver="GTiff", width=203, height=157, count=3, dtype="uint8") as ds:
        ds.write(rgb.transpose(2, 0, 1))
    holes = rgb.copy()
    holes[40:70, 50:120] = 0
    write_raster(w / "nodata.tif", holes, nodata=0)
    alpha = np.dstack([rgb, np.where(np.arange(203)[None, :] < 150, 255, 0).repeat(157, 0).astype(np.uint8)])
    profile = {"driver": "GTiff", "width": 203, "height": 157, "count": 4, "dtype": "uint8", "crs": "EPSG:32611",
               "transform": from_origin(500000.0, 4000000.0, 0.6, 0.6), "photometric": "RGB", "alpha": "UNASSOCIATED"}
    with rasterio.open(w / "alpha.tif", "w", **profile) as ds:
        ds.write(alpha.transpose(2, 0, 1))
    write_raster(w / "u16.tif", rgb.astype(np.uint16) * 37 + 500)
    write_raster(w / "coarse.tif", synthetic_rgb(61, 77, seed=2), pixel=1.5)
    write_raster(w / "fine.tif", synthetic_rgb(190, 230, seed=4), pixel=0.2)
    return w


CASES = {
    "georeferenced": "geo.tif --tile 64",
    "no-crs-no-geotransform": "plain.tif",
    "no-crs-declared-pixel-size": "plain.tif --raster-pixel-size 1.2",
    "nodata-value": "nodata.tif --tile 64",
    "alpha-band": "alpha.tif --bands 1,2,3",
    "16-bit-stretched": "u16.tif",
    "16-bit-fixed-limits": "u16.tif --rescale 500,9000",
    "coarser-resampled": "coarse.tif --tile 64",
    "finer-resampled": "fine.tif",
    "overviews-and-artifact-options": "geo.tif --overviews --smooth-iters 2 --balance 0 --seed 3",
}


def _gdal_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin", env.get("PATH", "")])
    return subprocess.run([QGIS_PYTHON, str(RUNNER), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def _same_output(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert np.array_equal(x.read(), y.read()), "labels differ"
        assert (x.crs, x.transform, x.width, x.height, x.nodata) == (y.crs, y.transform, y.width, y.height, y.nodata)
        assert x.colormap(1) == y.colormap(1)
        assert x.tags() == y.tags() and x.descriptions == y.descriptions
        assert x.overviews(1) == y.overviews(1)
        assert x.profile == y.profile


@pytest.mark.parametrize("name", list(CASES))
def test_gdal_backend_writes_what_the_rasterio_backend_writes(name, world, tmp_path):
    options = CASES[name].split()
    src, rest = options[0], options[1:]
    args = ["segment", str(world / src), "OUT", "--k", "4", "--model", str(world / "model"), "--quiet", *rest]
    assert runtime_main([a.replace("OUT", str(tmp_path / "rasterio.tif")) for a in args]) == 0
    done = _gdal_run([a.replace("OUT", str(tmp_path / "gdal.tif")) for a in args], tmp_path)
    assert done.returncode == 0, done.stderr
    _same_output(tmp_path / "gdal.tif", tmp_path / "rasterio.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gdal.tif", "rasterio.tif"]  # no temporaries left


def test_gdal_backend_fits_the_same_shared_centres(world, tmp_path):
    args = ["fit-centres", *(str(world / f) for f in ("geo.tif", "coarse.tif", "nodata.tif")), "--k", "4",
            "--model", str(world / "model"), "--quiet", "--out"]
    assert runtime_main(args + [str(tmp_path / "r.npy")]) == 0
    done = _gdal_run(args + [str(tmp_path / "g.npy")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "g.npy"), np.load(tmp_path / "r.npy"))


def test_numpy_only_python_reports_bad_input_like_the_cli(world, tmp_path):
    """The GDAL backend's errors: one line, exit 2, GDAL's own words, nothing written."""
    (tmp_path / "garbage.tif").write_bytes(b"not a raster" * 100)
    for args, words in [(["segment", "garbage.tif", "o.tif"], "not recognized as"),
                        (["segment", "missing.tif", "o.tif"], "No such file or directory"),
                        (["segment", str(world / "geo.tif"), "o.tif", "--k", "99"], "k must be an integer in 2..8")]:
        done = _gdal_run([*args, *(["--k", "4"] if "--k" not in args else []), "--model", str(world / "model")], tmp_path)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "o.tif").exists()


def test_the_numpy_only_python_cannot_import_rasterio_torch_scipy_or_stages():
    code = f"""
import importlib, json, runpy
runpy.run_path({str(RUNNER)!r})
bad = []
for m in ("rasterio", "torch", "scipy", "stages"):
    try:
        importlib.import_module(m)
        bad.append(m)
    except ImportError:
        pass
from runtime.raster_io import backend
print(json.dumps({{"importable": bad, "backend": backend().NAME}}))
"""
    done = subprocess.run([QGIS_PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"importable": [], "backend": "gdal"}


def test_routed_blas_makes_numpys_own_calls():
    """`runtime._blas.RoutedBlas` (numpy's BLAS bound by handle, used where QGIS's GSL CBLAS shadows
    it) gives bit for bit np.matmul's results in Debian's numpy, for the layouts the runtime uses:
    transposed views, a matrix times its own transpose (syrk), strided 3-D batches, an `out` array."""
    code = f"""
import ctypes, json, sys
import numpy as np
sys.path.insert(0, {str(REPO)!r})
from runtime import _blas
np.dot(np.ones((2, 2)), np.ones((2, 2)))
path = [p for p in _blas._loaded_libraries("blas") if "gslcblas" not in p][0]
routed = _blas.RoutedBlas(ctypes.CDLL(path), path)
rng = np.random.default_rng(0)
same = {{}}
for dt in (np.float32, np.float64):
    x, c, p = (rng.standard_normal(s).astype(dt) for s in ((500, 9), (5, 9), (500, 5)))
    batch, w = rng.standard_normal((7, 40, 30)).astype(dt), rng.standard_normal((30, 16)).astype(dt)
    cases = {{"x c.T": (x, c.T), "p.T x": (p.T, x), "c c.T": (c, c.T), "F F": (np.asfortranarray(x), np.asfortranarray(c.T)),
             "strided batch": (batch[:, ::2], w), "batch": (batch, w), "vector": (x, c[0])}}
    for name, (a, b) in cases.items():
        same[f"{{dt.__name__}} {{name}}"] = bool(np.array_equal(np.matmul(a, b), routed.matmul(a, b)))
    o1, o2 = np.empty((7, 20, 16), dt), np.empty((7, 20, 16), dt)
    np.matmul(batch[:, ::2], w, out=o1)
    routed.matmul(batch[:, ::2], w, out=o2)
    same[f"{{dt.__name__}} out"] = bool(np.array_equal(o1, o2))
print(json.dumps(same))
"""
    done = subprocess.run([QGIS_PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    same = json.loads(done.stdout)
    assert len(same) == 16 and all(same.values()), same
