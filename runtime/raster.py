
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

How a raster is read (bands, value mapping, working grid) is `runtime.source`; how centres are fitted
from sample windows, `runtime.sampling`. Raster I/O goes through `runtime.raster_io`: rasterio where
it is installed, else GDAL's own bindings (`osgeo.gdal`, as in QGIS); either is imported inside the
functions, so `import runtime` stays numpy-only.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cluster import DEFAULT_RESTARTS
from .command import check_signals
from .destination import atomic_file, discard, temporary
from .errors import Cancelled, InputError
from .model import DEFAULT_SAMPLES, PER_IMAGE_BALANCE, Model, load_model
from .raster_io import backend
from .sampling import fit_raster_centres
from .source import GDAL_CACHE_MB, SourceReader, check_int, working_grid

NODATA = 255  # output value of pixels that are nodata in the input (cluster ids are 0..k-1 <= 15)


DEFAULT_TILE = 2048


BLOCK = 256  # output GeoTIFF block size


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


def _grid(size: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(step, size - s)) for s in range(0, size, step)]


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
                   cancel: Callable[[], bool] | None = None, extra_tags: dict | None = None,
                   window: tuple[int, int, int, int] | None = None) -> SegmentResult:
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
    window: (row0, col0, height, width) in pixels of the raster's grid, row0 and col0 multiples of
    the model's stride: only that part is segmented and written (with its own transform), with the
    same halo as every tile, so windows that tile the raster give exactly its labels (how
    `segment_region` spreads one large raster over workers). Needs given centres (an array or
    "artifact": one legend for every window) and the raster on its own grid (no resampling).
    Returns a `SegmentResult`.
    """
    t_start = time.perf_counter()
    if not isinstance(model, Model):
        model = load_model(model)
    k = model.check_k(k)
    tile = check_int("tile", tile, 16)
    if tile % model.stride:
        raise InputError(f"tile must be a multiple of {model.stride} pixels, got {tile}")
    samples = check_int("samples", samples, k)
    restarts = check_int("restarts", restarts, 1)
    balance = check_int("balance", balance, 0)
    smooth = model.smooth_iters_default if smooth_iters is None else check_int("smooth_iters", smooth_iters, 0)

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
                bands, values, plan, work, reader = working_grid(ds, src, model, bands, rescale, pixel_size,
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
                row0, col0, out_h, out_w = _check_window(window, height, width, model.stride, src, work is ds,
                                                         centres)
                tiles = [(row0 + r, h, col0 + c0, w) for r, h in _grid(out_h, tile) for c0, w in _grid(out_w, tile)]
                # a resampled run then writes its labels back onto the raster's grid, block by block
                back = ([] if work is ds else
                        [(r, h, c0, w) for r, h in _grid(ds.height, tile) for c0, w in _grid(ds.width, tile)])
                total = len(tiles) + len(back)
                counts = np.zeros(256, np.int64)  # pixels written per output value, on the raster's grid
                out_transform = io.window_transform(work.transform, row0, col0) if window else work.transform
                with io.LabelWriter(tmp if work is ds else work_tmp, out_w, out_h, work.crs, out_transform,
                                    block=BLOCK, nodata=NODATA) as out:
                    for i, (r0, rh, c0, cw) in enumerate(tiles):
                        check_signals()
                        if cancel is not None and cancel():
                            raise Cancelled(f"cancelled after {i} of {len(tiles)} tiles; {dst} not written")
                        labels = _segment_tile(reader, model, c, smooth, halo, height, width, r0, rh, c0, cw)
                        out.write(labels, r0 - row0, c0 - col0)
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
                    _labels_to_source_grid(io, work_tmp, SourceReader(ds, bands, model, src, values.limits), tmp,
                                           back, after_block, counts)
                cmap = {i: PALETTE[i % len(PALETTE)] + (255,) for i in range(k)}
                cmap[NODATA] = (0, 0, 0, 0)
                prov = model.meta["provenance"]
                tags = dict(landseg_k=str(k), landseg_centres=source, landseg_model_commit=prov["git_commit"],
                            landseg_model_params_hash=prov["params_hash"], landseg_resolution=plan.note,
                            landseg_rescale=values.note, landseg_cluster_pixels=json.dumps(counts[:k].tolist()),
                            **(extra_tags or {}))
                if window:
                    tags["landseg_window"] = json.dumps([row0, col0, out_h, out_w])
                io.finish_labels(tmp, cmap, f"cluster id 0..{k - 1} ({NODATA} = nodata)", tags,
                                 _overview_factors(out_h, out_w) if overviews else [])
        finally:
            discard(work_tmp)
    return SegmentResult(dst, k, c, source, len(tiles), time.perf_counter() - t_start,
                         plan.working_m, plan.note, values.limits, values.note,
                         cluster_pixels=counts[:k], nodata_pixels=int(counts[NODATA]),
                         georeferenced=georeferenced)


def _labels_to_source_grid(io, work_path: Path, source: SourceReader, dst: Path, blocks,
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


def _check_window(window, height: int, width: int, stride: int, src, native: bool, centres):
    """(row0, col0, height, width) of the part of the raster to segment: all of it without a window."""
    if window is None:
        return 0, 0, height, width
    if not native:
        raise InputError(f"{src}: a window needs the raster on its own grid, but it is resampled to the model's "
                         "pixel size: pass pixel_size='native' or segment it whole")
    if centres is None or (isinstance(centres, str) and centres == "fit"):
        raise InputError("a window needs given centres (an array or 'artifact'): centres fitted on one window "
                         "would give every window another legend")
    try:
        row0, col0, h, w = (int(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"window must be (row0, col0, height, width) in pixels, got {window!r}") from None
    if row0 % stride or col0 % stride:
        raise InputError(f"window origin must be a multiple of the model's stride ({stride} px), got ({row0}, {col0})")
    if row0 < 0 or col0 < 0 or h < 1 or w < 1 or row0 + h > height or col0 + w > width:
        raise InputError(f"window {window!r} is not inside the {height} x {width} raster {src}")
    return row0, col0, h, w


def _segment_tile(reader: SourceReader, model: Model, centres: np.ndarray, smooth: int, halo: int,
                  height: int, width: int, r0: int, rh: int, c0: int, cw: int) -> np.ndarray:
    """Labels (rh, cw) of one tile core, computed on the core plus its halo."""
    s = model.stride
    wr0, wc0 = max(0, r0 - halo), max(0, c0 - halo)
    wr1, wc1 = min(height, r0 + rh + halo), min(width, c0 + cw + halo)
    rgb, nodata = reader.read(wr0, wc0, wr1 - wr0, wc1 - wc0)
    core_nodata = nodata[r0 - wr0: r0 - wr0 + rh, c0 - wc0: c0 - wc0 + cw]
    if core_nodata.all():
        return np.full((rh, cw), NODATA, dtype=np.uint8)
    colours = model.image_colours(rgb)
    probs = model.cell_proba(model.embed_cells(rgb), centres, smooth, image=rgb, colours=colours)
    # core cells plus one neighbour cell each side (bilinear upsampling reaches one cell)
    a0, b0 = (r0 - wr0) // s, (c0 - wc0) // s
    a1, b1 = -(-(r0 - wr0 + rh) // s), -(-(c0 - wc0 + cw) // s)
    p0, q0 = max(a0 - 1, 0), max(b0 - 1, 0)
    p1, q1 = min(a1 + 1, probs.shape[1]), min(b1 + 1, probs.shape[2])
    lh, lw = min(4 * (p1 - p0), (wr1 - wr0) - 4 * p0), min(4 * (q1 - q0), (wc1 - wc0) - 4 * q0)
    labels = model.labels_from_proba(probs[:, p0:p1, q0:q1], lh, lw, rgb[4 * p0:4 * p0 + lh, 4 * q0:4 * q0 + lw],
                                     None if colours is None else colours[p0:p1, q0:q1])
    y0, x0 = (r0 - wr0) - 4 * p0, (c0 - wc0) - 4 * q0
    core = labels[y0:y0 + rh, x0:x0 + cw].copy()
    core[core_nodata] = NODATA
    return core
