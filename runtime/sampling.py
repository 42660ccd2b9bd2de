"""Cluster centres from sample windows: for one raster (`fit_raster_centres`, what `segment_raster`
fits), or one set for many rasters (`fit_shared_centres`; `sample_for_sharing` per raster, in any
process, and `fit_from_samples` on all of them, as `runtime.region` runs them on Dask workers).

Sample windows (`sample_raster_cells`): SAMPLE_GRID x SAMPLE_GRID seeded windows of SAMPLE_CORE
pixels spread over the raster, independent of the tile size, so tiled and untiled runs fit the
same centres.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from .cluster import DEFAULT_RESTARTS
from .errors import InputError
from .model import DEFAULT_SAMPLES, Model, load_model, sample_rows
from .raster_io import backend
from .source import GDAL_CACHE_MB, SourceReader, check_int, working_grid

SAMPLE_GRID = 4  # centres are fitted from SAMPLE_GRID x SAMPLE_GRID sample windows
SAMPLE_CORE = 256  # pixels: side of each sample window's core (cells used for fitting)


def sample_raster_cells(reader: SourceReader, height: int, width: int, model: Model,
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


def fit_raster_centres(reader: SourceReader, height: int, width: int, model: Model, k: int, seed: int,
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
    samples = check_int("samples", samples, k)
    restarts = check_int("restarts", restarts, 1)
    balance = check_int("balance", balance, 0)

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
    height: int = 0  # of the grid the network runs on, pixels
    width: int = 0
    native: bool = True  # that grid is the raster's own (not resampled)


def sample_for_sharing(src, model: Model, samples: int, *, bands=None, seed: int = 0, pixel_size="auto",
                       raster_pixel_size_m=None, rescale="auto") -> RasterSample:
    """The part of `fit_shared_centres` done per raster (in any process: `segment_region` runs it
    on Dask workers): the cells of its seeded sample windows, as `segment_raster` reads the raster."""
    io = backend()
    with io.env(GDAL_CACHE_MB), io.errors_as_read_errors(f"sampling {src}"), io.open_source(src) as ds, \
            contextlib.ExitStack() as stack:
        _, values, plan, work, reader = working_grid(ds, src, model, bands, rescale, pixel_size,
                                                      raster_pixel_size_m, stack)
        cells, looked = sample_raster_cells(reader, work.height, work.width, model, seed)
        area = work.height * work.width * cells.shape[0] / looked if looked else 0.0
        native = work is ds
    # at most `samples` per raster (what its quota can use), so memory stays bounded by
    # samples x rasters x D floats: about 2 MB per raster at the defaults
    return RasterSample(sample_rows([cells], samples, seed) if cells.shape[0] else cells, area,
                        f"{plan.note}; {values.note}", work.height, work.width, native)


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
