"""Shared fixtures: tiny rasters, tiny params, a tiny ingested + sharded synthetic dataset.

Everything here is small (scenes of 128 px, tiles of 64 px) so the data tests stay fast on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

from stages.params import (
    AugParams,
    DataParams,
    DistillParams,
    LossParams,
    ModelParams,
    Params,
    StudentParams,
    TrainParams,
    parse_params,
)
from stages.synthetic import render_scene

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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers the tests start on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# Training: contract-format shards written directly, a tiny teacher and student


def write_tiny_shards(root: Path, scenes: int = 4, size: int = 128, tile: int = 64) -> Path:
    """Contract-format shards of small synthetic scenes: even scenes unlabelled (train), scene 1
    labelled metrics_train, other odd scenes val. Returns the dataset root."""
    counts = {"train": 0, "metrics_train": 0, "val": 0}
    index = {s: [] for s in counts}
    for sc in range(scenes):
        rgb = np.zeros((3, size, size), np.uint8)
        lab = np.zeros((size, size), np.uint8)
        for r0, block, lblock in render_scene(0, sc, size, 4.0):
            rgb[:, r0:r0 + block.shape[1]] = block
            lab[r0:r0 + lblock.shape[0]] = lblock
        split = "train" if sc % 2 == 0 else ("metrics_train" if sc == 1 else "val")
        shard = root / split / "shard-00000"
        shard.mkdir(parents=True, exist_ok=True)
        for r in range(0, size, tile):
            for c in range(0, size, tile):
                item = f"s{sc}_{r}_{c}"
                profile = dict(driver="GTiff", width=tile, height=tile, dtype="uint8", crs="EPSG:32611",
                               transform=from_origin(500000 + c * 0.6, 4000000 - r * 0.6, 0.6, 0.6))
                with rasterio.open(shard / f"{item}.tif", "w", count=3, **profile) as dst:
                    dst.write(rgb[:, r:r + tile, c:c + tile])
                target, hist = None, None
                if split != "train":
                    with rasterio.open(shard / f"{item}.label.tif", "w", count=1, **profile) as dst:
                        dst.write(lab[None, r:r + tile, c:c + tile])
                    target = f"{item}.label.tif"
                    vals, n = np.unique(lab[r:r + tile, c:c + tile], return_counts=True)
                    hist = {str(int(v)): int(k) for v, k in zip(vals, n)}
                index[split].append({"item_id": item, "split": split, "input": f"{item}.tif", "target": target,
                                     "source_item": f"s{sc}", "group": f"s{sc}", "window": [c, r, tile, tile],
                                     "class_hist": hist})
                counts[split] += 1
    for split, rows in index.items():
        shard = root / split / "shard-00000"
        shard.mkdir(parents=True, exist_ok=True)
        (shard / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "summary.json").write_text(json.dumps({
        "dataset": "tiny", "num_classes": 6, "class_names": None, "counts": counts, "class_hist": {},
        "pixel_size_m": {"train": 0.6, "metrics_train": 0.6, "val": 0.6}, "params_hash": "tiny",
        "input_rescale": {"mode": "none", "limits": None}}))
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """`write_tiny_shards` once per session (read-only!)."""
    return write_tiny_shards(tmp_path_factory.mktemp("shards") / "tiny")


def tiny_training_params(steps=6, **train):
    """(aug, model, loss, train) params of a tiny teacher run."""
    model = ModelParams(width=16, depth=1, embed_dim=8, max_k=4)
    t = dict(steps=steps, batch_size=2, patch_size=32, val_every=3, checkpoint_every=2)
    t.update(train)
    return AugParams(), model, LossParams(), TrainParams(**t)


def train_tiny_teacher(tmp: Path, dataset: Path, params, **kw):
    """train_teacher on CPU, 1 thread, without progress: tmp/teacher, tmp/ckpt, tmp/results."""
    from stages.train import train_teacher
    from stages.training import Execution

    kw.setdefault("execution", Execution(device="cpu", threads=1))
    return train_teacher(dataset, tmp / "teacher", tmp / "ckpt", tmp / "results", *params, progress=False, **kw)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_shards):
    tmp = tmp_path_factory.mktemp("teacher")
    train_tiny_teacher(tmp, tiny_shards, tiny_training_params(steps=4, val_every=4))
    return tmp / "teacher"


def tiny_student(steps=6, **distill):
    d = dict(steps=steps, batch_size=2, val_every=3, checkpoint_every=2)
    d.update(distill)
    return StudentParams(width=8, depth=1, embed_dim=6), DataParams(patch_sizes=[32, 48]), DistillParams(**d)


def distil(tmp, dataset, teacher_dir, params=None, model=None, **kw):
    """train_student from `teacher_dir` on CPU, 1 thread: tmp/student, tmp/ckpt, tmp/results."""
    from stages.train_distill import train_student
    from stages.training import Execution

    _, model_params, loss, train = tiny_training_params()
    student, data, distill = params or tiny_student()
    kw.setdefault("execution", Execution(device="cpu", threads=1))
    return train_student(dataset, teacher_dir, tmp / "student", tmp / "ckpt", tmp / "results",
                         model or model_params, loss, student, data, distill, train, progress=False, **kw)
