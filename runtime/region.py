"""Segmenting a region: many rasters with one legend, each raster a task on a Dask cluster.

`segment_region(sources, out_dir, k, model_dir)`:
1. every raster's seeded sample windows are embedded on the workers (`sample_for_sharing`, one task
   per raster) and one set of k centres is fitted from all of them on the client
   (`fit_from_samples`: the same centres as `fit_shared_centres` over the same rasters);
2. every raster is then one task that runs `segment_raster` with those centres and writes
   `out_dir/<stem>.tif` (tiled GeoTIFF, written under a temporary name and renamed when complete);
3. `out_dir/region.vrt` mosaics the outputs (georeferenced rasters of one CRS and pixel size, north
   up), so QGIS opens the region as one layer with one colour table.

A rerun skips the outputs that are complete for this run: their `landseg_region` tag holds a digest
of the centres, k, the model's provenance, the reading options and the source file's path, size and
modification time; anything else (a missing tag, another digest, an unreadable file) is segmented
again. A raster that cannot be read or segmented is reported by name with its error, and the others
finish. Memory per worker is that of one `segment_raster` (bounded by its tile size).

Dask (`dask.distributed`) is needed by this module only, and imported when it runs: the runtime's
import and the QGIS plugin stay numpy-only. Without a scheduler address a `LocalCluster` of
`workers` processes (default: one per core) runs on this machine, each worker's network on
cores / workers threads; with `scheduler="tcp://host:8786"` the tasks go to that cluster, whose
workers must see the same paths (a shared disk) and should run one task at a time
(`dask worker --nthreads 1`), each network using that worker's cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from .destination import atomic_file, check_folder, child
from .errors import InputError, LandsegError, MissingDependencyError, error_text
from .model import DEFAULT_SAMPLES, load_model
from .network import default_threads
from .raster import DEFAULT_TILE, NODATA, PALETTE, segment_raster
from .raster_io import backend
from .sampling import RasterSample, fit_from_samples, sample_for_sharing

REGION_TAG = "landseg_region"
VRT_NAME = "region.vrt"
DEFAULT_BLOCK = 8192  # pixels: a larger raster is split into blocks of this side, one task each


@dataclass
class RegionResult:
    """What `segment_region` did: the centres, and per source raster (by its path as given) the
    output written, skipped (already complete) or the error that stopped it."""

    centres: np.ndarray
    outputs: dict[str, list[Path]]  # per source: its output, or one per block of a large raster
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    vrt: Path | None = None
    vrt_note: str = ""
    seconds: float = 0.0


def _dask():
    try:
        from dask import distributed
    except ImportError:
        raise MissingDependencyError("segmenting a region runs on Dask, which is not installed here: "
                                     "pip install 'dask[distributed]'") from None
    return distributed


_models: dict = {}  # per worker process: the artifact loaded once, for every task it runs


def _worker_model(model_dir: str, threads: int | None):
    key = (model_dir, threads)
    if key not in _models:
        _models[key] = load_model(model_dir, threads=threads)
    return _models[key]


def _sample_task(src: str, model_dir: str, threads: int | None, samples: int, options: dict):
    return sample_for_sharing(src, _worker_model(model_dir, threads), samples, seed=options["seed"],
                              bands=options["bands"], pixel_size=options["pixel_size"], rescale=options["rescale"])


def _segment_task(src: str, dst: str, model_dir: str, threads: int | None, k: int, centres: np.ndarray,
                  digest: str, options: dict, window) -> str:
    segment_raster(src, dst, k, _worker_model(model_dir, threads), centres=centres, bands=options["bands"],
                   pixel_size=options["pixel_size"], rescale=options["rescale"], tile=options["tile"],
                   overwrite=True, extra_tags={REGION_TAG: digest}, window=window)
    return dst


def raster_parts(src: str, out: Path, sample: RasterSample, block: int) -> list[tuple[Path, tuple | None]]:
    """The outputs of one raster: (out, None) for the whole raster, or, for a raster on its own grid
    larger than `block` x `block` pixels, one window per block, written to <stem>_r<row>_c<col>.tif
    (windows tile the raster, so their labels are the whole raster's: `segment_raster`'s window)."""
    if not sample.native or (sample.height <= block and sample.width <= block):
        return [(out, None)]
    return [(out.with_name(f"{out.stem}_r{r}_c{c}.tif"), (r, c, min(block, sample.height - r), min(block, sample.width - c)))
            for r in range(0, sample.height, block) for c in range(0, sample.width, block)]


def _failure(e: BaseException) -> str:
    return error_text(e) if isinstance(e, LandsegError) else f"{type(e).__name__}: {error_text(e)}"


def output_names(sources: list[str], out_dir: Path) -> dict[str, Path]:
    """out_dir/<stem>.tif for every source; InputError when two sources share a stem."""
    outputs, seen = {}, {}
    for src in sources:
        stem = Path(src).stem
        if stem in seen:
            raise InputError(f"{seen[stem]} and {src} would both be written to {out_dir / (stem + '.tif')}: "
                             "give rasters of a region distinct file names")
        seen[stem] = src
        outputs[src] = child(out_dir, stem, "output name", ".tif")
    return outputs


def run_identity(k: int, centres: np.ndarray, model_dir: str, options: dict) -> dict:
    """What every output of a run shares: k, the centres, the model and the reading options (the
    tile size changes no result and is left out)."""
    meta_file = Path(model_dir) / "meta.json"
    model = hashlib.sha256(meta_file.read_bytes()).hexdigest() if meta_file.exists() else str(model_dir)
    return {"k": k, "centres": hashlib.sha256(np.ascontiguousarray(centres, np.float32).tobytes()).hexdigest(),
            "model": model, **{key: options[key] for key in ("bands", "pixel_size", "rescale")}}


def region_digest(src: str, identity: dict, window=None) -> str:
    """What makes an output complete for this run: the source file as it is now, its window and
    the run's `run_identity`."""
    st = os.stat(src)
    payload = {"source": os.path.abspath(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
               "window": list(window) if window else None, **identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _complete(dst: Path, digest: str, io) -> bool:
    if not dst.is_file():
        return False
    try:
        return io.read_tags(dst).get(REGION_TAG) == digest
    except LandsegError:  # unreadable (cut short by a crash of another writer): segmented again
        return False


def segment_region(sources, out_dir, k: int, model_dir, *, scheduler: str | None = None,
                   workers: int | None = None, bands=None, seed: int = 0, samples: int = DEFAULT_SAMPLES,
                   iters: int | None = None, restarts: int | None = None, balance: int = 0,
                   pixel_size="auto", rescale="auto", tile: int = DEFAULT_TILE, block: int = DEFAULT_BLOCK,
                   progress=None) -> RegionResult:
    """Segment `sources` (raster paths) into `out_dir` with one set of k centres (module docstring).

    model_dir: an artifact directory every worker can read. scheduler: a Dask scheduler address, or
    None for a LocalCluster of `workers` processes on this machine. bands, pixel_size, rescale and
    tile: as `segment_raster`; block: a raster on its own grid larger than block x block pixels is
    segmented as one task per block (a multiple of the model's stride; memory per worker is then
    that of one block); seed, samples, iters, restarts, balance: as `fit_shared_centres`
    (plain k-means by default). progress(message) is called with one line per finished step.
    Returns a `RegionResult`; a raster that failed is in `failed`, the others are complete.
    """
    t_start = time.perf_counter()
    distributed = _dask()
    sources = [str(s) for s in sources]
    if not sources:
        raise InputError("segment_region: no rasters given")
    out_dir = check_folder(out_dir, "region's output folder")
    if not out_dir.parent.is_dir():
        raise InputError(f"{out_dir.parent}: folder of the region's output folder does not exist")
    outputs = output_names(sources, out_dir)
    model_dir = str(model_dir)
    model = load_model(model_dir)  # checked here, before any task; the client fits the centres with it
    k = model.check_k(k)
    if isinstance(block, bool) or not isinstance(block, int) or block < model.stride or block % model.stride:
        raise InputError(f"block must be a positive multiple of {model.stride} pixels, got {block!r}")
    options = {"bands": list(bands) if bands is not None else None, "pixel_size": pixel_size,
               "rescale": rescale, "tile": tile, "seed": seed}
    say = progress or (lambda message: None)
    out_dir.mkdir(exist_ok=True)

    cluster = None
    if scheduler is None:
        workers = workers or default_threads()
        # the workers' own log lines stay quiet: every failure is reported here, by raster
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.CRITICAL)
        threads = max(1, default_threads() // workers)
    else:
        threads = None
    result = RegionResult(np.zeros((0, 0), np.float32), {src: [dst] for src, dst in outputs.items()})
    try:
        with distributed.Client(cluster if cluster is not None else scheduler) as client:
            futures = client.map(_sample_task, sources, model_dir=model_dir, threads=threads, samples=samples,
                                 options=options, pure=False)
            sampled, usable = [], []
            for src, future in zip(sources, futures):
                try:
                    sampled.append(future.result())
                    usable.append(src)
                except Exception as e:  # noqa: BLE001 (as below)
                    result.failed[src] = _failure(e)
                    say(f"{src}: failed: {result.failed[src]}")
            if not usable:
                raise InputError("no raster of the region could be read: " +
                                 "; ".join(f"{s}: {m}" for s, m in result.failed.items()))
            fit = {} if restarts is None else {"restarts": restarts}
            shared = fit_from_samples(sampled, usable, k, model, seed=seed, samples=samples, iters=iters,
                                      balance=balance, **fit)
            result.centres = shared.centres
            say(f"centres fitted on {sum(shared.cells)} cells of {len(usable)} raster(s)")

            io = backend()
            identity = run_identity(k, shared.centres, model_dir, options)
            todo: dict[str, list] = {}
            for src, sample in zip(usable, sampled):
                parts = raster_parts(src, outputs[src], sample, block)
                result.outputs[src] = [dst for dst, _ in parts]
                for dst, window in parts:
                    digest = region_digest(src, identity, window)
                    if not _complete(dst, digest, io):
                        todo.setdefault(src, []).append((dst, window, digest))
                if src not in todo:
                    result.skipped.append(src)
                    say(f"{src}: complete, skipped")
            futures = {src: [client.submit(_segment_task, src, str(dst), model_dir, threads, k, shared.centres,
                                           digest, options, window, pure=False) for dst, window, digest in parts]
                       for src, parts in todo.items()}
            for src, parts in futures.items():
                errors = []
                for future in parts:
                    try:
                        future.result()
                    except Exception as e:  # noqa: BLE001 (a bad raster or a lost worker: reported, the others go on)
                        errors.append(_failure(e))
                if errors:
                    result.failed[src] = errors[0]
                    say(f"{src}: failed: {result.failed[src]}")
                else:
                    result.written.append(src)
                    say(f"{src}: written to {', '.join(str(p) for p in result.outputs[src])}")
    finally:
        if cluster is not None:
            cluster.close()
    done = [p for s in sources if s in result.written or s in result.skipped for p in result.outputs[s]]
    result.vrt, result.vrt_note = write_region_vrt(done, out_dir / VRT_NAME, k)
    result.seconds = time.perf_counter() - t_start
    return result


def write_region_vrt(outputs: list[Path], dst: Path, k: int) -> tuple[Path | None, str]:
    """A VRT mosaic of label GeoTIFFs of one CRS and pixel size (north up) with the cluster colour
    table: (its path, "") or (None, why not)."""
    if not outputs:
        return None, "no output to mosaic"
    io = backend()
    grids = []
    for path in outputs:
        with io.open_source(path) as src:
            t = src.transform
            grids.append((path, src.width, src.height, io.crs_wkt(src), t.a, t.b, t.c, t.d, t.e, t.f,
                          src.georeferenced))
    if not all(g[10] for g in grids):
        return None, "some outputs have no georeferencing: no mosaic"
    crs, a, e = grids[0][3], grids[0][4], grids[0][8]
    for path, _, _, wkt, ga, gb, _, gd, ge, _, _ in grids:
        if gb or gd:
            return None, f"{path} is rotated: no mosaic"
        if wkt != crs or not (np.isclose(ga, a, rtol=1e-9) and np.isclose(ge, e, rtol=1e-9)):
            return None, f"{path} has another CRS or pixel size than {grids[0][0]}: no mosaic"
    x0 = min(g[6] for g in grids) if a > 0 else max(g[6] for g in grids)
    y0 = max(g[9] for g in grids) if e < 0 else min(g[9] for g in grids)
    spans = [((g[6] - x0) / a, (g[9] - y0) / e, g[1], g[2]) for g in grids]
    width = int(round(max(x + w for x, _, w, _ in spans)))
    height = int(round(max(y + h for _, y, _, h in spans)))
    colours = [PALETTE[i % len(PALETTE)] + (255,) for i in range(k)]
    entries = "".join(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{al}"/>' for r, g, b, al in colours)
    entries += '<Entry c1="0" c2="0" c3="0" c4="0"/>' * (NODATA - k) + '<Entry c1="0" c2="0" c3="0" c4="0"/>'
    sources = "".join(
        f'<SimpleSource><SourceFilename relativeToVRT="1">{escape(path.name)}</SourceFilename>'
        f'<SourceBand>1</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
        f'<DstRect xOff="{x:.10g}" yOff="{y:.10g}" xSize="{w}" ySize="{h}"/></SimpleSource>'
        for path, (x, y, w, h) in zip(outputs, spans))
    xml = (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
           f'<SRS>{escape(crs or "")}</SRS><GeoTransform>{x0!r}, {a!r}, 0.0, {y0!r}, 0.0, {e!r}</GeoTransform>'
           f'<VRTRasterBand dataType="Byte" band="1"><NoDataValue>{NODATA}</NoDataValue>'
           f'<ColorInterp>Palette</ColorInterp><ColorTable>{entries}</ColorTable>{sources}'
           f'</VRTRasterBand></VRTDataset>\n')
    with atomic_file(dst, overwrite=True, what="region mosaic") as tmp:
        Path(tmp).write_text(xml)
    return dst, ""
