"""The GDAL-bindings raster backend against the rasterio backend, side by side in one process.

    python3 -m venv --system-site-packages .venv-backends && .venv-backends/bin/pip install rasterio "affine<3"
    .venv-backends/bin/python benchmarks/raster_backends_bench.py [--size 4096] [--repeats 3]

Needs a Python with both osgeo.gdal and rasterio: Debian's Python (python3-gdal) with rasterio added
in a venv that sees the system packages, as above. Runs `segment_raster` (read, fit centres,
embed, label, smooth, write) on one synthetic size x size GeoTIFF, round-robin, best of --repeats
for each backend (LANDSEG_RASTER_BACKEND switched between runs, same model, threads and raster),
on the native grid and resampled to the model's pixel size (a raster at half the training GSD), and
checks that both write the same labels. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", type=Path, default=REPO / "model" / "best")
    p.add_argument("--k", type=int, default=6)
    args = p.parse_args(argv)

    import rasterio  # noqa: F401  (both must import here)
    from osgeo import gdal  # noqa: F401
    from qgis_bench import write_raster

    from runtime import load_model, segment_raster
    from runtime.raster_io import ENV_VAR

    model = load_model(args.model)
    result = {"size": args.size, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = write_raster(tmp / "in.tif", args.size)
        cases = {"native": "native", "resampled": (model.training_pixel_size_m or 0.6) / 2}
        for case, pixel_size in cases.items():
            best = {"rasterio": float("inf"), "gdal": float("inf")}
            for _ in range(args.repeats):
                for name in best:
                    os.environ[ENV_VAR] = name
                    t = time.perf_counter()
                    segment_raster(src, tmp / f"{name}.tif", args.k, model, pixel_size=pixel_size, overwrite=True)
                    best[name] = min(best[name], time.perf_counter() - t)
            import rasterio as rio

            with rio.open(tmp / "gdal.tif") as a, rio.open(tmp / "rasterio.tif") as b:
                same = bool(np.array_equal(a.read(), b.read()))
            mpix = args.size * args.size / 1e6
            result[case] = {"seconds": best, "mpix_per_s": {n: round(mpix / s, 2) for n, s in best.items()},
                            "gdal_over_rasterio_throughput": round(best["rasterio"] / best["gdal"], 3),
                            "same_labels": same}
            print(f"{case:>10}: rasterio {mpix / best['rasterio']:.2f} Mpix/s, gdal {mpix / best['gdal']:.2f} Mpix/s "
                  f"({best['rasterio'] / best['gdal']:.2f}x); same labels: {same}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
