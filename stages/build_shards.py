"""DVC stage `build_shards`: cut `data/raw/` rasters into georeferenced tiles, split by area.

Output, written to `data/shards/.<dataset>.tmp-<pid>/` and renamed to `data/shards/<dataset>/` when
complete (nothing outside that folder is touched):

    <dataset>/summary.json                      dataset, num_classes, class_names, counts, class_hist,
                                                groups per split, pixel_size_m per split (median
                                                ground sample distance in metres, null when any
                                                tile's CRS does not give it), dropped tiles,
                                                input_rescale (from data/raw/dataset.json), params_hash
    <dataset>/<split>/shard-NNNNN/index.jsonl   one line per tile (see stages/datasets.py)
    <dataset>/<split>/shard-NNNNN/<tile>.tif        3-band uint8 GeoTIFF window of the source
    <dataset>/<split>/shard-NNNNN/<tile>.label.tif  1-band uint8 label on the same grid (labelled only)

Tiles are `shards.tile_size` pixels on a grid anchored at the raster's top-left corner. The last
tile of a row/column is shifted inward to end at the raster edge; in its label the pixels it
shares with the previous tile are 0 (ignore), so every labelled source pixel is scored exactly once.
A raster smaller than a tile gives one padded tile (image 0, label 0, GeoTIFF mask = invalid).
A tile is dropped when more than `shards.max_blank_fraction` of it is blank: outside the raster,
nodata/masked in the source, or the whole tile one constant colour.

Splits: tiles of unlabelled rasters go to `train`. Tiles of labelled rasters go to
`metrics_train` or `val` by a stable hash of their group key (the source item id, or the first
group of `shards.group_regex` searched in it): sha256(key) as a number in [0, 1) below
`shards.metrics_train_fraction` -> `metrics_train`. Optionally (`shards.train_fraction`, for data
where everything is labelled) a second hash, of "train/" + key, sends a share of labelled groups to
`train` without their labels. Pieces of one area never straddle splits and adding rasters never
moves existing tiles.

Labels whose grid differs from the image are warped onto each tile's grid by GDAL (nearest
neighbour); reads are windowed, so memory does not grow with raster size.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rasterio.windows import Window
from tqdm import tqdm

from runtime.command import check_signals, run_command
from runtime.destination import atomic_folder, check_name, child, inside
from runtime.errors import UnsafePathError
from runtime.source import ground_pixel_size_m
from stages.params import ParamsError, ShardsParams, load_params
from stages.rasterio_utils import (
    RasterError,
    open_raster,
    read,
    read_label_aligned,
    read_valid,
    window_transform,
    write_geotiff,
)

SPLITS = ("train", "metrics_train", "val")


class ShardsError(ValueError):
    """Bad build_shards input: missing/invalid manifest, unmatched group regex, bad label values."""


def group_key(item_id: str, group_regex: str) -> str:
    """The split group of a source item: the regex's first group, or the item id itself."""
    if not group_regex:
        return item_id
    m = re.search(group_regex, item_id)
    if m is None or m.group(1) is None:
        raise ShardsError(f"shards.group_regex {group_regex!r} does not match item {item_id!r}; every "
                          "item needs a group (fix the regex or leave it empty to group by raster)")
    return m.group(1)


def group_unit(key: str) -> float:
    """Stable position of a group key in [0, 1): the first 8 bytes of its sha256."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def labelled_split(key: str, metrics_train_fraction: float, train_fraction: float = 0.0) -> str:
    """Split of a labelled group: `train` (labels dropped) by an independent hash, else
    `metrics_train` or `val`."""
    if group_unit("train/" + key) < train_fraction:
        return "train"
    return "metrics_train" if group_unit(key) < metrics_train_fraction else "val"


def _tile_starts(n: int, tile: int) -> list[tuple[int, int]]:
    """(start, leading pixels already covered by the previous tile) along one axis of n pixels."""
    if n <= tile:
        return [(0, 0)]
    starts = [(s, 0) for s in range(0, n - tile + 1, tile)]
    last = starts[-1][0]
    if last + tile < n:
        starts.append((n - tile, last + tile - (n - tile)))
    return starts


def tile_windows(width: int, height: int, tile: int):
    """(window, covered_rows, covered_cols) of a tile grid anchored at (0, 0), in pixels.

    The last tile along an axis is shifted inward to end at the raster edge (real pixels, not
    padding); its first `covered_*` rows/cols repeat the previous tile. Rasters smaller than a tile
    give one tile that overruns the edge (padded).
    """
    for row, covered_rows in _tile_starts(height, tile):
        for col, covered_cols in _tile_starts(width, tile):
            yield Window(col, row, tile, tile), covered_rows, covered_cols


def blank_fraction(rgb: np.ndarray, valid: np.ndarray) -> float:
    """Share of blank pixels: invalid ones; or all of them when the valid pixels are one colour."""
    if valid.all():  # the common case: no boolean-indexed copy
        flat = rgb.reshape(rgb.shape[0], -1)
        return 1.0 if (flat.min(axis=1) == flat.max(axis=1)).all() else 0.0
    if not valid.any():
        return 1.0
    pixels = rgb[:, valid]
    if (pixels.min(axis=1) == pixels.max(axis=1)).all():
        return 1.0
    return 1.0 - float(valid.mean())


def read_manifest(raw_dir: Path) -> tuple[list[dict], dict]:
    manifest, info_path = raw_dir / "manifest.jsonl", raw_dir / "dataset.json"
    for p in (manifest, info_path):
        if not p.is_file():
            raise ShardsError(f"{p}: missing; run the ingest stage first")
    try:
        info = json.loads(info_path.read_text())
        entries = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ShardsError(f"{raw_dir}: manifest or dataset.json is not valid JSON: {e}") from None
    if not entries:
        raise ShardsError(f"{manifest}: no items")
    for n, e in enumerate(entries, 1):
        where = f"{manifest}:{n}"
        missing = {"item_id", "image", "label"} - set(e) if isinstance(e, dict) else {"item_id", "image", "label"}
        if missing:
            raise ShardsError(f"{where}: entry lacks {sorted(missing)}")
        try:  # item ids name the tiles; paths are read: neither may lead outside data/raw
            check_name(e["item_id"], f"{where}: item_id")
            for key in ("image", "label"):
                if e[key] is not None or key == "image":
                    inside(raw_dir, e[key], f"{where}: {key}", root_name="ingest folder")
        except UnsafePathError as err:
            raise ShardsError(str(err)) from None
    ids = [e["item_id"] for e in entries]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ShardsError(f"{manifest}: item ids {dup[:5]} appear more than once")
    return sorted(entries, key=lambda e: e["item_id"]), info


class _ShardWriter:
    """Appends tiles of one split into shard-00000, shard-00001, ... of `tiles_per_shard` tiles."""

    def __init__(self, split_dir: Path, split: str, tiles_per_shard: int):
        self.split_dir, self.split, self.per_shard = split_dir, split, tiles_per_shard
        self.count, self.lines = 0, []
        self.split_dir.mkdir(parents=True)

    @property
    def shard_dir(self) -> Path:
        return self.split_dir / f"shard-{self.count // self.per_shard:05d}"

    def add(self, item_id, rgb, label, valid, *, crs, transform, source_item, group, window, class_hist):
        shard = self.shard_dir
        shard.mkdir(exist_ok=True)
        write_geotiff(child(shard, item_id, "tile id", ".tif"), rgb, crs=crs, transform=transform, mask=valid)
        target = None
        if label is not None:
            target = f"{item_id}.label.tif"
            write_geotiff(child(shard, item_id, "tile id", ".label.tif"), label, crs=crs, transform=transform)
        self.lines.append(json.dumps({
            "item_id": item_id, "split": self.split, "input": f"{item_id}.tif", "target": target,
            "source_item": source_item, "group": group, "window": window, "class_hist": class_hist},
            sort_keys=True))
        self.count += 1
        if self.count % self.per_shard == 0:
            self._flush(shard)

    def _flush(self, shard: Path) -> None:
        (shard / "index.jsonl").write_text("".join(line + "\n" for line in self.lines))
        self.lines = []

    def close(self) -> None:
        shard = self.shard_dir
        if self.lines or self.count == 0:  # an empty split still gets an (empty) shard-00000
            shard.mkdir(exist_ok=True)
            self._flush(shard)


def median_pixel_size(sizes: list) -> float | None:
    """Median ground sample distance (metres) of a split's tiles; None when the split is empty or
    any tile's size is unknown (a median over the known part would misstate the split)."""
    if not sizes or any(s is None for s in sizes):
        return None
    return round(float(np.median(sizes)), 6)


def build_shards(raw_dir: Path, out_root: Path, dataset: str, params: ShardsParams,
                 progress: bool = False) -> dict:
    """Tile and split every raster of `raw_dir` into `out_root/<dataset>/`; return the summary."""
    raw_dir, out_root = Path(raw_dir), Path(out_root)
    entries, info = read_manifest(raw_dir)
    if info.get("dataset") != dataset:
        raise ShardsError(f"{raw_dir / 'dataset.json'}: holds dataset {info.get('dataset')!r} but "
                          f"ingest.dataset is {dataset!r}; rerun ingest")
    if "rescale" not in info:
        raise ShardsError(f"{raw_dir / 'dataset.json'}: lacks 'rescale' (written by an older ingest: rerun it)")
    num_classes = int(info["num_classes"])
    groups = {e["item_id"]: group_key(e["item_id"], params.group_regex) for e in entries}
    with atomic_folder(out_root / dataset, what="shards folder") as tmp:
        writers = {s: _ShardWriter(tmp / s, s, params.tiles_per_shard) for s in SPLITS}
        hist = {s: np.zeros(256, dtype=np.int64) for s in SPLITS}
        split_groups = {s: set() for s in SPLITS}
        pixel_sizes = {s: [] for s in SPLITS}  # metres per tile; None where the CRS does not say
        dropped = kept = 0
        T = params.tile_size
        for e in tqdm(entries, desc="build_shards", unit="raster", disable=not progress):
            check_signals()
            image_path = raw_dir / e["image"]
            label_path = raw_dir / e["label"] if e["label"] else None
            split = (labelled_split(groups[e["item_id"]], params.metrics_train_fraction, params.train_fraction)
                     if label_path else "train")
            if split == "train":
                label_path = None  # `train` is unsupervised: labels of groups sent there are not written
            with contextlib.ExitStack() as stack:
                src = stack.enter_context(open_raster(image_path, what="image"))
                lab_src = stack.enter_context(open_raster(label_path, what="label raster")) if label_path else None
                if src.count != 3 or src.dtypes[0] != "uint8":
                    raise ShardsError(f"{image_path}: expected 3-band uint8, found {src.count} band(s) "
                                      f"of {src.dtypes[0]}")
                raster_m = ground_pixel_size_m(src.crs, src.transform, src.width, src.height)  # once per raster
                if raster_m is None and src.crs is None:  # declared by ingest.local.pixel_size_m, or null
                    raster_m = e.get("pixel_size_m")
                for win, covered_rows, covered_cols in tile_windows(src.width, src.height, T):
                    valid = read_valid(src, win, [1, 2, 3])
                    rgb = read(src, [1, 2, 3], win, boundless=True, fill=0)
                    if blank_fraction(rgb, valid) > params.max_blank_fraction:
                        dropped += 1
                        continue
                    rgb[:, ~valid] = 0
                    label, class_hist = None, None
                    if lab_src is not None:
                        label = read_label_aligned(lab_src, src, win)
                        label[~valid] = 0
                        # Pixels repeated from the previous tile are scored there only.
                        label[:covered_rows] = 0
                        label[:, :covered_cols] = 0
                        counts = np.bincount(label.ravel(), minlength=256)
                        if counts[num_classes + 1:].any():
                            bad = np.nonzero(counts[num_classes + 1:])[0] + num_classes + 1
                            raise ShardsError(f"{label_path}: label values {bad.tolist()} exceed "
                                              f"num_classes={num_classes} of {raw_dir / 'dataset.json'}")
                        hist[split] += counts
                        class_hist = {str(c): int(counts[c]) for c in range(1, num_classes + 1) if counts[c]}
                    col, row = int(win.col_off), int(win.row_off)
                    writers[split].add(
                        f"{e['item_id']}_r{row:06d}_c{col:06d}", rgb, label, valid,
                        crs=src.crs, transform=window_transform(win, src.transform), source_item=e["item_id"],
                        group=groups[e["item_id"]], window=[col, row, T, T], class_hist=class_hist)
                    split_groups[split].add(groups[e["item_id"]])
                    pixel_sizes[split].append(raster_m)
                    kept += 1
        for w in writers.values():
            w.close()
        if kept == 0:
            raise ShardsError(f"{raw_dir}: every tile was blank (more than shards.max_blank_fraction="
                              f"{params.max_blank_fraction} blank pixels); nothing to write")
        params_blob = json.dumps({"ingest.dataset": dataset, "shards": asdict(params)}, sort_keys=True)
        summary = {
            "dataset": dataset,
            "num_classes": num_classes,
            "class_names": info.get("class_names"),
            "tile_size": T,
            "counts": {s: writers[s].count for s in SPLITS},
            "class_hist": {s: {str(c): int(hist[s][c]) for c in range(1, num_classes + 1) if hist[s][c]}
                           for s in SPLITS},
            "groups": {s: sorted(split_groups[s]) for s in SPLITS},
            "pixel_size_m": {s: median_pixel_size(pixel_sizes[s]) for s in SPLITS},
            "input_rescale": info["rescale"],  # how ingest made the pixels 8-bit (to the artifact)
            "dropped_blank_tiles": dropped,
            "source_items": len(entries),
            "params_hash": hashlib.sha256(params_blob.encode()).hexdigest(),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="params file (groups `ingest`, `shards`)")
    ap.add_argument("--raw", default="data/raw", help="ingest output folder")
    ap.add_argument("--out", default="data/shards", help="shards root; writes <out>/<dataset>/")
    args = ap.parse_args(argv)

    def run() -> int:
        params = load_params(args.params)
        summary = build_shards(Path(args.raw), Path(args.out), params.ingest.dataset, params.shards,
                               progress=sys.stderr.isatty())
        print(f"build_shards: {summary['counts']} tiles ({summary['dropped_blank_tiles']} blank dropped), "
              f"groups {{train: {len(summary['groups']['train'])}, metrics_train: "
              f"{len(summary['groups']['metrics_train'])}, val: {len(summary['groups']['val'])}}} -> "
              f"{Path(args.out) / summary['dataset']}")
        return 0

    return run_command("build_shards", run, errors=(ParamsError, ShardsError, RasterError),
                       interrupted=f"{args.out} left as it was")

if __name__ == "__main__":
    sys.exit(main())
