"""Throughput of `segment_region` on a Dask LocalCluster of 1 and 2 workers, on a region of
--rasters synthetic 2048^2 GeoTIFFs (a mosaic of tiles of one CRS), with a random-weight student
of params.yaml. Each run starts from an empty output folder (nothing skipped), cluster start-up
included. The last line printed is one JSON object.

    python benchmarks/region_bench.py [--rasters 16] [--size 2048] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rasters", type=int, default=16)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--k", type=int, default=6)
    args = ap.parse_args()

    from runtime_bench import build_encoder, synthetic_raster, write_artifact_for

    from runtime.region import segment_region

    result = {"rasters": args.rasters, "size": args.size, "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="region_bench_") as tmp:
        tmp = Path(tmp)
        enc, params = build_encoder("student")
        model = write_artifact_for(enc, params, tmp / "model")
        first = synthetic_raster(tmp / "tile_0.tif", args.size)
        sources = [first]
        for i in range(1, args.rasters):  # copies: the same work per raster, a region's worth of files
            sources.append(tmp / f"tile_{i}.tif")
            shutil.copyfile(first, sources[-1])
        mpix = args.rasters * args.size * args.size / 1e6
        for workers in args.workers:
            out = tmp / f"out_{workers}"
            t = time.perf_counter()
            res = segment_region(sources, out, args.k, model, workers=workers)
            seconds = time.perf_counter() - t
            if res.failed or len(res.written) != args.rasters:
                raise SystemExit(f"{workers} worker(s): {res.failed}")
            result[f"mpix_s_{workers}_workers"] = round(mpix / seconds, 2)
            result[f"seconds_{workers}_workers"] = round(seconds, 1)
            print(f"{workers} worker(s): {seconds:.1f} s, {mpix / seconds:.2f} Mpix/s", flush=True)
            shutil.rmtree(out)
    if len(args.workers) > 1:
        a, b = args.workers[0], args.workers[-1]
        result[f"speedup_{b}_over_{a}"] = round(result[f"mpix_s_{b}_workers"] / result[f"mpix_s_{a}_workers"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
