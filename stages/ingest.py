"""DVC stage `ingest`: bring rasters into `data/raw/` as 3-band uint8 GeoTIFFs plus labels.

Providers (`ingest.provider`):
- `synthetic`: procedural scenes (stages/synthetic.py) rendered block by block;
- `local`: a directory or glob of rasters GDAL reads (GeoTIFF, VRT, JPEG, PNG, ...), labels paired
  by stem or by a regex, optional label value map, band selection; rasters without a CRS are
  accepted with a warning and keep their pixel grid;
- `remote`: cloud-optimised GeoTIFF URLs read through GDAL's virtual file systems (/vsicurl/,
  /vsis3/) with HTTP range requests, optionally one pixel window or bounding box per URL; only the
  blocks of the window are fetched.

Output (written to a temporary directory beside `data/raw`, renamed when complete):
    data/raw/images/<item_id>.tif    3-band uint8, tiled, deflate; source CRS and transform
    data/raw/labels/<item_id>.tif    1-band uint8 (0 = ignore, 1..C), label map applied; its own grid
                                     (build_shards aligns it to the image by warping)
    data/raw/manifest.jsonl          one line per item: item_id, image, label, crs, transform, width,
                                     height, bands, sha256, label_sha256, has_label, source, and
                                     (local, remote) rescale: the (low, high) per band that data not
                                     8-bit was mapped from to 0..255 (`ingest.rescale`), else null
    data/raw/dataset.json            dataset, provider, num_classes, class_names, rescale ({mode:
                                     `ingest.rescale` ("none" for synthetic, rendered 8-bit), limits:
                                     three [low, high] pairs for "fixed", else null})
Pixel data are copied in blocks of rows, so memory does not grow with raster size.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window
from tqdm import tqdm

from runtime.command import check_signals, run_command
from runtime.destination import atomic_folder, child
from runtime.errors import LandsegError
from runtime.io_rasterio import from_dataset
from runtime.rescale import to_uint8
from runtime.source import has_float_bands, plan_rescale
from stages import synthetic
from stages.params import IngestParams, ParamsError, load_params
from stages.rasterio_utils import (
    GDAL_READ_ENV,
    Grid,
    RasterError,
    crs_string,
    geotiff_profile,
    has_mask,
    open_raster,
    read,
    read_label_aligned,
    sha256_file,
    window_transform,
)

RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".jpg", ".jpeg", ".png", ".jp2", ".img", ".bmp", ".gif"}
BLOCK_ROWS = 512  # rows copied per read/write; bounds memory to ~BLOCK_ROWS * width * bands bytes
SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


class IngestError(ValueError):
    """Bad ingest input: missing/empty folder, unreadable raster, wrong band count, bad labels."""


class NoCRSWarning(UserWarning):
    """Rasters without a CRS: ingested on their pixel grid only."""


class UnpairedLabelWarning(UserWarning):
    """Label rasters without a matching image (e.g. images selected by a glob): ignored."""


@dataclass
class Item:
    """One raster to ingest: `image` is a path or GDAL virtual path; `window` in source pixels."""

    item_id: str
    image: str
    label: str | None
    source: str
    window: tuple[int, int, int, int] | None = None  # col_off, row_off, width, height
    bounds: tuple[float, float, float, float] | None = None  # left, bottom, right, top (CRS units)


def safe_id(name: str) -> str:
    return SAFE_ID.sub("_", name).strip("._") or "item"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_writer(dst: Path, width: int, height: int, count: int, crs, transform):
    """A tiled deflate GeoTIFF open for writing (internal mask allowed)."""
    profile = geotiff_profile(width, height, count, crs=crs, transform=transform)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(dst, "w", **profile) as out:
            yield out


def _write_blocks(dst: Path, width: int, height: int, count: int, crs, transform,
                  blocks: Iterator[tuple[int, np.ndarray, np.ndarray | None]]) -> None:
    """Write (row0, data (C, h, width), mask (h, width) or None) blocks to a tiled GeoTIFF."""
    with _open_writer(dst, width, height, count, crs, transform) as out:
        for row0, data, mask in blocks:
            win = Window(0, row0, width, data.shape[1])
            out.write(data, window=win)
            if mask is not None:
                out.write_mask(mask, window=win)


def _manifest_entry(item_id: str, root: Path, image: Path, label: Path | None, crs, transform,
                    width: int, height: int, source: str) -> dict:
    return {
        "item_id": item_id,
        "image": image.relative_to(root).as_posix(),
        "label": label.relative_to(root).as_posix() if label else None,
        "crs": crs_string(crs),
        "transform": [float(v) for v in tuple(transform)[:6]],
        "width": int(width), "height": int(height), "bands": 3,
        "sha256": sha256_file(image),
        "label_sha256": sha256_file(label) if label else None,
        "has_label": label is not None,
        "source": source,
    }


# --------------------------------------------------------------------------------------------
# Synthetic provider
# --------------------------------------------------------------------------------------------


def ingest_synthetic(params: IngestParams, root: Path) -> tuple[list[dict], dict]:
    sp = params.synthetic
    n_labelled = int(round(sp.num_scenes * sp.labelled_fraction))
    order = np.random.default_rng([params.seed, 0x1ABE1]).permutation(sp.num_scenes)
    labelled = set(int(i) for i in order[:n_labelled])
    size, px = sp.scene_size, sp.pixel_size_m
    try:
        crs = rasterio.crs.CRS.from_user_input(sp.crs)
    except rasterio.errors.CRSError as e:
        raise IngestError(f"ingest.synthetic.crs: not a CRS GDAL knows: {sp.crs!r} ({e})") from None
    if crs.is_geographic:
        raise IngestError(f"ingest.synthetic.crs: expected a projected CRS (metres), got {sp.crs!r}")
    entries = []
    for scene in tqdm(range(sp.num_scenes), desc="ingest", unit="scene", file=sys.stderr, disable=None, leave=False):
        check_signals()
        item_id = f"scene-{scene:04d}"
        # Scenes sit side by side with a gap, like separate flight lines of one survey.
        x0 = 500_000.0 + scene * (size * px + 1000.0)
        transform = Affine(px, 0.0, x0, 0.0, -px, 4_000_000.0)
        image = root / "images" / f"{item_id}.tif"
        label = root / "labels" / f"{item_id}.tif" if scene in labelled else None
        with contextlib.ExitStack() as stack:
            img_out = stack.enter_context(_open_writer(image, size, size, 3, crs, transform))
            lab_out = stack.enter_context(_open_writer(label, size, size, 1, crs, transform)) if label else None
            for row0, rgb, lab in synthetic.render_scene(params.seed, scene, size, sp.noise_std):
                win = Window(0, row0, size, rgb.shape[1])
                img_out.write(rgb, window=win)
                if lab_out is not None:
                    lab_out.write(lab[None], window=win)
        entries.append(_manifest_entry(item_id, root, image, label, crs, transform, size, size,
                                       f"synthetic:seed={params.seed}:scene={scene}"))
    info = {"num_classes": len(synthetic.CLASS_NAMES),
            "class_names": {str(k): v for k, v in synthetic.CLASS_NAMES.items()}}
    return entries, info


# --------------------------------------------------------------------------------------------
# Local and remote providers (one copy routine for both)
# --------------------------------------------------------------------------------------------


def _label_lut(label_map: dict[int, int]) -> np.ndarray | None:
    if not label_map:
        return None
    lut = np.full(65536, -1, dtype=np.int32)
    for raw, cls in label_map.items():
        lut[raw] = cls
    return lut


def _copy_raster(item: Item, dst_image: Path, dst_label: Path | None, bands: list[int],
                 label_map: dict[int, int], no_crs: list[str], rescale: str | list) -> tuple[dict, int]:
    """Copy the selected bands (and label) of `item` into GeoTIFFs; return (grid, max label).

    Data that is not 8-bit is mapped to 0..255 by `rescale` (`runtime.source.plan_rescale`, the
    run-time code; grid["rescale"] holds the (low, high) per band, None when 8-bit is kept as it
    is); NaN / inf of float data become nodata."""
    with open_raster(item.image, what="image") as src:
        if src.count < 3:
            raise IngestError(f"{item.image}: expected an RGB raster with at least 3 bands, found "
                              f"{src.count} band(s)")
        bad = [b for b in bands if b > src.count]
        if bad:
            raise IngestError(f"{item.image}: ingest.local.bands {bands} asks for band(s) {bad} but the "
                              f"raster has {src.count}")
        if src.crs is None:
            no_crs.append(item.image)
        window = item.window or (0, 0, src.width, src.height)
        if item.bounds is not None:
            window = _bounds_to_window(item, src)
        c0, r0, w, h = window
        if w <= 0 or h <= 0 or c0 < 0 or r0 < 0 or c0 + w > src.width or r0 + h > src.height:
            raise IngestError(f"{item.image}: window {list(window)} is outside the raster "
                              f"({src.width}x{src.height})")
        full = Window(c0, r0, w, h)
        transform = window_transform(full, src.transform)
        try:  # a percentile stretch comes from the pixels copied: a remote window, not its whole COG
            values = plan_rescale(from_dataset(src), bands, rescale, item.image, window=(c0, r0, w, h))
        except LandsegError as e:
            raise IngestError(f"{e} (ingest.rescale: {rescale!r})") from None
        floating = has_float_bands(src, bands)
        masked = has_mask(src)

        def blocks():
            for row in range(0, h, BLOCK_ROWS):
                win = Window(c0, r0 + row, w, min(BLOCK_ROWS, h - row))
                data = read(src, bands, win)
                m = np.all(src.read_masks(bands, window=win) > 0, axis=0) if masked else None
                if floating:
                    finite = np.isfinite(data).all(axis=0)
                    m = finite if m is None else m & finite
                if values.limits is not None:
                    data = to_uint8(data.transpose(1, 2, 0), values.limits).transpose(2, 0, 1)
                yield row, np.ascontiguousarray(data), None if m is None else np.where(m, 255, 0).astype(np.uint8)

        _write_blocks(dst_image, w, h, 3, src.crs, transform, blocks())
        grid = {"crs": src.crs, "transform": transform, "width": w, "height": h,
                "windowed": item.window is not None or item.bounds is not None,
                "rescale": None if values.limits is None else values.limits.tolist()}
    max_label = 0
    if item.label is not None:
        max_label = _copy_label(item, dst_label, grid, label_map)
    return grid, max_label


def _copy_label(item: Item, dst: Path, image_grid: dict, label_map: dict[int, int]) -> int:
    """Copy a label raster, applying the value map and checking values; returns the max class."""
    lut = _label_lut(label_map)
    with open_raster(item.label, what="label raster") as src:
        if src.count != 1:
            raise IngestError(f"{item.label}: a label raster must have 1 band, found {src.count}")
        if not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
            raise IngestError(f"{item.label}: label values must be integers, found {src.dtypes[0]}")
        if image_grid["windowed"]:
            # Remote labels: warp the label onto the image window's grid (GDAL reads only the blocks
            # it needs), so the stored label is aligned with the stored image.
            return _copy_label_warped(item, src, dst, image_grid, lut)
        if (src.crs is None or image_grid["crs"] is None) and \
                (src.width, src.height) != (image_grid["width"], image_grid["height"]):
            raise IngestError(f"{item.label}: cannot align label to image {item.image}: no CRS and "
                              f"different shape (label {src.width}x{src.height}, image "
                              f"{image_grid['width']}x{image_grid['height']})")
        max_seen = [0]

        def blocks():
            for row in range(0, src.height, BLOCK_ROWS):
                win = Window(0, row, src.width, min(BLOCK_ROWS, src.height - row))
                raw = read(src, 1, win)
                yield row, _map_labels(item.label, raw, lut, label_map, max_seen, src.nodata)[None], None

        _write_blocks(dst, src.width, src.height, 1, src.crs, src.transform, blocks())
        return max_seen[0]


def _map_labels(name: str, raw: np.ndarray, lut: np.ndarray | None, label_map: dict, max_seen: list,
                nodata: float | None = None) -> np.ndarray:
    """Apply the value map (unmapped values are an error) and check 0..255; nodata becomes 0."""
    is_nodata = (raw == nodata) if nodata is not None else None
    raw = raw.astype(np.int64)
    if is_nodata is not None:
        raw[is_nodata] = 0 if lut is None else next(iter(label_map))  # any mapped value; zeroed below
    if lut is not None:
        if raw.min(initial=0) < 0 or raw.max(initial=0) >= lut.size:
            raise IngestError(f"{name}: label values {int(raw.min())}..{int(raw.max())} outside "
                              f"ingest.local.label_map keys {sorted(label_map)}")
        mapped = lut[raw]
        if (mapped < 0).any():
            missing = sorted(set(np.unique(raw[mapped < 0]).tolist()))[:20]
            raise IngestError(f"{name}: label values {missing} are not in ingest.local.label_map "
                              f"(keys {sorted(label_map)})")
        raw = mapped
    if raw.min(initial=0) < 0 or raw.max(initial=0) > 255:
        raise IngestError(f"{name}: label values must be in 0..255 (0 = ignore), found "
                          f"{int(raw.min())}..{int(raw.max())}; use ingest.local.label_map")
    if is_nodata is not None:
        raw[is_nodata] = 0
    max_seen[0] = max(max_seen[0], int(raw.max(initial=0)))
    return raw.astype(np.uint8)


def _copy_label_warped(item: Item, src, dst: Path, grid: dict, lut) -> int:
    """Warp a label onto the stored image window's grid (nearest neighbour), then map values."""
    if src.crs is None or grid["crs"] is None:
        raise IngestError(f"{item.label}: cannot align a windowed label without a CRS on both sides")
    target = Grid(name=item.image, crs=grid["crs"], transform=grid["transform"],
                  width=grid["width"], height=grid["height"])
    max_seen = [0]
    w, h = grid["width"], grid["height"]

    def blocks():
        for row in range(0, h, BLOCK_ROWS):
            win = Window(0, row, w, min(BLOCK_ROWS, h - row))
            lab = read_label_aligned(src, target, win)
            yield row, _map_labels(item.label, lab, lut, {}, max_seen)[None], None

    _write_blocks(dst, w, h, 1, grid["crs"], grid["transform"], blocks())
    return max_seen[0]


def _list_rasters(spec: str, what: str) -> list[Path]:
    """Files of a directory (raster suffixes only) or of a glob pattern, sorted."""
    p = Path(spec)
    if any(ch in spec for ch in "*?["):
        files = [Path(f) for f in glob.glob(spec)]
        if not files:
            raise IngestError(f"{what} {spec!r}: the glob matches no file")
    elif p.is_dir():
        files = [f for f in p.iterdir() if f.suffix.lower() in RASTER_SUFFIXES]
        if not files:
            raise IngestError(f"{what} {spec!r}: the folder holds no raster "
                              f"(looked for {sorted(RASTER_SUFFIXES)})")
    elif p.is_file():
        files = [p]
    else:
        raise IngestError(f"{what} {spec!r}: no such file or folder")
    return sorted(f for f in files if f.is_file())


def _pair_key(stem: str, regex: str, path: Path) -> str:
    if not regex:
        return stem
    m = re.search(regex, stem)
    if not m or not m.groups():
        raise IngestError(f"{path}: ingest.local.label_regex {regex!r} does not match the stem {stem!r} "
                          "(it must match and have one group)")
    return m.group(1)


def local_items(params: IngestParams) -> list[Item]:
    lp = params.local
    if not lp.path:
        raise IngestError("ingest.local.path: empty; set it to a folder or glob of rasters")
    images = _list_rasters(lp.path, "ingest.local.path")
    labels = _list_rasters(lp.labels, "ingest.local.labels") if lp.labels else []
    by_key: dict[str, Path] = {}
    for f in labels:
        key = _pair_key(f.stem, lp.label_regex, f)
        if key in by_key:
            raise IngestError(f"{f}: label pairing key {key!r} also matches {by_key[key]}")
        by_key[key] = f
    items, seen, used = [], {}, set()
    for f in images:
        item_id = safe_id(f.stem)
        if item_id in seen:
            raise IngestError(f"{f}: item id {item_id!r} collides with {seen[item_id]} (same stem)")
        seen[item_id] = f
        key = _pair_key(f.stem, lp.label_regex, f) if labels else None
        label = by_key.get(key) if key is not None else None
        if label is not None:
            used.add(key)
        items.append(Item(item_id, str(f), str(label) if label else None, str(f.resolve())))
    orphans = sorted(str(by_key[k]) for k in set(by_key) - used)
    if orphans:
        warnings.warn(f"ingest.local.labels: {len(orphans)} label raster(s) pair with no image and are "
                      f"ignored, e.g. {orphans[:3]}", UnpairedLabelWarning, stacklevel=2)
    return items


def vsi_path(url: str) -> str:
    """GDAL virtual path of a URL: http(s) -> /vsicurl/, s3://bucket/key -> /vsis3/bucket/key."""
    if url.startswith(("http://", "https://")):
        return "/vsicurl/" + url
    if url.startswith("s3://"):
        return "/vsis3/" + url[len("s3://"):]
    if url.startswith("/vsi"):
        return url
    raise IngestError(f"ingest.remote.urls: {url!r} is not an http(s):// or s3:// URL")


def _bounds_to_window(item: Item, src) -> tuple[int, int, int, int]:
    """Pixel window covering `item.bounds` (raster CRS units), rounded outward to whole pixels."""
    left, bottom, right, top = item.bounds
    if src.crs is None:
        raise IngestError(f"{item.image}: ingest.remote.bounds needs a georeferenced raster (no CRS)")
    inv = ~src.transform
    cols, rows = zip(*(inv @ (x, y) for x, y in ((left, top), (right, bottom), (left, bottom), (right, top))))
    c0, r0 = max(int(np.floor(min(cols))), 0), max(int(np.floor(min(rows))), 0)
    c1, r1 = min(int(np.ceil(max(cols))), src.width), min(int(np.ceil(max(rows))), src.height)
    if c1 <= c0 or r1 <= r0:
        raise IngestError(f"{item.image}: bounds {list(item.bounds)} do not overlap the raster "
                          f"(its bounds: {list(src.bounds)})")
    return c0, r0, c1 - c0, r1 - r0


def remote_items(params: IngestParams) -> list[Item]:
    rp = params.remote
    if not rp.urls:
        raise IngestError("ingest.remote.urls: empty; list at least one COG URL")
    items, seen = [], set()
    for i, url in enumerate(rp.urls):
        window = tuple(rp.windows[i]) if rp.windows else None
        bounds = tuple(rp.bounds[i]) if rp.bounds else None
        stem = Path(url.split("?")[0]).stem
        if window is not None:
            stem = f"{stem}_c{window[0]}_r{window[1]}"
        elif bounds is not None:
            stem = f"{stem}_x{bounds[0]:.0f}_y{bounds[3]:.0f}"
        item_id = safe_id(stem)
        if item_id in seen:
            item_id = f"{item_id}_{i}"
        seen.add(item_id)
        label = vsi_path(rp.label_urls[i]) if rp.label_urls else None
        items.append(Item(item_id, vsi_path(url), label, url, window, bounds))
    return items


def ingest_rasters(items: list[Item], params: IngestParams, root: Path, label_map: dict[int, int],
                   bands: list[int], declared_m: float = 0.0) -> tuple[list[dict], dict]:
    """Copy every item; the manifest records each image's rescale limits (null for 8-bit kept as
    is) and `pixel_size_m`: `declared_m` (> 0, `ingest.local.pixel_size_m`) for a raster without a
    CRS, else null (build_shards measures rasters with a CRS from it)."""
    entries, no_crs, max_label = [], [], 0
    rescale = params.rescale_limit_pairs() if params.rescale == "fixed" else params.rescale
    for item in tqdm(items, desc="ingest", unit="raster", file=sys.stderr, disable=None, leave=False):
        check_signals()
        image = child(root / "images", item.item_id, f"{item.source}: item id", ".tif")
        label = child(root / "labels", item.item_id, f"{item.source}: item id", ".tif") if item.label else None
        grid, top = _copy_raster(item, image, label, bands, label_map, no_crs, rescale)
        if declared_m > 0 and grid["crs"] is not None:
            raise IngestError(f"{item.image}: has a CRS, which gives its pixel size; ingest.local.pixel_size_m "
                              f"({declared_m:g}) is for rasters without one: set it to 0")
        max_label = max(max_label, top)
        entries.append(_manifest_entry(item.item_id, root, image, label, grid["crs"], grid["transform"],
                                       grid["width"], grid["height"], item.source)
                       | {"rescale": grid["rescale"], "pixel_size_m": declared_m if declared_m > 0 else None})
    if no_crs:
        size = (f"at the declared {declared_m:g} m per pixel (ingest.local.pixel_size_m)" if declared_m > 0
                else "with an unknown ground pixel size (set ingest.local.pixel_size_m if you know it)")
        warnings.warn(f"{len(no_crs)} raster(s) have no CRS and are used on their pixel grid {size}, "
                      f"e.g. {no_crs[:3]}", NoCRSWarning, stacklevel=2)
    names = {str(k): v for k, v in sorted(params.class_names.items())}
    num_classes = max(max_label, max(params.class_names, default=0))
    if names and max_label > max(params.class_names):
        raise IngestError(f"ingest.class_names names classes up to {max(params.class_names)} but labels "
                          f"hold values up to {max_label}")
    return entries, {"num_classes": num_classes, "class_names": names or None}


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------


def ingest(params: IngestParams, out_dir: Path) -> list[dict]:
    """Run the configured provider into `out_dir` (atomically replaced). Returns manifest entries."""
    out_dir = Path(out_dir)
    if params.provider == "local":
        items = local_items(params)  # validate inputs before touching the output
    elif params.provider == "remote":
        items = remote_items(params)
    with atomic_folder(out_dir, what="ingest output folder") as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        if params.provider == "synthetic":
            if params.class_names:
                raise IngestError("ingest.class_names: must be empty for the synthetic provider "
                                  "(it names its own six classes)")
            entries, info = ingest_synthetic(params, tmp)
        elif params.provider == "local":
            entries, info = ingest_rasters(items, params, tmp, params.local.label_map, params.local.bands,
                                           params.local.pixel_size_m)
        else:
            with rasterio.Env(GDAL_HTTP_TIMEOUT=str(params.remote.timeout_s),
                              GDAL_HTTP_CONNECTTIMEOUT=str(params.remote.timeout_s),
                              GDAL_HTTP_MAX_RETRY="0", GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", **GDAL_READ_ENV):
                entries, info = ingest_rasters(items, params, tmp, {}, [1, 2, 3])
        with open(tmp / "manifest.jsonl", "w") as f:
            for e in entries:
                f.write(json.dumps(e, sort_keys=True) + "\n")
        info = {"dataset": params.dataset, "provider": params.provider, **info,
                # how the pixels became 8-bit; export hands it to the runtime (`input_rescale`)
                "rescale": {"mode": params.rescale if params.provider != "synthetic" else "none",
                            "limits": params.rescale_limit_pairs()},
                "items": len(entries), "labelled_items": sum(e["has_label"] for e in entries)}
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="params file (group `ingest`)")
    ap.add_argument("--out", default="data/raw", help="output folder (replaced atomically)")
    args = ap.parse_args(argv)

    def run() -> int:
        params = load_params(args.params).ingest
        with warnings.catch_warnings():
            warnings.simplefilter("always", NoCRSWarning)
            warnings.simplefilter("always", UnpairedLabelWarning)
            default_show = warnings.showwarning

            def show(message, category, *rest, **kw):
                if issubclass(category, (NoCRSWarning, UnpairedLabelWarning)):
                    print(f"warning: {message}", file=sys.stderr)
                else:
                    default_show(message, category, *rest, **kw)

            warnings.showwarning = show
            entries = ingest(params, Path(args.out))
        labelled = sum(e["has_label"] for e in entries)
        pixels = sum(e["width"] * e["height"] for e in entries)
        print(f"ingest: {len(entries)} rasters ({labelled} labelled, {pixels / 1e6:.1f} MPix) -> {args.out}")
        return 0

    return run_command("ingest", run, errors=(ParamsError, IngestError, RasterError),
                       interrupted=f"{args.out} left as it was")

if __name__ == "__main__":
    sys.exit(main())
