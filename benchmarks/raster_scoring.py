"""Shared by the by-hand checks (`resolution_check.py`, `bitdepth_check.py`) that run rasters
through `segment_raster` as a GIS user would and score each one on its own (evaluate's per-tile
protocol: Hungarian matching per raster, matched confusions summed). Not a benchmark itself."""

from __future__ import annotations

import json
import time

import numpy as np

from runtime import segment_raster
from runtime.raster import SegmentResult
from stages.metrics import PerTileProtocol


def segment_and_score(src, dst, k: int, model, protocol: PerTileProtocol, label: np.ndarray,
                      **options) -> SegmentResult:
    """segment_raster(src -> dst, overwriting) with `options`, its labels added to `protocol`."""
    import rasterio

    res = segment_raster(src, dst, k, model, overwrite=True, **options)
    with rasterio.open(res.dst) as ds:
        protocol.add(ds.read(1), label)
    return res


def report(scores: dict[str, PerTileProtocol], notes: dict[str, str], ratio: tuple[str, str],
           started: float, note_suffix: str = "", **extra) -> None:
    """Print each variant's note, then one JSON line: mIoU per variant, `<a>_over_<b>` for
    ratio = (a, b), `extra` and the seconds since `started`."""
    result = {name: round(p.result()["miou"], 4) for name, p in scores.items()}
    a, b = ratio
    result[f"{a}_over_{b}"] = round(result[a] / result[b], 3)
    result.update(extra, seconds=round(time.perf_counter() - started, 1))
    for name, note in notes.items():
        print(f"{name}{note_suffix}: {note}")
    print(json.dumps(result))
