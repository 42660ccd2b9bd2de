"""How a source raster is read for the network: its RGB bands, how its values become 8-bit, the
grid the network runs on, and windows of it as uint8 (H, W, 3) arrays with a nodata mask.

Units: windows are (row0, col0, height, width) in pixels of the grid being read (the raster's own,
or a warped view at the model's training ground sample distance); pixel sizes are metres on the
ground. Used by `runtime.raster` (whole rasters) and `runtime.sampling` (centre fitting).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .model import Model
from .raster_io import backend
from .rescale import PERCENTILES, STATS_SIZE, check_limits, percentile_limits, to_uint8
from .resolution import plan_resolution, positive_metres

WGS84_A, WGS84_E2 = 6378137.0, 6.69437999014e-3  # semi-major axis (m), first eccentricity squared


GDAL_CACHE_MB = 16  # bounded GDAL block cache (a few tiles of blocks): memory must not grow with the raster
# Distinct colours for cluster ids 0..15 (qualitative palette, readable on imagery).


def check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def select_bands(count: int, bands, src) -> tuple[int, int, int]:
    """The 1-based (R, G, B) band indices to read from a raster with `count` bands."""
    if count < 3:
        raise InputError(f"{src}: has {count} band(s); an RGB raster with at least 3 bands is required")
    if bands is None:
        if count == 3:
            return (1, 2, 3)
        raise InputError(f"{src}: has {count} bands; say which three are red, green and blue "
                         f"(bands=(1, 2, 3) / --bands 1,2,3)")
    bands = tuple(bands)
    if len(bands) != 3 or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool)
                                  for b in bands):
        raise InputError(f"bands must be three band numbers (R, G, B), got {bands!r}")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise InputError(f"{src}: band(s) {bad} out of range; the raster has bands 1..{count}")
    return tuple(int(b) for b in bands)


def ground_pixel_size_m(crs, transform, width: int = 1, height: int = 1, io=None) -> float | None:
    """Ground sample distance in metres at the centre of a `width` x `height` pixel grid: the side
    of a square with the ground area of one pixel.

    The pixel's two edge vectors are taken to longitude / latitude by GDAL (`crs` -> WGS 84) and
    measured with the WGS 84 ellipsoid's local radii of curvature, so a geographic CRS (degrees),
    Web Mercator (whose "metres" are 1 / cos(latitude) ground metres) and feet-based CRSs all give
    ground metres. None without a CRS or when GDAL cannot relate the CRS to WGS 84. `crs` is the
    raster I/O backend's (`io`, default `raster_io.backend()`): a rasterio CRS or WKT.
    """
    if crs is None:
        return None
    col, row = width / 2, height / 2
    t = transform  # written out, not `t * (x, y)` / `t @ (x, y)`, which affine versions disagree on
    grid = [(col, row), (col + 1, row), (col, row + 1)]
    xs = [t.a * c + t.b * r + t.c for c, r in grid]
    ys = [t.d * c + t.e * r + t.f for c, r in grid]
    lonlat = (io or backend()).wgs84_points(crs, xs, ys)
    if lonlat is None:  # no transformation to WGS 84 (e.g. a local CRS)
        return None
    lon, lat = lonlat
    if not all(math.isfinite(v) for v in (*lon, *lat)):
        return None
    phi = math.radians(lat[0])
    w = 1.0 - WGS84_E2 * math.sin(phi) ** 2
    east = WGS84_A / math.sqrt(w) * math.cos(phi)  # metres per radian of longitude
    north = WGS84_A * (1.0 - WGS84_E2) / w ** 1.5  # metres per radian of latitude
    edges = [(math.radians((lon[i] - lon[0] + 180.0) % 360.0 - 180.0) * east,
              math.radians(lat[i] - lat[0]) * north) for i in (1, 2)]
    area = abs(edges[0][0] * edges[1][1] - edges[0][1] * edges[1][0])
    return float(math.sqrt(area)) if area > 0 else None


@dataclass
class RescalePlan:
    """How raster values become the model's 0..255 input: `limits` (3, 2) (low, high) per band in
    the raster's units mapped linearly to 0..255, or None for 8-bit data used as it is."""

    limits: np.ndarray | None
    note: str


def plan_rescale(ds, bands, rescale, src, trained: dict | None = None, window=None) -> RescalePlan:
    """Decide how `segment_raster` maps the raster's values to 0..255.

    rescale: "auto" (default) maps the raster the way the model's training data were mapped
    (`trained`, the artifact's `input_rescale`): for a model trained on data stretched image by
    image ("percentile") every raster, 8-bit too, is stretched likewise; for one trained with
    fixed limits, data that is not 8-bit is mapped from those limits; otherwise (trained on 8-bit
    data, or `trained` None) 8-bit data is used as it is and anything else is stretched like
    "percentile". "none" requires 8-bit data; "percentile" maps each band's 2nd-98th percentiles of
    valid values (from a read of the whole raster decimated to STATS_SIZE pixels on its long side)
    to 0..255; a (low, high) pair (all bands) or three pairs (R, G, B) in the raster's units give the
    limits directly. ds: a `raster_io` Source. window: (col0, row0, width, height) in pixels the
    percentiles are taken over (default: the whole raster).
    """
    dtypes = sorted({ds.dtypes[b - 1] for b in bands})
    kind = "/".join(dtypes)
    if any("complex" in d for d in dtypes):  # CInt16, CFloat32, ... (radar): no RGB reading of them
        raise InputError(f"{src}: bands {list(bands)} are {kind}; complex values are not RGB imagery "
                         "(convert them to real-valued bands first, e.g. amplitude with gdal_calc)")
    if isinstance(rescale, str) and rescale == "auto" and trained is not None:
        if trained["mode"] == "percentile":
            rescale = "percentile"
        elif trained["mode"] == "fixed" and dtypes != ["uint8"]:
            return _limits_plan(kind, "mapped from the model's training limits", check_limits(trained["limits"]))
    if isinstance(rescale, str):
        if rescale not in ("auto", "none", "percentile"):
            raise InputError(f"rescale must be 'auto', 'none', 'percentile' or (low, high) limits, got {rescale!r}")
        if rescale in ("auto", "none") and dtypes == ["uint8"]:
            return RescalePlan(None, "8-bit input used as it is")
        if rescale == "none":
            raise InputError(f"{src}: bands {list(bands)} are {kind}; rescale='none' needs 8-bit (uint8) RGB "
                             "(use rescale='auto' or 'percentile' to stretch it, or give (low, high) limits)")
        limits = _raster_percentiles(ds, bands, src, window)
        lo_p, hi_p = PERCENTILES
        how = f"stretched band by band from its {lo_p:g}-{hi_p:g} % percentile range"
    else:
        limits = check_limits(rescale, "rescale")
        how = "mapped from the given limits"
    return _limits_plan(kind, how, limits)


def _limits_plan(kind: str, how: str, limits: np.ndarray) -> RescalePlan:
    ranges = ", ".join(f"{name} {lo:.6g}..{hi:.6g}" for name, (lo, hi) in zip("RGB", limits))
    return RescalePlan(limits, f"{kind} input {how} ({ranges}) to 0..255")


def has_float_bands(ds, bands) -> bool:
    """True when any of `bands` (1-based) is floating point: its NaN / inf pixels are nodata."""
    return any(np.issubdtype(np.dtype(ds.dtypes[b - 1]), np.floating) for b in bands)


def _raster_percentiles(ds, bands, src, window=None) -> np.ndarray:
    """Per-band PERCENTILES limits of the valid values of the raster (or of `window`, (col0, row0,
    width, height)), from a read decimated to STATS_SIZE pixels on the long side."""
    height, width = (ds.height, ds.width) if window is None else (int(window[3]), int(window[2]))
    f = max(1.0, max(height, width) / STATS_SIZE)
    data, masks = ds.read_decimated(bands, max(1, round(height / f)), max(1, round(width / f)), window)
    return percentile_limits(data.transpose(1, 2, 0), (masks != 0).all(axis=0), PERCENTILES, src)


class SourceReader:
    """Reads RGB windows (H, W, 3) uint8 plus a nodata mask, with nodata pixels set to a neutral
    colour; with `limits`, the raster's values are first mapped to 0..255 (`to_uint8`)."""

    def __init__(self, ds, bands, model: Model, src, limits: np.ndarray | None = None):
        self.ds, self.bands, self.src, self.limits = ds, list(bands), src, limits
        self.floating = has_float_bands(ds, self.bands)
        self.fill = model.nodata_fill
        self.all_valid = ds.all_valid(self.bands)

    def read(self, row0: int, col0: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        data = self._values(row0, col0, height, width)
        nodata = self._masked(row0, col0, height, width)
        if self.floating:
            nodata |= ~np.isfinite(data).all(axis=0)
        if self.limits is not None:
            rgb = to_uint8(data.transpose(1, 2, 0), self.limits)
        else:
            # band-interleaved to pixel-interleaved one band at a time: 8x faster than copying the
            # transposed view, whose inner loop runs over 3 values
            rgb = np.empty(data.shape[1:] + (3,), dtype=data.dtype)
            for c in range(3):
                rgb[..., c] = data[c]
        if nodata.any():
            rgb[nodata] = self.fill
        return rgb, nodata

    def nodata(self, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        """(height, width) bool: pixels that GDAL masks in any of the RGB bands (or NaN / inf in a
        float raster)."""
        nodata = self._masked(row0, col0, height, width)
        if self.floating:
            nodata |= ~np.isfinite(self._values(row0, col0, height, width)).all(axis=0)
        return nodata

    def _values(self, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        """The RGB bands' values (3, height, width) in the raster's own dtype."""
        return self.ds.read(self.bands, row0, col0, height, width)

    def _masked(self, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        if self.all_valid:
            return np.zeros((height, width), dtype=bool)
        return (self.ds.read_masks(self.bands, row0, col0, height, width) == 0).any(axis=0)


def working_grid(ds, src, model: Model, bands, rescale, pixel_size, raster_pixel_size_m,
                  stack: contextlib.ExitStack):
    """How the network sees the open raster `ds`: its (R, G, B) bands, the mapping of its values to
    0..255 (`plan_rescale`), the resolution plan (`plan_resolution`), the grid it runs on (`ds`
    itself, or a warped VRT at the planned pixel size, closed with `stack`) and a reader of that grid.
    `ds`: a `raster_io` Source."""
    bands = select_bands(ds.count, bands, src)
    values = plan_rescale(ds, bands, rescale, src, model.input_rescale)
    plan = plan_resolution(_raster_m(ds, raster_pixel_size_m, src), model, pixel_size, src)
    work = ds if plan.scale == 1.0 else stack.enter_context(_resampled(ds, plan.scale))
    return bands, values, plan, work, SourceReader(work, bands, model, src, values.limits)


def _raster_m(ds, declared, src) -> float | None:
    """The raster's ground pixel size in metres: from its CRS, else `declared`, else None."""
    if declared is None:
        return ground_pixel_size_m(ds.crs, ds.transform, ds.width, ds.height)
    if positive_metres(declared) is None:
        raise InputError(f"raster_pixel_size_m must be a positive number of metres, got {declared!r}")
    if ds.crs is not None:
        raise InputError(f"{src}: has a CRS, which gives its pixel size; raster_pixel_size_m is for rasters "
                         "without one")
    return float(declared)


def _resampled(ds, scale: float):
    """A virtual (GDAL warped VRT) view of `ds` whose pixels are `scale` times larger, same CRS and
    origin: area-averaged when coarser (no aliasing), bilinear when finer. Pixels beyond the
    source's edge are masked (alpha band, or the source's nodata value)."""
    width = max(1, int(np.ceil(ds.width / scale - 1e-9)))
    height = max(1, int(np.ceil(ds.height / scale - 1e-9)))
    # GDAL carries a nodata value or an alpha band into the VRT itself; otherwise an alpha band is
    # added so that pixels beyond the source's edge read as masked
    t = ds.transform  # same origin, pixel vectors `scale` times longer
    scaled = (t.a * scale, t.b * scale, t.c, t.d * scale, t.e * scale, t.f)
    return ds.warped(scaled, width, height, "average" if scale > 1 else "bilinear",
                     add_alpha=ds.nodata is None and not ds.has_alpha)
