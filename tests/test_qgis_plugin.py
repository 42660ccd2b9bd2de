"""The QGIS plugin in real QGIS (Debian 12's 3.22), headless: the zip `make plugin` builds, its
Processing algorithms run from Python (tests/qgis_checks.py, one QGIS session) and through
`qgis_process.bin`, each compared with the command line on the same inputs.

QGIS runs under `/usr/bin/python3` (its own Python, not this environment), QT_QPA_PLATFORM=offscreen,
with a fresh profile in XDG_DATA_HOME. Without QGIS the tests are skipped, except under CI, where
they fail: `.ci/run` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from runtime_fixtures import random_encoder, synthetic_rgb, write_encoder_artifact, write_raster

from runtime.cli import main as runtime_main

REPO = Path(__file__).resolve().parents[1]
QGIS_PYTHON = os.environ.get("LANDSEG_QGIS_PYTHON", "/usr/bin/python3")
QGIS_PROCESS = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"


def _qgis_missing() -> str | None:
    try:
        done = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], capture_output=True, text=True, timeout=120,
                              env=qgis_env(Path("/tmp")))
    except OSError as e:
        return f"{QGIS_PYTHON}: {e}"
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no qgis.core"])[-1]


def build_plugin(model: Path, out: Path) -> Path:
    """qgis_plugin/build.py's `build` (what `make plugin` runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("landseg_plugin_build", REPO / "qgis_plugin" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(model, out)


def qgis_env(profile: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # QGIS's embedded Python takes its prefix from the first python3 on PATH: a virtual environment's
    # there (make puts .venv/bin first) gives it another Python's library, and qgis_process crashes
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin"] + [d for d in env.get("PATH", "").split(os.pathsep)
                                                          if d and not (Path(d) / "activate").exists()])
    env.update(QT_QPA_PLATFORM="offscreen", XDG_DATA_HOME=str(profile), XDG_RUNTIME_DIR=str(profile))
    return env


_MISSING = _qgis_missing()
if _MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the QGIS plugin tests, but QGIS is not importable: {_MISSING} "
                       "(.ci/run installs qgis python3-qgis qgis-providers)")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"no QGIS: {_MISSING}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("qgis")
    work = root / "work"
    work.mkdir()
    model = write_encoder_artifact(root / "model", random_encoder(width=8, depth=1, embed_dim=4, seed=5),
                                   training_pixel_size_m=0.6)
    write_raster(work / "in.tif", synthetic_rgb(300, 350, seed=1))
    write_raster(work / "in2.tif", synthetic_rgb(200, 220, seed=2))
    # 2 x 2 tiles of the default 2048 px, so that a cancel at 30 % lands between tiles
    write_raster(work / "big.tif", synthetic_rgb(2100, 2100, seed=3))
    write_raster(work / "gray.tif", synthetic_rgb(64, 64)[..., :1])
    (work / "corrupt_model").mkdir()
    for name in ("model.npz", "meta.json", "metrics.json"):
        (work / "corrupt_model" / name).write_bytes(b"not a model")
    zip_path = build_plugin(model, root / "dist")
    plugins = root / "plugins"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(plugins)
    done = subprocess.run([QGIS_PYTHON, str(REPO / "tests" / "qgis_checks.py"), str(plugins), str(work),
                           str(root / "found.json")], capture_output=True, text=True, timeout=600,
                          env=qgis_env(root / "profile"))
    assert done.returncode == 0, done.stdout + done.stderr
    return {"root": root, "work": work, "model": model, "zip": zip_path,
            "found": json.loads((root / "found.json").read_text())}


def cli(*args) -> None:
    assert runtime_main([str(a) for a in args]) == 0


def same_raster(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert np.array_equal(x.read(), y.read())
        assert (x.crs, x.transform, x.nodata, x.colormap(1), x.tags()) == (y.crs, y.transform, y.nodata,
                                                                          y.colormap(1), y.tags())


def test_the_provider_offers_the_four_algorithms(world):
    assert world["found"]["algorithms"] == ["landseg:fitcentres", "landseg:info", "landseg:polygons", "landseg:segment"]


def test_processing_segment_gives_the_command_lines_labels(world, tmp_path):
    assert world["found"]["segment_error"] is None
    cli("segment", world["work"] / "in.tif", tmp_path / "cli.tif", "--k", 4, "--model", world["model"], "--quiet")
    same_raster(world["work"] / "qgis.tif", tmp_path / "cli.tif")


def test_the_loaded_layer_is_valid_in_the_inputs_crs_and_extent_with_one_legend_entry_per_cluster(world):
    loaded = world["found"]["loaded"]
    assert loaded["valid"] and loaded["crs_equal"] and loaded["extent_equal"]
    assert loaded["renderer"] == "paletted"
    assert [value for value, _ in loaded["classes"]] == [0, 1, 2, 3]
    assert [label.split(" (")[0] for label in loaded["legend"]] == [f"cluster {i}" for i in range(4)]
    shares = [float(label.split("(")[1].rstrip(" %)")) for label in loaded["legend"]]
    assert abs(sum(shares) - 100.0) < 0.3


def test_cancel_mid_raster_leaves_no_output(world):
    cancel = world["found"]["cancel"]
    assert cancel["error"].startswith("cancelled: cancelled after") and "of 4 tiles" in cancel["error"]
    assert not cancel["output_exists"] and cancel["leftovers"] == []


@pytest.mark.parametrize("case,words", [("one_band", "has 1 band(s); an RGB raster with at least 3 bands"),
                                        ("k_out_of_range", "k must be an integer in 2..8"),
                                        ("corrupt_model", "meta.json: not readable JSON")])
def test_bad_input_fails_with_the_runtimes_message_and_no_output(world, case, words):
    bad = world["found"]["bad"][case]
    assert words in bad["error"] and not bad["output_exists"]
    assert world["found"]["leftovers"] == []


def test_polygon_area_per_cluster_equals_the_sieved_rasters(world):
    polys = world["found"]["polygons"]
    assert polys["error"] is None and polys["crs_equal"] and polys["features"] >= 4
    with rasterio.open(world["work"] / "sieved.tif") as ds:
        labels = ds.read(1)
        pixel = abs(ds.transform.a * ds.transform.e)
    counts = np.bincount(labels[labels != 255].ravel())
    expected = {str(c): n * pixel for c, n in enumerate(counts) if n}
    assert set(polys["area"]) == set(expected)
    for c, area in expected.items():
        assert abs(polys["area"][c] - area) < 1e-6 * area, c
    # every patch of the sieved raster holds at least the minimum mapping unit (20 m2 = 56 pixels)
    from scipy import ndimage

    for c in range(len(counts)):
        sizes = np.bincount(ndimage.label(labels == c)[0].ravel())[1:]
        assert sizes.size == 0 or sizes.min() * pixel >= 20.0 - 1e-9


def test_fit_shared_centres_equals_the_command_line(world, tmp_path):
    assert world["found"]["fitcentres_error"] is None
    cli("fit-centres", world["work"] / "in.tif", world["work"] / "in2.tif", "--k", 4, "--model", world["model"],
        "--out", tmp_path / "cli.npy", "--quiet")
    assert np.array_equal(np.load(world["work"] / "shared_qgis.npy"), np.load(tmp_path / "cli.npy"))


def test_model_information_reports_the_bundled_model(world):
    assert world["found"]["info"] == {"error": None, "max_k": 8, "pixel_size": 0.6}


def test_the_zip_installs_into_a_fresh_profile_and_runs_through_qgis_process(world, tmp_path):
    profile = tmp_path / "xdg"
    plugins = profile / "QGIS" / "QGIS3" / "profiles" / "default" / "python" / "plugins"
    with zipfile.ZipFile(world["zip"]) as z:
        z.extractall(plugins)
    env = qgis_env(profile)
    enable = subprocess.run([QGIS_PROCESS, "plugins", "enable", "landseg"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert enable.returncode == 0, enable.stdout + enable.stderr
    out = tmp_path / "out.tif"
    done = subprocess.run([QGIS_PROCESS, "run", "landseg:segment", "--", f"INPUT={world['work'] / 'in.tif'}",
                           "CLUSTERS=4", f"OUTPUT={out}"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    cli("segment", world["work"] / "in.tif", tmp_path / "cli.tif", "--k", 4, "--model", world["model"], "--quiet")
    same_raster(out, tmp_path / "cli.tif")


def test_the_zip_vendors_the_runtime_and_the_model_and_is_reproducible(world, tmp_path):
    names = zipfile.ZipFile(world["zip"]).namelist()
    assert all(n.startswith("landseg/") for n in names)
    assert {"landseg/runtime/raster.py", "landseg/runtime/io_gdal.py", "landseg/model/model.npz",
            "landseg/metadata.txt", "landseg/__init__.py"} <= set(names)
    meta = zipfile.ZipFile(world["zip"]).read("landseg/metadata.txt").decode()
    assert "hasProcessingProvider=yes" in meta and "version=0.1.0" in meta and "VERSION" not in meta
    again = build_plugin(world["model"], tmp_path)
    assert again.read_bytes() == world["zip"].read_bytes()
