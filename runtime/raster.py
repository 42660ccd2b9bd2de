"""Whole-raster segmentation: `segment_raster(src, dst, k, model)`.

Any GDAL-readable RGB raster, of any size, is segmented tile by tile with memory bounded by the
tile size, and the result is identical to segmenting the raster in one piece:

- Tiles are `tile` x `tile` pixel cores on a grid whose origins are multiples of 4 (the network's
  stride), each read with a halo of `Model.halo()` pixels (receptive field + smoothing + upsampling
  reach, rounded up to a multiple of 4) clipped at the raster edge. Every output pixel therefore
  sees exactly the input it would see untiled, and the stride-4 cell grid never shifts.
- Cluster centres are fitted once per raster (before any tile) from embeddings of seeded sample
  windows spread over a 4 x 4 grid across the raster, so every tile is assigned against the same
  centres: no seams, no label permutation between tiles. Alternatively, centres="artifact" uses the
  model's precomputed `centres_k<K>` (the same ids across rasters) or an explicit (k, D) array.
- Input nodata (GDAL masks: nodata value, alpha or mask band; NaN in float rasters) stays nodata:
  those pixels are fed to the network as the neutral mean colour and written as NODATA = 255 in
  the output.
- Data that is not 8-bit (`rescale`, `plan_rescale`): by default a 16-bit or float raster is
  stretched band by band from its 2nd-98th percentiles (computed once, from a decimated read of the
  whole raster) to 0..255, the model's input range; explicit (low, high) limits also work.
- Resolution (`pixel_size`, `plan_resolution`): by default a georeferenced raster whose ground
  sample distance differs by more than RESAMPLE_TOLERANCE from the model's training one is read
  through a GDAL warped VRT at the training GSD, tiled and segmented there as above, and its labels
  are warped back (nearest) onto the raster's own grid, block by block.
- Output: single-band uint8 GeoTIFF (tiled 256 x 256, DEFLATE level 1 with the horizontal predictor:
  0.6x the time of level 6 for 1.3x its size on an 8192^2 label map; BIGTIFF when needed) in the source
  CRS and transform, cluster ids 0..k-1 with a colour table, optional internal overviews (nearest),
  and `landseg_*` tags (k, where the centres came from, the model's provenance, the resolution and
  rescale notes, the pixel count of every cluster).
  It is written under a hidden temporary name beside `dst` and renamed when complete: an error,
  a cancel or an interruption leaves no partial `dst`.

Raster I/O goes through `runtime.raster_io`: rasterio where it is installed, else GDAL's own bindings
(`osgeo.gdal`, as in QGIS); either is imported inside the functions, so `import runtime` stays numpy-only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cluster import DEFAULT_RESTARTS
from .command import check_signals
from .destination import atomic_file, discard, temporary
from .errors import Cancelled, InputError
from .model import DEFAULT_SAMPLES, PER_IMAGE_BALANCE, Model, labels_from_cell_proba, load_model, sample_rows
from .raster_io import backend
from .rescale import PERCENTILES, STATS_SIZE, check_limits, percentile_limits, to_uint8
from .resolution import plan_resolution, positive_metres

NODATA = 255  # output value of pixels that are nodata in the input (cluster ids are 0..k-1 <= 15)
DEFAULT_TILE = 2048
SAMPLE_GRID = 4  # centres are fitted from SAMPLE_GRID x SAMPLE_GRID sample windows
SAMPLE_CORE = 256  # pixels: side of each sample window's core (cells used for fitting)
BLOCK = 256  # output GeoTIFF block size
WGS84_A, WGS84_E2 = 6378137.0, 6.69437999014e-3  # semi-major axis (m), first eccentricity squared
GDAL_CACHE_MB = 16  # bounded GDAL block cache (a few tiles of blocks): memory must not grow with the raster
# Distinct colours for cluster ids 0..15 (qualitative palette, readable on imagery).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
           (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
           (196, 156, 148)]


@dataclass
class SegmentResult:
    """What `segment_raster` did: destination, k, the centres used and where they came from, and
    the ground sample distance the network saw (`pixel_size_m`, None when unknown) with a sentence
    saying why (`resolution`). `cluster_pixels[i]` counts the output pixels of cluster i, on the
    raster's own grid; `nodata_pixels` those written as NODATA. `georeferenced` is False when the
    raster has neither a CRS nor a geotransform (a plain JPEG or PNG): the output then has none either
    and is on the raster's pixel grid."""

    dst: Path
    k: int
    centres: np.ndarray
    centres_source: str
    tiles: int
    seconds: float
    pixel_size_m: float | None = None
    resolution: str = ""
    rescale_limits: np.ndarray | None = None
    rescale: str = ""
    cluster_pixels: np.ndarray | None = None
    nodata_pixels: int = 0
    georeferenced: bool = True


def _check_int(name: str, value, lo: int) -> int:
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


def _grid(size: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(step, size - s)) for s in range(0, size, step)]


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


class _Reader:
    """Reads RGB windows (H, W, 3) uint8 plus a nodata mask, with nodata pixels set to a neutral
    colour; with `limits`, the raster's values are first mapped to 0..255 (`to_uint8`)."""

    def __init__(self, ds, bands, model: Model, src, limits: np.ndarray | None = None):
        self.ds, self.bands, self.src, self.limits = ds, list(bands), src, limits
        self.floating = has_float_bands(ds, self.bands)
        self.fill = model.nodata_fill

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
        return (self.ds.read_masks(self.bands, row0, col0, height, width) == 0).any(axis=0)


def sample_raster_cells(reader: _Reader, height: int, width: int, model: Model,
                        seed: int) -> tuple[np.ndarray, int]:
    """Embeddings of seeded sample windows spread across the raster, for fitting centres.

    The raster is split into a SAMPLE_GRID x SAMPLE_GRID grid; in each grid cell one window core of
    SAMPLE_CORE pixels is placed at a seeded random position (multiple of 4), read with a margin of
    the receptive field so that its cells' embeddings equal the untiled ones, and its cells without
    nodata pixels are pooled. Independent of the tile size, so tiled and untiled runs use the same
    cells. Returns the pooled (N, cluster_dim) cells and the number of core cells looked at (valid
    or not), whose ratio estimates the raster's valid share.
    """
    stride = model.stride
    margin = -(-model.receptive_field // stride) * stride
    rng = np.random.default_rng(seed)
    pooled, looked = [], 0
    for gi in range(SAMPLE_GRID):
        for gj in range(SAMPLE_GRID):
            origin = []
            for g, size in ((gi, height), (gj, width)):
                lo, hi = g * size // SAMPLE_GRID, (g + 1) * size // SAMPLE_GRID
                pos = int(rng.integers(lo, max(lo, hi - SAMPLE_CORE) + 1))
                pos = min(pos, max(0, size - SAMPLE_CORE)) // stride * stride
                origin.append(pos)
            (r0, c0) = origin
            r1, c1 = min(height, r0 + SAMPLE_CORE), min(width, c0 + SAMPLE_CORE)
            wr0, wc0 = max(0, r0 - margin), max(0, c0 - margin)
            wr1, wc1 = min(height, r1 + margin), min(width, c1 + margin)
            rgb, nodata = reader.read(wr0, wc0, wr1 - wr0, wc1 - wc0)
            cells = model.embed_cells(rgb)
            # cells of the core only (their whole receptive field lies inside the window)
            a0, b0 = (r0 - wr0) // stride, (c0 - wc0) // stride
            a1, b1 = -(-(r1 - wr0) // stride), -(-(c1 - wc0) // stride)
            core = cells[a0:a1, b0:b1]
            # a cell is usable when none of its pixels is nodata
            pad = np.ones((cells.shape[0] * stride, cells.shape[1] * stride), dtype=bool)
            pad[:nodata.shape[0], :nodata.shape[1]] = nodata
            pad[nodata.shape[0]:, :] = False
            pad[:, nodata.shape[1]:] = False
            bad = pad.reshape(cells.shape[0], stride, cells.shape[1], stride).any(axis=(1, 3))[a0:a1, b0:b1]
            pooled.append(core[~bad])
            looked += bad.size
    return np.concatenate(pooled, axis=0), looked


def fit_raster_centres(reader: _Reader, height: int, width: int, model: Model, k: int, seed: int,
                       samples: int, iters: int | None, restarts: int = DEFAULT_RESTARTS,
                       balance: int = 0) -> np.ndarray:
    """Centres from the cells of `sample_raster_cells`: at most `samples` of them drawn (seeded),
    then `Model.fit_centres_from_cells`."""
    cells, _ = sample_raster_cells(reader, height, width, model, seed)
    if cells.shape[0] < k:
        raise InputError(f"{reader.src}: too few valid (non-nodata) pixels in the sample windows to fit "
                         f"{k} clusters")
    return model.fit_centres_from_cells([cells], k, seed=seed, samples=samples, iters=iters, restarts=restarts,
                                        balance=balance)


@dataclass
class SharedCentres:
    """What `fit_shared_centres` fitted: the (k, cluster_dim) centres, and per raster (in the order
    given) the cells drawn from it and a note on how it was read (resolution; value mapping)."""

    centres: np.ndarray
    sources: list[str]
    cells: list[int]
    notes: list[str]


def fit_shared_centres(sources, k: int, model, *, bands=None, seed: int = 0, samples: int = DEFAULT_SAMPLES,
                       iters: int | None = None, restarts: int = DEFAULT_RESTARTS, balance: int = 0,
                       pixel_size="auto", raster_pixel_size_m=None, rescale="auto") -> SharedCentres:
    """One set of cluster centres for several rasters, so that `segment_raster(..., centres=c)` gives
    every one of them the same cluster ids: one clustering over the whole area (a mosaic of tiles,
    several flights), what evaluate's global protocol measures.

    Each raster is read as `segment_raster` reads it with the same `bands`, `pixel_size`,
    `raster_pixel_size_m` and `rescale` (pass the same values when segmenting), and its cells are
    sampled from the same seeded windows (`sample_raster_cells`). Of the `samples` cells, each raster
    gets a share proportional to its valid area on the grid the network runs on (its pixel count
    times the valid share of its sample windows), so a raster four times larger counts four times
    more, as it would in one clustering of the mosaic; at most the cells its windows hold (a
    uniform subsample of at most `samples` of them is kept per raster while the others are read). Then
    `Model.fit_centres_from_cells`. With one raster the centres equal those `segment_raster` fits on it
    with the same arguments.

    balance: micro-clusters of density-balanced fitting, 0 (plain k-means) by default. Balancing
    is `segment_raster`'s default for one raster, where it gained 0.04-0.09 per image, but over a
    whole region it moved the global protocol by -0.02 to +0.005 (docs/experiments.md, "Balanced
    centres"), so shared centres are plain unless asked.
    """
    if not isinstance(model, Model):
        model = load_model(model)
    k = model.check_k(k)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(src) for src in sources]
    if not sources:
        raise InputError("fit_shared_centres: no rasters given")
    samples = _check_int("samples", samples, k)
    restarts = _check_int("restarts", restarts, 1)
    balance = _check_int("balance", balance, 0)

    drawn = [sample_for_sharing(src, model, samples, bands=bands, seed=seed, pixel_size=pixel_size,
                                raster_pixel_size_m=raster_pixel_size_m, rescale=rescale) for src in sources]
    return fit_from_samples(drawn, sources, k, model, seed=seed, samples=samples, iters=iters, restarts=restarts,
                            balance=balance)


@dataclass
class RasterSample:
    """What `sample_for_sharing` drew from one raster: at most `samples` cells, the raster's valid
    area in working-grid pixels (pixel count times the valid share of its sample windows) and a note
    on how it was read."""

    cells: np.ndarray
    area: float
    note: str


def sample_for_sharing(src, model: Model, samples: int, *, bands=None, seed: int = 0, pixel_size="auto",
                       raster_pixel_size_m=None, rescale="auto") -> RasterSample:
    """The part of `fit_shared_centres` done per raster (in any process: `segment_region` runs it
    on Dask workers): the cells of its seeded sample windows, as `segment_raster` reads the raster."""
    io = backend()
    with io.env(GDAL_CACHE_MB), io.errors_as_read_errors(f"sampling {src}"), io.open_source(src) as ds, \
            contextlib.ExitStack() as stack:
        _, values, plan, work, reader = _working_grid(ds, src, model, bands, rescale, pixel_size,
                                                      raster_pixel_size_m, stack)
        cells, looked = sample_raster_cells(reader, work.height, work.width, model, seed)
        area = work.height * work.width * cells.shape[0] / looked if looked else 0.0
    # at most `samples` per raster (what its quota can use), so memory stays bounded by
    # samples x rasters x D floats: about 2 MB per raster at the defaults
    return RasterSample(sample_rows([cells], samples, seed) if cells.shape[0] else cells, area,
                        f"{plan.note}; {values.note}")


def fit_from_samples(drawn: list[RasterSample], sources: list[str], k: int, model: Model, *, seed: int = 0,
                     samples: int = DEFAULT_SAMPLES, iters: int | None = None, restarts: int = DEFAULT_RESTARTS,
                     balance: int = 0) -> SharedCentres:
    """The shared centres from every raster's `sample_for_sharing` (in the order of `sources`):
    `samples` cells apportioned by valid area, then `Model.fit_centres_from_cells`."""
    if sum(d.area for d in drawn) == 0:
        raise InputError(f"no valid (non-nodata) pixels in the sample windows of any of the {len(sources)} "
                         f"raster(s)")
    quota = _apportion(samples, np.asarray([d.area for d in drawn], dtype=np.float64))
    cells = [sample_rows([d.cells], int(min(q, d.cells.shape[0])), seed) if q else d.cells[:0]
             for d, q in zip(drawn, quota)]
    total = sum(c.shape[0] for c in cells)
    if total < k:
        raise InputError(f"too few valid (non-nodata) pixels in the sample windows of "
                         f"{', '.join(sources)} to fit {k} clusters")
    centres = model.fit_centres_from_cells(cells, k, seed=seed, samples=total, iters=iters, restarts=restarts,
                                           balance=balance)
    return SharedCentres(centres, sources, [c.shape[0] for c in cells], [d.note for d in drawn])


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """`total` split in proportion to `weights` into integers that sum to `total` (largest remainders;
    ties to the earlier entry)."""
    exact = total * weights / weights.sum()
    whole = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - whole), kind="stable")
    whole[order[:total - int(whole.sum())]] += 1
    return whole


def _overview_factors(height: int, width: int) -> list[int]:
    factors, f = [], 2
    while max(height, width) / f >= BLOCK:
        factors.append(f)
        f *= 2
    return factors or ([2] if max(height, width) >= 2 * 16 else [])


def segment_raster(src, dst, k: int, model, *, tile: int = DEFAULT_TILE, bands=None,
                   centres=None, seed: int = 0, samples: int = DEFAULT_SAMPLES,
                   iters: int | None = None, restarts: int = DEFAULT_RESTARTS,
                   balance: int = PER_IMAGE_BALANCE,
                   smooth_iters: int | None = None, pixel_size="auto", raster_pixel_size_m=None,
                   rescale="auto", overwrite: bool = False,
                   overviews: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], bool] | None = None, extra_tags: dict | None = None) -> SegmentResult:
    """Segment the RGB raster `src` into k clusters, writing a uint8 GeoTIFF to `dst`.

    model: a `Model` or an artifact directory path. tile: core tile side in pixels (multiple of 4).
    bands: 1-based (R, G, B) band numbers, required for rasters with more than 3 bands.
    centres: None or "fit" (fit once on this raster, seeded), "artifact" (the model's centres_k<K>),
    or a (k, embed_dim) array. samples/iters/restarts: cells drawn, soft k-means updates and
    seeded k-means++ starts for fitting; balance: micro-clusters of density-balanced fitting
    (each kind of cell counted once rather than by its area, `runtime.cluster.balanced_rows`;
    default PER_IMAGE_BALANCE, 0 = plain k-means).
    smooth_iters: probability smoothing passes (default: the artifact's).
    pixel_size: "auto" (default) runs the network at the model's training ground sample distance
    when the raster's differs from it by more than RESAMPLE_TOLERANCE and both are known (a
    georeferenced raster; `plan_resolution`), "native" at the raster's own grid, a number at that many
    metres per pixel. The labels are always written on the raster's own grid.
    raster_pixel_size_m: the ground pixel size in metres of a raster without a CRS (a scan, a plain
    PNG of known resolution), so that it can be resampled like a georeferenced one; an error for a
    raster with a CRS, which gives its own.
    rescale: how values become the model's 0..255 input (`plan_rescale`): "auto" (default: as the
    model's training data were mapped; for a model trained on 8-bit data, 8-bit as it is and
    anything else stretched from its 2nd-98th percentiles per band), "none" (8-bit only),
    "percentile", or (low, high) / ((low, high),) * 3 limits in the raster's units. progress(done, total) is
    called after every tile (and, for a resampled raster, after every block written back onto the
    raster's grid: total counts both); cancel() is polled before every tile and between those blocks
    and, when it returns True, the run stops with `Cancelled` and nothing is written to `dst`.
    extra_tags: more GeoTIFF metadata items (str: str) for the output (`segment_region` marks its
    outputs so that a rerun recognises the complete ones).
    Returns a `SegmentResult`.
    """
    t_start = time.perf_counter()
    if not isinstance(model, Model):
        model = load_model(model)
    k = model.check_k(k)
    tile = _check_int("tile", tile, 16)
    if tile % model.stride:
        raise InputError(f"tile must be a multiple of {model.stride} pixels, got {tile}")
    samples = _check_int("samples", samples, k)
    restarts = _check_int("restarts", restarts, 1)
    balance = _check_int("balance", balance, 0)
    smooth = model.smooth_iters_default if smooth_iters is None else _check_int("smooth_iters", smooth_iters, 0)

    io = backend()
    # The band threads are the parallelism of the whole run, so BLAS stays single-threaded from start
    # to end, not only inside each forward pass: OpenBLAS's own threads, woken by a product between
    # two passes (fitting, soft assignment), spin on and slow the next pass down.
    blas = model.network.single_threaded_blas()
    # the destination is checked and claimed (an empty temporary beside it) before any work
    with atomic_file(dst, overwrite=overwrite, inputs=[src], what="output") as tmp, io.env(GDAL_CACHE_MB), blas:
        dst = Path(dst)
        work_tmp = temporary(dst, "working")  # labels on a resampled grid
        try:
            with io.errors_as_read_errors(f"segmenting {src} into {dst}"), io.open_source(src) as ds, \
                    contextlib.ExitStack() as stack:
                georeferenced = ds.georeferenced
                bands, values, plan, work, reader = _working_grid(ds, src, model, bands, rescale, pixel_size,
                                                                  raster_pixel_size_m, stack)
                height, width = work.height, work.width

                if centres is None or (isinstance(centres, str) and centres == "fit"):
                    c = fit_raster_centres(reader, height, width, model, k, seed, samples, iters, restarts,
                                           balance)
                    source = f"fitted on this raster (seed {seed})"
                elif isinstance(centres, str) and centres == "artifact":
                    c = model.artifact_centres(k)
                    source = "artifact"
                elif isinstance(centres, str):
                    raise InputError(f"centres must be 'fit', 'artifact' or a (k, D) array, got {centres!r}")
                else:
                    c = model.check_centres(k, centres)
                    source = "given"

                halo = model.halo(smooth)
                tiles = [(r, h, c0, w) for r, h in _grid(height, tile) for c0, w in _grid(width, tile)]
                # a resampled run then writes its labels back onto the raster's grid, block by block
                back = ([] if work is ds else
                        [(r, h, c0, w) for r, h in _grid(ds.height, tile) for c0, w in _grid(ds.width, tile)])
                total = len(tiles) + len(back)
                counts = np.zeros(256, np.int64)  # pixels written per output value, on the raster's grid
                with io.LabelWriter(tmp if work is ds else work_tmp, width, height, work.crs, work.transform,
                                    block=BLOCK, nodata=NODATA) as out:
                    for i, (r0, rh, c0, cw) in enumerate(tiles):
                        check_signals()
                        if cancel is not None and cancel():
                            raise Cancelled(f"cancelled after {i} of {len(tiles)} tiles; {dst} not written")
                        labels = _segment_tile(reader, model, c, smooth, halo, height, width, r0, rh, c0, cw)
                        out.write(labels, r0, c0)
                        if work is ds:
                            counts += np.bincount(labels.ravel(), minlength=256)
                        if progress is not None:
                            progress(i + 1, total)

                def after_block(j: int) -> None:
                    if progress is not None:
                        progress(len(tiles) + j + 1, total)
                    if cancel is not None and j + 1 < len(back) and cancel():
                        raise Cancelled(f"cancelled while writing labels back ({j + 1} of {len(back)} "
                                        f"blocks); {dst} not written")

                if back:
                    _labels_to_source_grid(io, work_tmp, _Reader(ds, bands, model, src, values.limits), tmp,
                                           back, after_block, counts)
                cmap = {i: PALETTE[i % len(PALETTE)] + (255,) for i in range(k)}
                cmap[NODATA] = (0, 0, 0, 0)
                prov = model.meta["provenance"]
                tags = dict(landseg_k=str(k), landseg_centres=source, landseg_model_commit=prov["git_commit"],
                            landseg_model_params_hash=prov["params_hash"], landseg_resolution=plan.note,
                            landseg_rescale=values.note, landseg_cluster_pixels=json.dumps(counts[:k].tolist()),
                            **(extra_tags or {}))
                io.finish_labels(tmp, cmap, f"cluster id 0..{k - 1} ({NODATA} = nodata)", tags,
                                 _overview_factors(ds.height, ds.width) if overviews else [])
        finally:
            discard(work_tmp)
    return SegmentResult(dst, k, c, source, len(tiles), time.perf_counter() - t_start,
                         plan.working_m, plan.note, values.limits, values.note,
                         cluster_pixels=counts[:k], nodata_pixels=int(counts[NODATA]),
                         georeferenced=georeferenced)


def _working_grid(ds, src, model: Model, bands, rescale, pixel_size, raster_pixel_size_m,
                  stack: contextlib.ExitStack):
    """How the network sees the open raster `ds`: its (R, G, B) bands, the mapping of its values to
    0..255 (`plan_rescale`), the resolution plan (`plan_resolution`), the grid it runs on (`ds`
    itself, or a warped VRT at the planned pixel size, closed with `stack`) and a reader of that grid.
    `ds`: a `raster_io` Source."""
    bands = select_bands(ds.count, bands, src)
    values = plan_rescale(ds, bands, rescale, src, model.input_rescale)
    plan = plan_resolution(_raster_m(ds, raster_pixel_size_m, src), model, pixel_size, src)
    work = ds if plan.scale == 1.0 else stack.enter_context(_resampled(ds, plan.scale))
    return bands, values, plan, work, _Reader(work, bands, model, src, values.limits)


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


def _labels_to_source_grid(io, work_path: Path, source: _Reader, dst: Path, blocks,
                           after_block: Callable[[int], None], counts: np.ndarray) -> None:
    """Nearest-neighbour labels from the working grid back onto the source raster's grid, block by
    block (`blocks`: (row, height, col, width) on that grid; `after_block(j)` after the j-th), with
    the source's own nodata pixels set to NODATA (a resampled cell may straddle them). Adds the
    pixels written per value to `counts` (256,)."""
    ds = source.ds
    with io.open_source(work_path) as work, \
            work.warped(ds.transform, ds.width, ds.height, "nearest", src_nodata=NODATA, nodata=NODATA) as back, \
            io.LabelWriter(dst, ds.width, ds.height, ds.crs, ds.transform, block=BLOCK, nodata=NODATA) as out:
        for j, (r0, rh, c0, cw) in enumerate(blocks):
            labels = back.read([1], r0, c0, rh, cw)[0]
            labels[source.nodata(r0, c0, rh, cw)] = NODATA
            out.write(labels, r0, c0)
            counts += np.bincount(labels.ravel(), minlength=256)
            after_block(j)


def _segment_tile(reader: _Reader, model: Model, centres: np.ndarray, smooth: int, halo: int,
                  height: int, width: int, r0: int, rh: int, c0: int, cw: int) -> np.ndarray:
    """Labels (rh, cw) of one tile core, computed on the core plus its halo."""
    s = model.stride
    wr0, wc0 = max(0, r0 - halo), max(0, c0 - halo)
    wr1, wc1 = min(height, r0 + rh + halo), min(width, c0 + cw + halo)
    rgb, nodata = reader.read(wr0, wc0, wr1 - wr0, wc1 - wc0)
    core_nodata = nodata[r0 - wr0: r0 - wr0 + rh, c0 - wc0: c0 - wc0 + cw]
    if core_nodata.all():
        return np.full((rh, cw), NODATA, dtype=np.uint8)
    probs = model.cell_proba(model.embed_cells(rgb), centres, smooth)
    # core cells plus one neighbour cell each side (bilinear upsampling reaches one cell)
    a0, b0 = (r0 - wr0) // s, (c0 - wc0) // s
    a1, b1 = -(-(r0 - wr0 + rh) // s), -(-(c0 - wc0 + cw) // s)
    p0, q0 = max(a0 - 1, 0), max(b0 - 1, 0)
    p1, q1 = min(a1 + 1, probs.shape[1]), min(b1 + 1, probs.shape[2])
    labels = labels_from_cell_proba(probs[:, p0:p1, q0:q1], min(4 * (p1 - p0), (wr1 - wr0) - 4 * p0),
                                    min(4 * (q1 - q0), (wc1 - wc0) - 4 * q0), map_bands=model.network.map)
    y0, x0 = (r0 - wr0) - 4 * p0, (c0 - wc0) - 4 * q0
    core = labels[y0:y0 + rh, x0:x0 + cw].copy()
    core[core_nodata] = NODATA
    return core
