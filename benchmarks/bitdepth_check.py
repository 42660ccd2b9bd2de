"""What does `segment_raster`'s stretch of non-8-bit data cost on real imagery?

Each labelled image of `data/raw` whose item id matches `--items` (e.g. Dubai's area 8, `^t8_`)
goes through `segment_raster` as a GIS user would run it (one raster per image, centres fitted on
that raster), twice:

    8bit  : the image as it is (rescale "auto": 8-bit used as it is)
    16bit : the same image as a 12-bit sensor would deliver it, uint16 = value * 16 + 100, run with
            rescale "auto" (each band stretched from its own 2-98 % percentile range to 0..255)

Nothing but the stretch differs, so the ratio 16bit / 8bit is what the percentile stretch itself
costs (or gains). Scored per image (Hungarian matching per image, matched confusions summed:
evaluate's per-tile protocol). The last line is JSON with both mIoUs and the ratio.

    python benchmarks/bitdepth_check.py --raw data/raw --model model/best --items '^t8_' [--k 5]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raster_scoring import labelled_items_args, report, segment_and_score  # noqa: E402

from runtime.model import load_model  # noqa: E402
from stages.metrics import PerTileProtocol  # noqa: E402

OFFSET, GAIN = 100, 16  # the simulated 12-bit sensor: dn = value * GAIN + OFFSET (0..4180)


def write_geotiff(path: Path, bands_hwc: np.ndarray) -> Path:
    import rasterio

    h, w, _ = bands_hwc.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype=bands_hwc.dtype.name,
                       tiled=True, blockxsize=256, blockysize=256) as ds:
        ds.write(bands_hwc.transpose(2, 0, 1))
    return path


def main() -> int:
    args, items, num_classes, k = labelled_items_args(__doc__.splitlines()[0])
    import rasterio

    model = load_model(args.model)
    scores = {name: PerTileProtocol(k, num_classes) for name in ("8bit", "16bit")}
    notes = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for it in items:
            with rasterio.open(args.raw / it["image"]) as ds:
                rgb = ds.read().transpose(1, 2, 0)
            with rasterio.open(args.raw / it["label"]) as ds:
                label = ds.read(1)
            sources = {"8bit": write_geotiff(tmp / "u8.tif", rgb),
                       "16bit": write_geotiff(tmp / "u16.tif", rgb.astype(np.uint16) * GAIN + OFFSET)}
            for name, src in sources.items():
                notes[name] = segment_and_score(src, tmp / f"{name}_out.tif", k, model, scores[name],
                                                label).rescale
    report(scores, notes, ("16bit", "8bit"), t0, " (last image)", images=len(items), items=args.items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
