"""Reading shards for training and evaluation.

- `read_summary(dataset_root)`: the validated summary.json build_shards writes;
- `read_index(dataset_root, split)` -> `TileRecord`s of one split (validated; paths never escape
  the dataset root);
- `TileDataset`: map-style dataset of whole tiles (image, label);
- `RandomWindowBatches`: reproducible batches of random square windows from tiles or whole
  rasters; batch `step` is a pure function of (seed, step), so training resumes exactly;
- `split_sources(dataset_root, split)`: the input tile paths of a split;
- `stable_subset(records, max_tiles)`: a fixed, seed-independent subset of a split's tiles.

Conventions: images are uint8 (H, W, 3) in R, G, B order (channels last, as the runtime takes
them); labels uint8 (H, W) with 0 = ignore and 1..C the classes. Windows and patch sizes are in
pixels; `window` in an index record is [col_off, row_off, width, height] in pixels of the source
raster, so tile pixel (r, c) is source pixel (row_off + r, col_off + c).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from runtime.destination import check_name, inside
from runtime.errors import UnsafePathError
from stages.rasterio_utils import RasterError, has_mask, open_raster, read, read_valid

INDEX_KEYS = ("item_id", "split", "input", "target", "source_item", "group", "window", "class_hist")


class DatasetError(ValueError):
    """Shards missing or malformed, or an index entry pointing outside the dataset root."""


def read_summary(dataset_root: Path) -> dict:
    """summary.json of a shard dataset: num_classes (0 for a set without labels), the tile count of
    every split, the pixel size and input rescale the shards were cut at; DatasetError naming the
    file and the key otherwise."""
    path = Path(dataset_root) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: shard summary not found (run the build_shards stage first)") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(summary, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    for key in ("num_classes", "counts", "pixel_size_m", "input_rescale"):
        if key not in summary:
            raise DatasetError(f"{path}: missing key {key!r} (written by an older build_shards: rerun it)")
    n = summary["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DatasetError(f"{path}: expected an integer num_classes >= 0, got {n!r}")
    counts = summary["counts"]
    if not isinstance(counts, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
        raise DatasetError(f"{path}: expected 'counts', the tile count of every split, got {counts!r}")
    return summary


@dataclass(frozen=True)
class TileRecord:
    """One tile of a shard index. `input`/`target` are absolute paths inside the dataset root."""

    item_id: str
    split: str
    input: Path
    target: Path | None
    source_item: str
    group: str  # the split group (area) of its source raster: `shards.group_regex`'s key, else the item id
    window: tuple[int, int, int, int]  # col_off, row_off, width, height (source pixels)
    class_hist: dict[str, int] | None


def _inside(root: Path, shard_dir: Path, rel: object, where: str) -> Path:
    """Resolve an index path relative to its shard; reject anything that leaves `root`."""
    try:
        return inside(root, rel, where, base=shard_dir, root_name="dataset root")
    except UnsafePathError as e:
        raise DatasetError(str(e)) from None


def read_index(dataset_root: Path, split: str) -> list[TileRecord]:
    """All tiles of `split` in shard order. Raises DatasetError on a missing split or a bad entry."""
    root = Path(dataset_root).resolve()
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: split {split!r} not found (run build_shards; splits are "
                           "train, metrics_train, val)")
    records = []
    for shard_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name.startswith("shard-")):
        index = shard_dir / "index.jsonl"
        if not index.is_file():
            raise DatasetError(f"{index}: missing")
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{index}:{n}"
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON: {err}") from None
            if not isinstance(e, dict) or set(INDEX_KEYS) - set(e):
                raise DatasetError(f"{where}: expected keys {list(INDEX_KEYS)}, got "
                                   f"{sorted(e) if isinstance(e, dict) else e!r}")
            if e["split"] != split:
                raise DatasetError(f"{where}: entry of split {e['split']!r} inside split {split!r}")
            window = e["window"]
            if not (isinstance(window, list) and len(window) == 4 and all(isinstance(v, int) for v in window)):
                raise DatasetError(f"{where}: window must be [col_off, row_off, width, height], got {window!r}")
            target = None if e["target"] is None else _inside(root, shard_dir, e["target"], where)
            try:  # item ids name files (evaluate's overlays): one plain file name
                check_name(e["item_id"], f"{where}: item_id")
            except UnsafePathError as err:
                raise DatasetError(str(err)) from None
            records.append(TileRecord(
                item_id=e["item_id"], split=split,
                input=_inside(root, shard_dir, e["input"], where), target=target,
                source_item=str(e["source_item"]), group=str(e["group"]), window=tuple(window),
                class_hist=e["class_hist"]))
    return records


def stable_subset(records: Sequence[TileRecord], max_tiles: int) -> list[TileRecord]:
    """At most `max_tiles` of `records` (0 = all of them), kept in index order.

    Tiles are ranked by a SHA-256 hash of their item id and the first `max_tiles` are kept, so the
    choice depends on the ids alone: every method, stage, seed and run gets the same tiles, and the
    subsets are nested (raising the cap only adds tiles). The hash spreads the choice evenly over
    source rasters and groups. For labelled splits too large to score in full (time and memory
    grow with their pixel count).
    """
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 0:
        raise DatasetError(f"max_tiles must be an integer >= 0 (0 = all tiles), got {max_tiles!r}")
    if max_tiles == 0 or max_tiles >= len(records):
        return list(records)
    rank = sorted(range(len(records)),
                  key=lambda i: hashlib.sha256(records[i].item_id.encode()).hexdigest())
    return [records[i] for i in sorted(rank[:max_tiles])]


def split_sources(dataset_root: Path, split: str) -> list[Path]:
    """Input tile paths of a split (for `RandomWindowBatches`)."""
    return [r.input for r in read_index(dataset_root, split)]


def read_rgb(path: Path) -> np.ndarray:
    """A 3-band uint8 raster as (H, W, 3)."""
    with open_raster(path, what="image") as src:
        if src.count != 3 or src.dtypes[0] != "uint8":
            raise DatasetError(f"{path}: expected a 3-band uint8 image, found {src.count} band(s) of {src.dtypes[0]}")
        return np.ascontiguousarray(read(src, [1, 2, 3]).transpose(1, 2, 0))


def read_label(path: Path) -> np.ndarray:
    with open_raster(path, what="label raster") as src:
        if src.count != 1 or src.dtypes[0] != "uint8":
            raise DatasetError(f"{path}: expected a 1-band uint8 label, found {src.count} band(s) of {src.dtypes[0]}")
        return read(src, 1)


class TileDataset:
    """Map-style dataset over the tiles of one split.

    `ds[i]` -> {"image": uint8 (H, W, 3), "label": uint8 (H, W) or None, "item_id": str}.
    `require_labels=True` raises DatasetError when the split has no labelled tile or some tile of
    the split has no label (evaluation must not silently score on a subset).
    `max_tiles` > 0 keeps only that many tiles of the split (`stable_subset`); 0 keeps them all.
    """

    def __init__(self, dataset_root: Path, split: str, require_labels: bool = False, max_tiles: int = 0):
        self.root, self.split = Path(dataset_root), split
        self.records = read_index(dataset_root, split)
        self.split_tiles = len(self.records)
        if require_labels:
            if not self.records:
                raise DatasetError(f"{self.root / split}: split {split!r} has no tiles; labels required")
            unlabelled = [r.item_id for r in self.records if r.target is None]
            if unlabelled:
                raise DatasetError(f"{self.root / split}: {len(unlabelled)} tile(s) without labels, e.g. "
                                   f"{unlabelled[:3]}; labels required")
        self.records = stable_subset(self.records, max_tiles)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        image = read_rgb(r.input)
        label = read_label(r.target) if r.target is not None else None
        if label is not None and label.shape != image.shape[:2]:
            raise DatasetError(f"{r.target}: label shape {label.shape} differs from image {image.shape[:2]}")
        return {"image": image, "label": label, "item_id": r.item_id}


def _valid_box(src, block_rows: int = 1024) -> tuple[int, int, int, int]:
    """(row0, col0, height, width) bounding the valid pixels; the full extent without a mask.

    The mask is read in blocks of rows, so memory stays bounded for whole rasters.
    """
    if not has_mask(src):
        return 0, 0, src.height, src.width
    any_row = np.zeros(src.height, dtype=bool)
    any_col = np.zeros(src.width, dtype=bool)
    for r in range(0, src.height, block_rows):
        h = min(block_rows, src.height - r)
        valid = read_valid(src, Window(0, r, src.width, h), [1, 2, 3])
        any_row[r:r + h] = valid.any(axis=1)
        any_col |= valid.any(axis=0)
    rows, cols = np.nonzero(any_row)[0], np.nonzero(any_col)[0]
    if rows.size == 0:
        return 0, 0, 0, 0
    return int(rows[0]), int(cols[0]), int(rows[-1] + 1 - rows[0]), int(cols[-1] + 1 - cols[0])


class RandomWindowBatches:
    """Batches of random square windows (pixel units) from GeoTIFF tiles or whole rasters.

    `batch(step)` -> (uint8 (B, S, S, 3), S). It depends only on (seed, step): the RNG is seeded
    with [seed, step], so a resumed run draws exactly the batches it would have drawn. All windows
    of one batch share the size S = patch_sizes[step % n] ("cycle") or a seeded choice ("uniform").

    A source is drawn with probability proportional to its valid area, then a window position
    uniformly inside its valid bounding box (tiles padded at a raster edge carry a GeoTIFF mask;
    rasters without a mask count as fully valid). Sources smaller than S are skipped for that size; a size
    no source can provide is an error at construction. `in_memory=True` loads every source once
    (tiles); `False` reads each window from disk (whole rasters: memory independent of size).
    """

    def __init__(self, sources: Sequence[Path], patch_sizes: Sequence[int], batch_size: int, seed: int,
                 sampling: str = "cycle", in_memory: bool = True):
        if not sources:
            raise DatasetError("RandomWindowBatches: no sources (is the split empty?)")
        if not patch_sizes or min(patch_sizes) < 1:
            raise DatasetError(f"RandomWindowBatches: patch sizes must be positive, got {list(patch_sizes)}")
        if sampling not in ("cycle", "uniform"):
            raise DatasetError(f"RandomWindowBatches: sampling must be 'cycle' or 'uniform', got {sampling!r}")
        if batch_size < 1:
            raise DatasetError(f"RandomWindowBatches: batch_size must be >= 1, got {batch_size}")
        self.sources = [Path(s) for s in sources]
        self.patch_sizes = [int(s) for s in patch_sizes]
        self.batch_size, self.seed, self.sampling, self.in_memory = batch_size, seed, sampling, in_memory
        self.arrays: list[np.ndarray] = []
        boxes = []  # valid bounding box per source: (row0, col0, height, width)
        for path in self.sources:
            with open_raster(path, what="image") as src:
                if src.count != 3 or src.dtypes[0] != "uint8":
                    raise DatasetError(f"{path}: expected a 3-band uint8 image, found {src.count} band(s) "
                                       f"of {src.dtypes[0]}")
                if in_memory:
                    self.arrays.append(np.ascontiguousarray(read(src, [1, 2, 3]).transpose(1, 2, 0)))
                boxes.append(_valid_box(src))
        self.boxes = np.array(boxes, dtype=np.int64).reshape(-1, 4)
        area = (self.boxes[:, 2] * self.boxes[:, 3]).astype(np.float64)
        self._weights = {}
        for s in set(self.patch_sizes):
            ok = (self.boxes[:, 2] >= s) & (self.boxes[:, 3] >= s)
            if not ok.any():
                raise DatasetError(f"RandomWindowBatches: no source has a valid {s}x{s} window "
                                   f"(largest valid extent {int(self.boxes[:, 2:].min(axis=1).max())} px)")
            w = np.where(ok, area, 0.0)
            self._weights[s] = w / w.sum()

    def patch_size(self, step: int, rng: np.random.Generator | None = None) -> int:
        if self.sampling == "cycle":
            return self.patch_sizes[step % len(self.patch_sizes)]
        return self.patch_sizes[int(rng.integers(len(self.patch_sizes)))]

    def batch(self, step: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, step])
        size = self.patch_size(step, rng)
        picks = rng.choice(len(self.sources), size=self.batch_size, p=self._weights[size])
        out = np.empty((self.batch_size, size, size, 3), dtype=np.uint8)
        for b, i in enumerate(picks):
            r0, c0, h, w = self.boxes[i]
            row = r0 + int(rng.integers(h - size + 1))
            col = c0 + int(rng.integers(w - size + 1))
            if self.in_memory:
                out[b] = self.arrays[i][row:row + size, col:col + size]
            else:
                with open_raster(self.sources[i], what="image") as src:
                    out[b] = read(src, [1, 2, 3], Window(col, row, size, size)).transpose(1, 2, 0)
        return out, size

    def iter_from(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, int]]:
        """Batches start_step, start_step + 1, ... forever."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


__all__ = ["DatasetError", "RandomWindowBatches", "RasterError", "TileDataset", "TileRecord",
           "read_index", "split_sources", "stable_subset"]
