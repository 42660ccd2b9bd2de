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
    ("runtime_bench.py", ["--size", "256", "--repeats", "1", "--skip-rss"]),
])
def test_benchmark_runs_at_toy_size(script, args):  # from the repository root, as `make bench` does
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    if script != "build_shards_bench.py":  # the others end with a JSON summary line
        assert isinstance(json.loads(last), dict)
