"""Teacher training throughput and the share of step time spent waiting for data.

Runs the real training step (two augmented views, forward, all losses, backward, AdamW) on windows
from the shards, twice in one process: data prepared inline before each step (reference) and
prepared by the background `Prefetcher` (`LANDSEG_PREFETCH=1`). Reports input pixels per
second (both views counted) and the data-wait share of each; the target is a share under 10 %.

    python benchmarks/train_bench.py [--shards data/shards/synthetic] [--steps 20] [--repeats 3] [--threads 0]

Without shards at --shards it writes small synthetic shards to a temporary directory first.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.augment import make_views  # noqa: E402
from stages.checkpoints import build_teacher, teacher_config  # noqa: E402
from stages.datasets import RandomWindowBatches, split_sources  # noqa: E402
from stages.distributed import ONE_PROCESS, local_threads  # noqa: E402
from stages.params import load_params  # noqa: E402
from stages.train import teacher_losses  # noqa: E402
from stages.training import WEIGHT_DECAY, Prefetcher  # noqa: E402


def run(batches, p, steps: int, prefetch: bool) -> dict:
    model = build_teacher(teacher_config(p.model)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.train.lr, weight_decay=WEIGHT_DECAY)

    def make(i):
        return make_views(batches.batch(i)[0], i, p.aug)

    def step_fn(i, views):
        terms = teacher_losses(model, views, p.loss, torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()

    step_fn(0, make(0))  # warm-up (allocator, kernels)
    wait = 0.0
    pf = Prefetcher(make, 1, steps + 1) if prefetch else None
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        if pf is not None:
            views = pf.get(i)
        else:
            t = time.perf_counter()
            views = make(i)
            wait += time.perf_counter() - t
        step_fn(i, views)
    total = time.perf_counter() - t0
    if pf is not None:
        wait = pf.wait_s
        pf.close()
    pixels = steps * 2 * p.train.batch_size * p.train.patch_size ** 2
    return {"step_s": total / steps, "pixels_per_s": pixels / total, "data_wait_share": wait / total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards/synthetic")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    p = load_params(args.params)
    torch.set_num_threads(local_threads(args.threads, ONE_PROCESS))
    root = Path(args.shards)
    tmp = None
    if not (root / "summary.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import write_tiny_shards

        tmp = tempfile.TemporaryDirectory()
        root = write_tiny_shards(Path(tmp.name) / "bench", scenes=4, size=512, tile=256)
        print(f"no shards at {args.shards}: using synthetic tiles in {root}")
    batches = RandomWindowBatches(split_sources(root, "train"), [p.train.patch_size], p.train.batch_size,
                                  p.train.seed, "cycle", True)
    # interleaved repeats, best of each: other processes on a shared machine slow single runs
    inline, prefetched = None, None
    for _ in range(args.repeats):
        a, b = run(batches, p, args.steps, prefetch=False), run(batches, p, args.steps, prefetch=True)
        inline = a if inline is None or a["step_s"] < inline["step_s"] else inline
        prefetched = b if prefetched is None or b["step_s"] < prefetched["step_s"] else prefetched
    result = {
        "threads": torch.get_num_threads(), "batch_size": p.train.batch_size, "patch_size": p.train.patch_size,
        "steps": args.steps, "repeats": args.repeats,
        "inline_pixels_per_s": round(inline["pixels_per_s"]), "inline_data_wait_share": round(inline["data_wait_share"], 4),
        "pixels_per_s": round(prefetched["pixels_per_s"]), "data_wait_share": round(prefetched["data_wait_share"], 4),
        "step_s": round(prefetched["step_s"], 4),
        "speedup_vs_inline": round(prefetched["pixels_per_s"] / inline["pixels_per_s"], 3),
        "target_data_wait_share": 0.10,
    }
    print(f"inline data:     {inline['pixels_per_s'] / 1e6:.3f} MPix/s, data wait {100 * inline['data_wait_share']:.1f} %")
    print(f"prefetched data: {prefetched['pixels_per_s'] / 1e6:.3f} MPix/s, data wait "
          f"{100 * prefetched['data_wait_share']:.1f} %")
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
