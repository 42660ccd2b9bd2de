"""Shared by the by-hand checks (`resolution_check.py`, `bitdepth_check.py`,
`shared_centres_check.py`) that run rasters through `segment_raster` as a GIS user would and score
them (evaluate's protocols: Hungarian matching per raster, matched confusions summed, or one
matching for all). Not a benchmark itself."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from runtime import segment_raster
from runtime.raster import SegmentResult
from stages.build_shards import read_manifest
from stages.metrics import PerTileProtocol


def labelled_items_args(description: str) -> tuple[argparse.Namespace, list[dict], int, int]:
    """Parse --raw, --model, --items and --k; return the arguments, the labelled manifest items of
    data/raw whose id matches --items, the dataset's class count and k (--k or that count)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--raw", type=Path, required=True, help="data/raw of an ingested dataset with labels")
    ap.add_argument("--model", type=Path, required=True, help="artifact directory (model/best)")
    ap.add_argument("--items", default="", help="regex an item id must match (default: every labelled item)")
    ap.add_argument("--k", type=int, default=0, help="clusters (default: the dataset's class count)")
    args = ap.parse_args()
    items, info = read_manifest(args.raw)
    num_classes = int(info["num_classes"])
    items = [it for it in items if it["label"] and re.search(args.items, it["item_id"])]
    if not items:
        raise SystemExit(f"{args.raw}: no labelled item matches {args.items!r}")
    return args, items, num_classes, args.k or num_classes


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
