"""Raster helpers shared by the data stages: open with clear errors, windowed reads, label
alignment by GDAL warping, atomic tiled GeoTIFF writes.

Conventions: windows are `rasterio.windows.Window(col_off, row_off, width, height)` in *pixel*
units of the image raster; affine transforms map pixel (col, row) corners to CRS units. Arrays are
band-first (C, H, W) as rasterio reads them unless a function says otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.warp import reproject
from rasterio.windows import Window

from runtime.destination import atomic_file
from runtime.errors import error_text

# GDAL settings for every read: libjpeg warnings ("premature end of data") become errors, so a
# truncated JPEG fails loudly instead of returning grey-filled pixels; the block cache is capped
# (MB) because windows are read once in raster order: a cache of 5 % of RAM (GDAL's default)
# would only make peak memory grow with raster size.
GDAL_READ_ENV = {"GDAL_ERROR_ON_LIBJPEG_WARNING": "TRUE", "GDAL_CACHEMAX": 64}

# Tiled, compressed GeoTIFF: fast windowed reads and small files. No timestamps are written, so the
# same pixels give byte-identical files.
GTIFF_PROFILE = {"driver": "GTiff", "compress": "deflate", "predictor": 2, "interleave": "pixel"}


class RasterError(ValueError):
    """A raster cannot be opened, read, aligned or does not have the expected layout."""


@dataclass(frozen=True)
class Grid:
    """A pixel grid: CRS (or None), affine transform (pixel corner -> CRS units), size in pixels.

    Anything with these attributes (an open rasterio dataset included) can stand for a grid.
    """

    name: str
    crs: object
    transform: Affine
    width: int
    height: int


@contextlib.contextmanager
def open_raster(path: str | Path, *, what: str = "raster") -> Iterator[rasterio.DatasetReader]:
    """Open `path` (a file or a GDAL virtual path such as /vsicurl/...) for reading.

    Raises RasterError naming the path when GDAL cannot open it. The NotGeoreferencedWarning of
    plain JPEG/PNG files is silenced here: callers decide how to report a missing CRS.
    """
    with rasterio.Env(**GDAL_READ_ENV):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                src = rasterio.open(path)
        except (RasterioError, OSError) as e:
            raise RasterError(f"{path}: GDAL cannot open this {what}: {error_text(e)}") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                yield src
        finally:
            src.close()


def _clip(window: Window, width: int, height: int) -> tuple[Window | None, int, int]:
    """The part of `window` inside a width x height raster and its offset inside the window."""
    c0, r0 = max(int(window.col_off), 0), max(int(window.row_off), 0)
    c1 = min(int(window.col_off + window.width), width)
    r1 = min(int(window.row_off + window.height), height)
    if c1 <= c0 or r1 <= r0:
        return None, 0, 0
    return Window(c0, r0, c1 - c0, r1 - r0), r0 - int(window.row_off), c0 - int(window.col_off)


def read(src: rasterio.DatasetReader, indexes: int | Sequence[int], window: Window | None = None,
         *, boundless: bool = False, fill: int = 0) -> np.ndarray:
    """Windowed read with errors that name the file (truncated or corrupt data raise).

    `boundless=True` allows windows that overrun the raster; outside pixels get `fill`. (Done by
    reading the intersection: rasterio's own boundless reads build a VRT per call, much slower.)
    """
    try:
        if not boundless or window is None:
            return src.read(indexes, window=window)
        part, dr, dc = _clip(window, src.width, src.height)
        h, w = int(window.height), int(window.width)
        shape = (h, w) if isinstance(indexes, int) else (len(indexes), h, w)
        out = np.full(shape, fill, dtype=src.dtypes[0])
        if part is not None:
            out[..., dr:dr + int(part.height), dc:dc + int(part.width)] = src.read(indexes, window=part)
        return out
    except (RasterioError, OSError) as e:
        raise RasterError(f"{src.name}: read failed at window {window}: {error_text(e)} "
                          "(truncated or corrupt file?)") from None


def window_transform(window: Window, transform: Affine) -> Affine:
    """Affine transform of a window's pixel grid (its top-left pixel corner becomes the origin)."""
    return transform @ Affine.translation(window.col_off, window.row_off)


def has_mask(src: rasterio.DatasetReader) -> bool:
    """True when the raster declares nodata, an alpha band or a mask band."""
    return any(flags != [MaskFlags.all_valid] for flags in src.mask_flag_enums)


def read_valid(src: rasterio.DatasetReader, window: Window, indexes: Sequence[int]) -> np.ndarray:
    """bool (h, w): pixel inside the raster extent and valid in every band's dataset mask."""
    h, w = int(window.height), int(window.width)
    inside = np.zeros((h, w), dtype=bool)
    part, r0, c0 = _clip(window, src.width, src.height)
    if part is None:
        return inside
    ph, pw = int(part.height), int(part.width)
    if has_mask(src):
        try:
            masks = src.read_masks(list(indexes), window=part)
        except (RasterioError, OSError) as e:
            raise RasterError(f"{src.name}: reading the mask failed: {error_text(e)}") from None
        inside[r0:r0 + ph, c0:c0 + pw] = np.all(masks > 0, axis=0)
    else:
        inside[r0:r0 + ph, c0:c0 + pw] = True
    return inside


def same_grid(a, b, tol: float = 1e-6) -> bool:
    """Same CRS, shape and transform (offsets within `tol` of a pixel)."""
    if (a.width, a.height) != (b.width, b.height) or a.crs != b.crs:
        return False
    ta, tb = a.transform, b.transform
    scale = max(abs(ta.a), abs(ta.e), 1e-12)
    return all(abs(x - y) <= tol * scale for x, y in zip(ta[:6], tb[:6]))


def read_label_aligned(label: rasterio.DatasetReader, image: Grid | rasterio.DatasetReader,
                       window: Window) -> np.ndarray:
    """Label values on the image's pixel grid for `window` (image pixel units): uint8 (h, w).

    `image` is the target grid: an open image dataset or a `Grid`.

    Already aligned (same grid, or no CRS on either side and the same shape): a plain windowed
    read, so values are pixel-exact. Otherwise the label is warped onto the window's grid by GDAL
    with nearest-neighbour resampling (class values are never blended); GDAL reads only the label
    blocks the window needs. Pixels outside the label extent or equal to its nodata become 0
    (ignore). Raises RasterError when there is no CRS to align by and the shapes differ.
    """
    h, w = int(window.height), int(window.width)
    if label.count != 1:
        raise RasterError(f"{label.name}: a label raster must have 1 band, found {label.count}")
    georeferenced = label.crs is not None and image.crs is not None
    if same_grid(label, image) or (not georeferenced and (label.width, label.height) == (image.width, image.height)):
        out = read(label, 1, window, boundless=True, fill=0)
        if label.nodata is not None:
            out = np.where(out == label.nodata, 0, out)
        return out.astype(np.uint8, copy=False)
    if not georeferenced:
        raise RasterError(
            f"{label.name}: cannot align label to image {image.name}: "
            f"{'label' if label.crs is None else 'image'} has no CRS and the shapes differ "
            f"(label {label.width}x{label.height}, image {image.width}x{image.height})")
    out = np.zeros((h, w), dtype=np.uint8)
    try:
        reproject(source=rasterio.band(label, 1), destination=out,
                  src_crs=label.crs, src_transform=label.transform, src_nodata=label.nodata,
                  dst_crs=image.crs, dst_transform=window_transform(window, image.transform), dst_nodata=0,
                  resampling=Resampling.nearest)
    except (RasterioError, OSError) as e:
        raise RasterError(f"{label.name}: warping the label onto {image.name} failed: {error_text(e)}") from None
    return out


def _block_size(width: int, height: int) -> dict:
    """GeoTIFF tiling needs block sizes that are multiples of 16; small rasters stay striped."""
    if width >= 16 and height >= 16:
        bs = min(256, (min(width, height) // 16) * 16)
        return {"tiled": True, "blockxsize": bs, "blockysize": bs}
    return {"tiled": False}


def geotiff_profile(width: int, height: int, count: int, *, crs, transform) -> dict:
    return {**GTIFF_PROFILE, **_block_size(width, height), "width": width, "height": height,
            "count": count, "dtype": "uint8", "crs": crs, "transform": transform}


def write_geotiff(dst: Path, data: np.ndarray, *, crs, transform, mask: np.ndarray | None = None,
                  overwrite: bool = False) -> None:
    """Write uint8 (C, H, W) or (H, W) as a tiled deflate GeoTIFF, atomically (`runtime.destination`).

    `mask` (bool (H, W), True = valid) is stored as the GeoTIFF's internal dataset mask; it is
    omitted when every pixel is valid.
    """
    dst = Path(dst)
    arr = data[None] if data.ndim == 2 else data
    if arr.dtype != np.uint8:
        raise RasterError(f"{dst}: expected uint8 pixels, got {arr.dtype}")
    profile = geotiff_profile(arr.shape[2], arr.shape[1], arr.shape[0], crs=crs, transform=transform)
    with atomic_file(dst, overwrite=overwrite, what="GeoTIFF") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
                with rasterio.open(tmp, "w", **profile) as out:
                    out.write(arr)
                    if mask is not None and not mask.all():
                        out.write_mask(np.where(mask, 255, 0).astype(np.uint8))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def crs_string(crs) -> str | None:
    """'EPSG:xxxx' when the CRS has an authority code, else WKT; None without a CRS."""
    if crs is None:
        return None
    return crs.to_string()
