"""build_shards throughput (MPix/s) and peak memory vs raster size.

For each size (default 2048 and 8192 px square) one labelled synthetic scene is written to a
temporary data/raw (rendered block by block), then build_shards runs in a fresh subprocess that
reports its wall time, its peak RSS (VmHWM) and its peak RSS right after imports. Reads are
windowed, so peak memory should not grow with raster size: the script prints the ratio of the
largest size's peak RSS increase to the smallest's (the claim holds when it stays near 1).

    python benchmarks/build_shards_bench.py [--sizes 2048 8192] [--tile 256] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from stages.build_shards import build_shards
from stages.params import ShardsParams
raw, out, tile = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def peak_kb():
    # VmHWM is this process's own high-water mark (ru_maxrss can carry the parent's across exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

base_kb = peak_kb()
t = time.perf_counter()
summary = build_shards(raw, out, "bench", ShardsParams(tile_size=tile))
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "base_mb": base_kb / 1024,
                  "peak_mb": peak_kb() / 1024,
                  "tiles": sum(summary["counts"].values())}))
"""


def make_raw(root: Path, size: int) -> None:
    """One labelled synthetic scene of size x size px, written block by block (bounded memory)."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    from stages import synthetic
    from stages.rasterio_utils import geotiff_profile

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    transform = Affine(0.6, 0, 500_000.0, 0, -0.6, 4_000_000.0)
    with rasterio.open(root / "images" / "s.tif", "w", **geotiff_profile(size, size, 3, crs="EPSG:32611", transform=transform)) as img, \
            rasterio.open(root / "labels" / "s.tif", "w", **geotiff_profile(size, size, 1, crs="EPSG:32611", transform=transform)) as lab:
        for row0, rgb, label in synthetic.render_scene(0, 0, size, 4.0, block_rows=256):
            win = Window(0, row0, size, rgb.shape[1])
            img.write(rgb, window=win)
            lab.write(label[None], window=win)
    (root / "manifest.jsonl").write_text(json.dumps({"item_id": "s", "image": "images/s.tif", "label": "labels/s.tif"}) + "\n")
    (root / "dataset.json").write_text(json.dumps({"dataset": "bench", "num_classes": 6, "class_names": None,
                                                   "rescale": {"mode": "none", "limits": None}}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = []
        for size in args.sizes:
            raw = Path(tmp) / f"raw{size}"
            t = time.perf_counter()
            make_raw(raw, size)
            gen = time.perf_counter() - t
            proc = subprocess.run([sys.executable, "-c", CHILD, str(raw), str(Path(tmp) / f"out{size}"), str(args.tile)],
                                  cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"build_shards failed at {size} px:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            mpix = size * size / 1e6
            rows.append((size, mpix, r, gen))
            print(f"{size:>6} px  {mpix:7.1f} MPix  {r['tiles']:6d} tiles  {r['seconds']:7.2f} s  "
                  f"{mpix / r['seconds']:6.2f} MPix/s  peak RSS {r['peak_mb']:7.1f} MB "
                  f"(after imports {r['base_mb']:.1f} MB, build +{r['peak_mb'] - r['base_mb']:.1f} MB)  "
                  f"[input generated in {gen:.1f} s]", flush=True)
        (s0, m0, r0, _), (s1, m1, r1, _) = rows[0], rows[-1]
        growth = (r1["peak_mb"] - r1["base_mb"]) / max(r0["peak_mb"] - r0["base_mb"], 1e-6)
        print(f"peak-memory increase ratio {s1}px / {s0}px: {growth:.2f} for {m1 / m0:.0f}x the pixels; "
              f"throughput ratio {(m1 / r1['seconds']) / (m0 / r0['seconds']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
