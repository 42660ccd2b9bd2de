"""Shared fixtures: tiny rasters, tiny params, a tiny ingested + sharded synthetic dataset.

Everything here is small (scenes of 128 px, tiles of 64 px) so the data tests stay fast on 2 cores.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from stages.params import Params, parse_params

REPO = Path(__file__).resolve().parents[1]

# A projected CRS with 0.5 m pixels: the default grid of rasters written by `write_raster`.
UTM = "EPSG:32611"
GRID = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0)


def write_raster(path: Path, data: np.ndarray, *, crs=UTM, transform=GRID, driver: str = "GTiff",
                 nodata=None, **extra) -> Path:
    """Write (C, H, W) or (H, W) `data`; crs=None and transform=None give an ungeoreferenced file."""
    arr = data[None] if data.ndim == 2 else data
    profile = {"driver": driver, "width": arr.shape[2], "height": arr.shape[1], "count": arr.shape[0],
               "dtype": arr.dtype.name, **extra}
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr)
    return path


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


def blocky_labels(h: int, w: int, classes: int, seed: int = 0, block: int = 8) -> np.ndarray:
    """Piecewise-constant labels 1..classes (blocks of `block` px), so nearest warping is checkable."""
    coarse = np.random.default_rng(seed).integers(1, classes + 1, (-(-h // block), -(-w // block)))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_raw(**overrides) -> dict:
    """A params mapping: 4 synthetic scenes of 128 px, 3 labelled, tiles of 64 px."""
    raw = {
        "ingest": {"synthetic": {"num_scenes": 4, "scene_size": 128, "labelled_fraction": 0.75}},
        "shards": {"tile_size": 64, "metrics_train_fraction": 0.25},
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(tiny_raw())


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """data/raw and data/shards of the tiny synthetic params, built once per session (read-only!)."""
    from stages.build_shards import build_shards
    from stages.ingest import ingest

    root = tmp_path_factory.mktemp("tiny")
    params = parse_params(tiny_raw())
    ingest(params.ingest, root / "raw")
    build_shards(root / "raw", root / "shards", params.ingest.dataset, params.shards)
    return root / "shards" / "synthetic"


def pytest_terminal_summary(terminalreporter):
    """One line counting the tests that ran in real QGIS or in its Python (CI's log shows them run)."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            name = getattr(report, "nodeid", "")
            if "test_qgis_plugin.py" in name or "test_raster_backends.py" in name:
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        terminalreporter.write_line("QGIS and QGIS-Python tests: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
