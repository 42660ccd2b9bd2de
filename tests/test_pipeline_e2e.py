"""The whole DAG through DVC, in a temporary git clone of the committed HEAD, with tiny params.

1. `dvc repro` runs all six stages; `dvc metrics show` lists the model's and every baseline's
   mIoU under both protocols.
2. The review workflow: commit, then `dvc exp run -S distill.ema_decay=0.99` reruns exactly
   train_distill, export and evaluate (the data stages and the teacher are untouched) and changes
   the exported weights; `dvc metrics diff` reports the changed distillation losses.
3. `dvc exp run -S distill.lr=0.03`: `dvc metrics diff` reports the model's evaluate metrics
   against the commit, and no change for the baselines.

And `dvc repro` on a folder of the user's own rasters without labels (local provider) completes,
with the label-free figures in `dvc metrics show`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from conftest import REPO

STAGES = ("ingest", "build_shards", "train", "train_distill", "export", "evaluate")

# Small enough for ~1 minute on 2 cores, big enough that val has labelled tiles and training
# has unlabelled ones (the split is a stable hash of the scene id, so these numbers are checked).
TINY = {
    "ingest": {"synthetic": {"num_scenes": 4, "scene_size": 128, "labelled_fraction": 0.75}},
    "shards": {"tile_size": 64},
    "model": {"width": 16, "depth": 1, "embed_dim": 8},
    "train": {"steps": 4, "batch_size": 2, "patch_size": 48, "val_every": 2, "checkpoint_every": 2},
    "student": {"width": 8, "depth": 1, "embed_dim": 8},
    "data": {"patch_sizes": [32, 48]},
    # One validation, at the last step: the exported student is the final one, so the experiment's
    # change of EMA decay reaches model/best (with earlier validations both runs could pick step 2).
    "distill": {"steps": 4, "batch_size": 2, "val_every": 4, "checkpoint_every": 4},
    "evaluate": {"samples_per_tile": 256, "global_samples": 4096, "kmeans_iters": 10, "kmeans_restarts": 1,
                 "num_overlays": 1},
}


def merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict):
            merge(base.setdefault(key, {}), value)
        else:
            base[key] = value
    return base


def clone_with(tmp_path: Path, over: dict) -> tuple[Path, dict, str]:
    """A git clone of HEAD with params.yaml merged with `over`; its environment and dvc binary."""
    repo = tmp_path / "clone"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0", "OMP_NUM_THREADS": "1", "LANDSEG_THREADS": "1",
           "GIT_AUTHOR_NAME": "e2e", "GIT_AUTHOR_EMAIL": "e2e@example.invalid",
           "GIT_COMMITTER_NAME": "e2e", "GIT_COMMITTER_EMAIL": "e2e@example.invalid"}
    run(["git", "clone", "--quiet", str(REPO), str(repo)], tmp_path, env)
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), over)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo, env, str(bin_dir / "dvc")


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_whole_dag_then_experiment(tmp_path):
    repo, env, dvc = clone_with(tmp_path, TINY)

    # 1. The whole DAG.
    out = run([dvc, "repro"], repo, env)
    assert stages_run(out) == set(STAGES), out
    summary = json.loads((repo / "data/shards/synthetic/summary.json").read_text())
    assert summary["counts"]["val"] > 0 and summary["counts"]["train"] > 0, summary["counts"]

    shown = json.loads(run([dvc, "metrics", "show", "--json"], repo, env))
    metrics = shown[""]["data"]["results/evaluate/metrics.json"]["data"]
    for method in ("model", "teacher", "kmeans_rgb", "kmeans_features"):
        for proto in ("global", "per_tile"):
            assert 0.0 < metrics[method][proto]["miou"] <= 1.0, (method, proto)
        for proto in ("global", "per_raster"):  # the val scenes' whole rasters (evaluate.rasters)
            assert 0.0 < metrics[method]["rasters"][proto]["miou"] <= 1.0, (method, proto)
    assert metrics["rasters"] >= 1
    for proto in ("global", "per_tile"):
        assert metrics["ratio_miou"][proto]["kmeans_rgb"] == pytest.approx(
            metrics["model"][proto]["miou"] / metrics["kmeans_rgb"][proto]["miou"], rel=1e-4)
    table = run([dvc, "metrics", "show"], repo, env)
    assert "model.global.miou" in table and "kmeans_features.per_tile.miou" in table, table
    assert "model.rasters.global.miou" in table, table
    assert (repo / "results/evaluate/plots/confusion.json").is_file()
    assert len(list((repo / "results/evaluate/plots/overlays").glob("*.png"))) == 1

    # 2. Commit the run, then an experiment on the distillation EMA.
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "tiny run"], repo, env)
    status = json.loads(run([dvc, "status", "--json"], repo, env) or "{}")
    assert status == {}, status
    best_npz = (repo / "model/best/model.npz").read_bytes()
    out = run([dvc, "exp", "run", "-S", "distill.ema_decay=0.99"], repo, env)
    assert stages_run(out) == {"train_distill", "export", "evaluate"}, out
    # The EMA decay changes the normalised per-scale losses and so the student's weights. With a
    # geometric-mean merge it enters each step's gradient only as a scalar factor, which Adam
    # largely cancels, so on 4 tiny steps the evaluate metrics may legitimately not move.
    assert (repo / "model/best/model.npz").read_bytes() != best_npz
    diff = json.loads(run([dvc, "metrics", "diff", "--json"], repo, env))
    changed = diff.get("results/train_distill/metrics.json", {})
    assert any(key.startswith("distill.normalised_p") for key in changed), diff

    # 3. An experiment that must move the evaluate metrics: metrics diff shows the model's change
    #    and none for the baselines (which do not depend on the student).
    out = run([dvc, "exp", "run", "-S", "distill.lr=0.03"], repo, env)
    assert stages_run(out) == {"train_distill", "export", "evaluate"}, out
    diff = json.loads(run([dvc, "metrics", "diff", "--json"], repo, env))
    changed = diff.get("results/evaluate/metrics.json", {})
    assert any(key.startswith("model.") for key in changed), diff
    assert not any(key.startswith(("kmeans_", "teacher.")) for key in changed), changed  # not model-dependent
    table = run([dvc, "metrics", "diff"], repo, env)
    assert "model.global.miou" in table, table


@pytest.mark.slow
def test_repro_on_rasters_without_labels(tmp_path):
    """A user's own imagery, no labels: three small orthophotos (GeoTIFF, UTM) in a folder."""
    over = merge(json.loads(json.dumps(TINY)), {"ingest": {"provider": "local", "dataset": "ortho",
                                                          "local": {"path": "imagery"}}})
    repo, env, dvc = clone_with(tmp_path, over)
    (repo / "imagery").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # fields, trees and a road, each raster its own arrangement
        rgb = np.empty((3, 128, 128), np.uint8)
        rgb[:] = np.array([150, 140, 90], np.uint8)[:, None, None]
        rgb[:, : 40 + 20 * i] = np.array([40, 90, 40], np.uint8)[:, None, None]
        rgb[:, :, 60 + 10 * i: 70 + 10 * i] = 120
        rgb = np.clip(rgb + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)
        with rasterio.open(repo / "imagery" / f"ortho_{i}.tif", "w", driver="GTiff", width=128, height=128,
                           count=3, dtype="uint8", crs="EPSG:32611",
                           transform=Affine(0.6, 0, 500000 + 100 * i, 0, -0.6, 4000000)) as dst:
            dst.write(rgb)

    out = run([dvc, "repro"], repo, env)
    assert stages_run(out) == set(STAGES), out
    assert "no labelled val tiles" in out, out
    shown = json.loads(run([dvc, "metrics", "show", "--json"], repo, env))
    metrics = shown[""]["data"]["results/evaluate/metrics.json"]["data"]
    assert (metrics["labelled"], metrics["split"], metrics["k"]) == (False, "train", 6)
    for method in ("model", "teacher", "kmeans_rgb", "kmeans_features"):
        f = metrics[method]["label_free"]
        assert 1.0 <= f["clusters_used"] <= 6.0 and 0.0 < f["seed_agreement"] <= 1.0, (method, f)
    table = run([dvc, "metrics", "show"], repo, env)
    assert "model.label_free.seed_agreement" in table and "agreement_with_model.kmeans_rgb" in table, table
    assert len(list((repo / "results/evaluate/plots/overlays").glob("*.png"))) == 1
