"""The benchmark scripts still run (at toy sizes): they build their own inputs, so a change to a
stage's input format must not leave them broken until someone next measures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("script, args", [
    ("build_shards_bench.py", ["--sizes", "256", "512", "--tile", "128"]),
    ("train_bench.py", ["--steps", "2", "--repeats", "1"]),
    ("train_dist_bench.py", ["--steps", "2", "--repeats", "1"]),
    ("runtime_bench.py", ["--size", "256", "--repeats", "1", "--skip-rss", "--skip-other-kernel"]),
    ("runtime_bench.py", ["--layers", "--size", "256", "--repeats", "1"]),
    ("region_bench.py", ["--rasters", "2", "--size", "256", "--workers", "1", "2"]),
])
def test_benchmark_runs_at_toy_size(script, args):  # from the repository root, as `make bench` does
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    if script != "build_shards_bench.py":  # the others end with a JSON summary line
        assert isinstance(json.loads(last), dict)


def test_colour_shift_check_runs_on_a_labelled_split(tiny_dataset, tmp_path):
    """The by-hand colour-shift check: one JSON line per run, a score per method and strength."""
    from runtime_fixtures import random_encoder, write_encoder_artifact

    model = write_encoder_artifact(tmp_path / "model", random_encoder())
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "colour_shift_check.py"),
                           "--shards", str(tiny_dataset), "--model", str(model), "--strengths", "0", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for s in ("0", "2"):
        assert {f"model@{s}", f"kmeans_rgb@{s}", f"kmeans_features@{s}"} <= set(result)
        assert 0.0 <= result[f"model@{s}"] <= 1.0


def test_shared_centres_check_runs_on_ingested_rasters(tiny_dataset, tmp_path):
    """The by-hand shared-centres check: one JSON line, both ways of fitting under both protocols."""
    from runtime_fixtures import random_encoder, write_encoder_artifact

    model = write_encoder_artifact(tmp_path / "model", random_encoder())
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "shared_centres_check.py"),
                           "--raw", str(tiny_dataset.parents[1] / "raw"), "--model", str(model)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("per_raster/global", "per_raster/per_raster", "shared/global", "shared/per_raster"):
        assert 0.0 <= result[name] <= 1.0
    assert result["rasters"] >= 2 and len(result["cells"]) == result["rasters"]


def test_general_images_leaves_out_each_sets_val(tmp_path):
    """general_images.py links every image of a set except those build_shards would put in val
    (labelled, by their group's hash), unlabelled ones included; a bad set writes nothing."""
    from conftest import blocky_labels, random_rgb, write_raster

    from stages.build_shards import group_key, labelled_split

    root = tmp_path / "set"
    names = [f"a{g}_{i}" for g in range(6) for i in range(2)]
    for n, name in enumerate(names):
        write_raster(root / "images" / f"{name}.tif", random_rgb(8, 8, seed=n))
        if name != "a0_1":  # one image without a label: always train
            write_raster(root / "labels" / f"{name}.tif", blocky_labels(8, 8, 2, seed=n)[None])
    splits = {name: "train" if name == "a0_1" else labelled_split(group_key(name, r"a(\d+)_"), 0.25, 0.3)
              for name in names}
    assert "val" in splits.values() and set(splits.values()) - {"val"}
    script = [sys.executable, str(REPO / "benchmarks" / "general_images.py")]
    out = tmp_path / "general" / "images"
    proc = subprocess.run([*script, "--out", str(out), "--set", "s", str(root), r"a(\d+)_", "0.3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"s_{n}.tif" for n, s in splits.items() if s != "val")
    assert all((out / f"s_{n}.tif").resolve() == (root / "images" / f"{n}.tif").resolve()
               for n, s in splits.items() if s != "val")
    bad = subprocess.run([*script, "--out", str(tmp_path / "none"), "--set", "s", str(tmp_path / "missing"), "", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing/images is not a folder" in bad.stderr
    assert not (tmp_path / "none").exists()
