"""ingest + build_shards through `dvc repro` in a temporary git clone, twice: the second run is a no-op.

The clone is of the repository's committed HEAD (what CI and users get), with tiny params.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, tree_digest


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_dvc_repro_build_shards_in_a_fresh_clone(tmp_path):
    repo = tmp_path / "clone"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    _run(["git", "clone", "--quiet", str(REPO), str(repo)], tmp_path, env)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ingest"]["synthetic"].update(num_scenes=3, scene_size=96, labelled_fraction=0.67)
    params["shards"].update(tile_size=48)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    dvc = str(bin_dir / "dvc")
    first = _run([dvc, "repro", "build_shards"], repo, env)
    assert "Running stage 'ingest'" in first and "Running stage 'build_shards'" in first

    summary = json.loads((repo / "data" / "shards" / "synthetic" / "summary.json").read_text())
    assert summary["counts"]["train"] == 4                       # 1 unlabelled scene x 2 x 2 tiles
    assert summary["counts"]["metrics_train"] + summary["counts"]["val"] == 8
    assert summary["num_classes"] == 6
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"ingest", "build_shards"} <= set(lock["stages"])
    assert lock["stages"]["build_shards"]["params"]["params.yaml"]["shards"]["tile_size"] == 48
    before = tree_digest(repo / "data")

    second = _run([dvc, "repro", "build_shards"], repo, env)
    assert "Running stage" not in second, second
    assert tree_digest(repo / "data") == before
    status = _run([dvc, "status", "build_shards"], repo, env)
    assert "up to date" in status.lower(), status
