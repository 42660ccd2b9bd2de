"""Teacher training throughput on 1 and on N data-parallel processes of this machine (torchrun, gloo).

Each run is the real training step of `stages.train` (the global batch's views, this rank's
slice, forward, every loss term over the global batch, backward, DDP's gradient average, AdamW)
for --steps steps after one warm-up step. One process uses every core; N processes share them
(torchrun's default of one thread each on N cores). Runs alternate --repeats times and the best of
each counts. Reports input pixels per second (both views) and the ratio N / 1.

    python benchmarks/train_dist_bench.py [--params params.yaml] [--shards data/shards/synthetic]
                                          [--nproc 2] [--steps 20] [--repeats 3]

Without shards at --shards it writes small synthetic shards to a temporary directory first.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.augment import make_views  # noqa: E402
from stages.checkpoints import build_teacher, teacher_config  # noqa: E402
from stages.datasets import RandomWindowBatches, split_sources  # noqa: E402
from stages.distributed import close_ranks, wrap_ddp  # noqa: E402
from stages.params import load_params  # noqa: E402
from stages.train import teacher_losses  # noqa: E402
from stages.training import WEIGHT_DECAY, Execution  # noqa: E402


def worker(params: str, shards: str, steps: int) -> None:
    """One rank's share of the timed run; rank 0 prints {"pixels_per_s", "processes"}."""
    p = load_params(params)
    device, ranks = Execution(device="cpu").apply()
    batches = RandomWindowBatches(split_sources(Path(shards), "train"), [p.train.patch_size],
                                  p.train.batch_size, p.train.seed)
    rows = ranks.slice(p.train.batch_size, "train.batch_size")
    raw = build_teacher(teacher_config(p.model))
    model = wrap_ddp(raw, ranks, device).train()
    opt = torch.optim.AdamW(raw.parameters(), lr=p.train.lr, weight_decay=WEIGHT_DECAY)

    def step(i: int) -> None:
        views = [v.rows(rows) for v in make_views(batches.batch(i)[0], i, p.aug)]
        terms = teacher_losses(model, views, p.loss, torch.Generator().manual_seed(i), ranks=ranks)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()

    step(0)  # warm-up (allocator, kernels, the process group's first collectives)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    elapsed = time.perf_counter() - t0
    if ranks.is_main:
        pixels = steps * 2 * p.train.batch_size * p.train.patch_size ** 2
        print(json.dumps({"pixels_per_s": pixels / elapsed, "processes": ranks.world_size,
                          "threads": torch.get_num_threads()}))
    close_ranks(ranks)


def timed(nproc: int, params: str, shards: Path, steps: int) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--params", params, "--shards", str(shards),
          "--steps", str(steps)]
    cmd = ([sys.executable, *me] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *me])
    env = {k: v for k, v in os.environ.items() if k not in ("LANDSEG_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards/synthetic")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.params, args.shards, args.steps)
        return 0
    root, tmp = Path(args.shards), None
    if not (root / "summary.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import write_tiny_shards

        tmp = tempfile.TemporaryDirectory()
        root = write_tiny_shards(Path(tmp.name) / "bench", scenes=4, size=512, tile=256)
        print(f"no shards at {args.shards}: using synthetic tiles in {root}")
    best = {1: None, args.nproc: None}
    for _ in range(args.repeats):
        for n in best:
            r = timed(n, args.params, root, args.steps)
            if best[n] is None or r["pixels_per_s"] > best[n]["pixels_per_s"]:
                best[n] = r
    one, many = best[1], best[args.nproc]
    print(f"1 process, {one['threads']} threads: {one['pixels_per_s'] / 1e3:.1f} kpix/s")
    print(f"{args.nproc} processes, {many['threads']} thread(s) each: {many['pixels_per_s'] / 1e3:.1f} kpix/s")
    print(json.dumps({"cores": os.cpu_count(), "steps": args.steps, "repeats": args.repeats,
                      "pixels_per_s_1": round(one["pixels_per_s"]),
                      f"pixels_per_s_{args.nproc}": round(many["pixels_per_s"]),
                      f"ratio_{args.nproc}_over_1": round(many["pixels_per_s"] / one["pixels_per_s"], 3)}))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
