"""Data-parallel training under torchrun (gloo on CPU, loopback only): one process and two give the
same gradients and curves, two "nodes" train and resume after a kill, a dead rank ends the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_raw, write_params

from stages.params import parse_params

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A folder holding params.yaml (a tiny teacher and student, batch 4) and its shards."""
    from stages.build_shards import build_shards
    from stages.ingest import ingest

    root = tmp_path_factory.mktemp("ddp")
    raw = tiny_raw(**{
        "model.width": 16, "model.depth": 1, "model.embed_dim": 8, "model.max_k": 4,
        "train.steps": 24, "train.batch_size": 4, "train.patch_size": 32, "train.val_every": 12,
        "train.checkpoint_every": 4,
        "student.width": 16, "student.depth": 1, "student.embed_dim": 8, "data.patch_sizes": [32, 48],
        "distill.steps": 6, "distill.batch_size": 4, "distill.val_every": 3, "distill.checkpoint_every": 2})
    write_params(root / "params.yaml", raw)
    p = parse_params(raw)
    ingest(p.ingest, root / "raw")
    build_shards(root / "raw", root / "shards", p.ingest.dataset, p.shards)
    return root


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "LANDSEG_NPROC"}
    return {**e, "PYTHONPATH": str(ROOT), "LANDSEG_THREADS": "1", "LANDSEG_DIST_TIMEOUT": "60", **extra}


def stage_args(job: Path, name: str, stage: str = "train") -> list[str]:
    if stage == "train":
        return ["-m", "stages.train", "--params", str(job / "params.yaml"), "--shards", str(job / "shards"),
                "--out", str(job / name / "teacher"), "--checkpoints", str(job / name / "ckpt"),
                "--results", str(job / name / "results"), "--no-progress"]
    return ["-m", "stages.train_distill", "--params", str(job / "params.yaml"), "--shards", str(job / "shards"),
            "--teacher", str(job / "one" / "teacher"), "--out", str(job / name / "student"),
            "--checkpoints", str(job / name / "sckpt"), "--results", str(job / name / "sresults"), "--no-progress"]


def run(cmd: list[str], **extra) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def curve(path: Path) -> list[float]:
    return [float(line.split("\t")[1]) for line in path.read_text().splitlines()[1:]]


def descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert all(p.poll() is None for p in procs), "the run ended before it wrote a checkpoint"
        assert time.monotonic() - t0 < timeout, f"no {path} after {timeout} s"
        time.sleep(0.02)


def test_first_step_gradients_of_one_and_two_processes_agree(job):
    """The teacher's and the student's first-step gradients (after DDP's average) and loss terms
    equal those of one process on the same global batch: batch-norm statistics, marginal
    entropy, contrastive candidates and the teacher's centres are the global batch's."""
    args = [str(ROOT / "tests" / "distributed_step.py"), str(job / "params.yaml"), str(job / "shards")]
    run([sys.executable, *args, str(job / "step1.pt")])
    run([*TORCHRUN, "--standalone", "--nproc-per-node=2", *args, str(job / "step2.pt")])
    one, two = torch.load(job / "step1.pt"), torch.load(job / "step2.pt")
    for net in ("teacher", "student"):
        assert one[f"{net}_terms"] == pytest.approx(two[f"{net}_terms"], rel=1e-5, abs=1e-6), net
        for name, g in one[f"{net}_grads"].items():
            scale = float(g.abs().max()) + 1e-12
            assert float((g - two[f"{net}_grads"][name]).abs().max()) <= 1e-4 * scale, (net, name)
    torch.testing.assert_close(one["teacher_running_var"], two["teacher_running_var"], rtol=1e-5, atol=1e-7)


def test_torchrun_trains_like_one_process_and_rank_zero_alone_writes(job):
    run([sys.executable, *stage_args(job, "one")])
    out = run([*TORCHRUN, "--standalone", "--nproc-per-node=2", *stage_args(job, "two")])
    assert "on 2 process(es)" in out.stdout + out.stderr
    for name in ("total", "consistency", "marginal_entropy", "contrastive"):
        assert curve(job / f"two/results/plots/metrics/train/{name}.tsv") == pytest.approx(
            curve(job / f"one/results/plots/metrics/train/{name}.tsv"), rel=1e-4, abs=1e-5), name
    # validation ran once per val step (rank 0 alone), the checkpoint and the teacher are rank 0's
    assert len(curve(job / "two/results/plots/metrics/val/miou.tsv")) == 2
    one = torch.load(job / "one/teacher/model.pt", weights_only=True)
    two = torch.load(job / "two/teacher/model.pt", weights_only=True)
    assert one["val"]["step"] == two["val"]["step"]
    assert one["val"]["score"] == pytest.approx(two["val"]["score"], abs=1e-3)
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k].float(), v.float(), rtol=1e-3, atol=1e-4)
    assert sorted(p.name for p in (job / "two").iterdir()) == ["ckpt", "results", "teacher"]

    # the student through LANDSEG_NPROC: the stage starts torchrun itself (as under dvc repro)
    run([sys.executable, *stage_args(job, "one", "distill")])
    out = run([sys.executable, *stage_args(job, "two", "distill")], LANDSEG_NPROC="2")
    assert "on 2 process(es)" in out.stdout + out.stderr
    assert curve(job / "two/sresults/plots/metrics/distill/merged_geomean.tsv") == pytest.approx(
        curve(job / "one/sresults/plots/metrics/distill/merged_geomean.tsv"), rel=1e-4, abs=1e-5)


def test_two_nodes_on_loopback_train_and_resume_after_a_kill(job):
    """Two torchrun commands (--nnodes 2, c10d rendezvous on 127.0.0.1) train; killed (-9) after a
    checkpoint, rerun, they resume from it and end where an uninterrupted two-process run ends."""
    if not (job / "two" / "teacher").exists():
        run([*TORCHRUN, "--standalone", "--nproc-per-node=2", *stage_args(job, "two")])

    def nodes() -> list[subprocess.Popen]:
        port = free_port()
        return [subprocess.Popen([*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                  f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=landseg-test",
                                  *stage_args(job, "nodes")],
                                 cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]

    first = nodes()
    wait_for(job / "nodes/ckpt/last.pt", first)
    for p in first:
        kill_tree(p)
    assert not (job / "nodes/teacher").exists()
    second = nodes()
    logs = [p.communicate(timeout=300)[0] for p in second]
    assert [p.returncode for p in second] == [0, 0], "\n".join(logs)
    assert "resuming teacher training from" in "".join(logs)
    two = torch.load(job / "two/teacher/model.pt", weights_only=True)
    resumed = torch.load(job / "nodes/teacher/model.pt", weights_only=True)
    assert resumed["val"]["step"] == two["val"]["step"]
    for k, v in two["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k].float(), v.float(), rtol=1e-4, atol=1e-5)
    # each step's row once in the curves, and the same values as the uninterrupted run
    assert curve(job / "nodes/results/plots/metrics/train/total.tsv") == pytest.approx(
        curve(job / "two/results/plots/metrics/train/total.tsv"), rel=1e-4, abs=1e-5)


def test_a_rank_that_dies_ends_the_job(job):
    long = job / "long.yaml"
    long.write_text((job / "params.yaml").read_text().replace("steps: 24", "steps: 100000"))
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node=2", *stage_args(job, "dies")]
    cmd[cmd.index(str(job / "params.yaml"))] = str(long)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(job / "dies/ckpt/last.pt", [proc])
        rank1 = [pid for pid in descendants(proc.pid)
                 if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
        assert len(rank1) == 1, rank1
        t0 = time.monotonic()
        os.kill(rank1[0], signal.SIGKILL)
        log = proc.communicate(timeout=120)[0]
        assert time.monotonic() - t0 < 90
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode != 0
    assert "stages.train FAILED" in log or "ChildFailedError" in log, log[-3000:]
    assert not (job / "dies/teacher").exists()
