"""Does `segment_raster`'s resampling to the training pixel size pay on real imagery?

Each labelled tile of a split (e.g. Dubai's metrics_train) is written as a GeoTIFF at full
resolution and at 1/`factor` resolution (factor x factor means; labels: every factor-th pixel), in
UTM zone 40N near its central meridian. The full-resolution grid is *declared* to have
`--gsd` metres per pixel and the model is given that training pixel size (Dubai has no CRS, so the
absolute value is arbitrary; only the ratio matters). Every raster then goes through
`segment_raster` as a GIS user would run it (centres fitted on that raster), three ways:

    full  : the full-resolution raster (pixel_size "native")
    coarse: the coarse raster at its own grid (pixel_size "native")
    auto  : the coarse raster resampled to the training pixel size (pixel_size "auto", the default)

and, as an array, the coarse tile through `Model.predict_labels(..., pixel_size_m=gsd * factor)`
(numpy resampling, centres fitted on the array: `array`). Each is scored per tile (Hungarian
matching per tile, matched confusions summed: evaluate's per-tile protocol). The last line is
JSON with the four mIoUs and auto / coarse.

    python benchmarks/resolution_check.py --shards data/shards/dubai --model model/best \
        [--split metrics_train] [--factor 2] [--gsd 0.5] [--every 1] [--k 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raster_scoring import report, segment_and_score  # noqa: E402

from runtime.artifact import load_artifact, write_artifact  # noqa: E402
from runtime.model import load_model  # noqa: E402
from stages.datasets import read_summary  # noqa: E402
from stages.evaluate import load_val_tiles  # noqa: E402
from stages.metrics import PerTileProtocol  # noqa: E402

CRS = "EPSG:32640"  # UTM 40N (Dubai); origin on the central meridian


def write_geotiff(path: Path, rgb: np.ndarray, gsd: float) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    h, w, _ = rgb.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=CRS,
                       transform=from_origin(500000.0, 2800000.0, gsd, gsd)) as ds:
        ds.write(rgb.transpose(2, 0, 1))
    return path


def coarsen(rgb: np.ndarray, f: int) -> np.ndarray:
    h, w = rgb.shape[0] // f * f, rgb.shape[1] // f * f
    return rgb[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def with_training_gsd(model_dir: Path, gsd_m: float, dst: Path) -> Path:
    """A copy of the artifact whose meta records `gsd_m` as the training pixel size."""
    art = load_artifact(model_dir)
    meta = {k: v for k, v in art.meta.items() if k not in ("format", "format_version", "layers")}
    meta["training_pixel_size_m"] = gsd_m
    return write_artifact(dst, layers=art.layers, arrays=dict(art.arrays), meta=meta, metrics=art.metrics)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True, help="data/shards/<dataset>")
    ap.add_argument("--model", type=Path, required=True, help="artifact directory (model/best)")
    ap.add_argument("--split", default="metrics_train")
    ap.add_argument("--factor", type=int, default=2, help="coarsening factor (default: %(default)s)")
    ap.add_argument("--gsd", type=float, default=0.5, help="metres declared for a full-resolution pixel")
    ap.add_argument("--every", type=int, default=1, help="use every n-th tile (default: all)")
    ap.add_argument("--k", type=int, default=0, help="clusters (default: the dataset's class count)")
    args = ap.parse_args()

    summary = read_summary(args.shards)
    num_classes = int(summary["num_classes"])
    k = args.k or num_classes
    tiles = load_val_tiles(args.shards, num_classes, args.split)
    picked = range(0, len(tiles.images), args.every)
    scores = {name: PerTileProtocol(k, num_classes) for name in ("full", "coarse", "auto", "array")}
    notes = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = load_model(with_training_gsd(args.model, args.gsd, tmp / "model"))
        for i in picked:
            rgb, label = tiles.images[i], tiles.labels[i]
            f = args.factor
            small = coarsen(rgb, f)
            small_label = label[::f, ::f][:small.shape[0], :small.shape[1]]
            full_src = write_geotiff(tmp / "full.tif", rgb, args.gsd)
            small_src = write_geotiff(tmp / "coarse.tif", small, args.gsd * f)
            for name, src, how, target in (("full", full_src, "native", label),
                                           ("coarse", small_src, "native", small_label),
                                           ("auto", small_src, "auto", small_label)):
                notes[name] = segment_and_score(src, tmp / f"{name}_out.tif", k, model, scores[name], target,
                                                pixel_size=how).resolution
            scores["array"].add(model.predict_labels(small, k, pixel_size_m=args.gsd * f), small_label)
            notes["array"] = f"Model.predict_labels(pixel_size_m={args.gsd * f:g}) on the coarse array"
    report(scores, notes, ("auto", "coarse"), t0, tiles=len(picked), factor=args.factor, split=args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
