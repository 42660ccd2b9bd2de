"""Command line: `python -m runtime segment IN OUT --k 6` (also installed as `landseg-segment`),
`python -m runtime fit-centres IN [IN ...] --k 6 --out centres.npy`, `python -m runtime segment-region
IN [IN ...] --out-dir DIR --k 6` (on Dask) and `python -m runtime info`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .artifact import artifact_files
from .cluster import DEFAULT_RESTARTS
from .command import EXIT_BAD_INPUT, run_command
from .destination import atomic_file, check_file
from .errors import InputError, OutputError
from .model import DEFAULT_SAMPLES, PER_IMAGE_BALANCE
from .raster import DEFAULT_TILE

# A cluster under this share of the valid pixels is reported as near-empty, so that a user sees when
# the map holds fewer covers than --k asked for: a raster with fewer covers than k, or centres fitted
# elsewhere (--centres). On Dubai's 256 px evaluation tiles, plain k-means centres fitted over many
# tiles spent one of five centres on the outermost cells of every tile (their receptive field half
# zero padding), which smoothing then all but erased (docs/experiments.md, "Across datasets", 2026-11-27); a
# small raster can do the same.
NEAR_EMPTY_SHARE = 0.01

DESCRIPTION = """\
Segment an RGB aerial image (any GDAL-readable raster, e.g. a GeoTIFF orthophoto) into K land-cover
clusters with the exported landseg model. The output is a single-band 8-bit GeoTIFF with the same
extent, CRS and pixel grid as the input: each pixel holds a cluster id 0..K-1 (with a colour
table for QGIS), and pixels that are nodata in the input are written as 255 (the output's nodata
value). Clusters are unsupervised: the ids are not classes; name them by looking at the result.

The raster is processed in tiles, so any size works; the result is the same as processing it in
one piece. Cluster centres are fitted once per raster from samples across it; to keep the same
ids across several rasters, fit one set on all of them (python -m runtime fit-centres) or reuse
saved or artifact centres (--centres).
"""

EPILOG = """\
examples:
  python -m runtime segment ortho.tif clusters.tif --k 6
  landseg-segment naip_rgbn.tif clusters.tif --k 5 --bands 1,2,3 --overviews
  landseg-segment uint16_ortho.tif clusters.tif --k 6              # 16-bit: 2-98 % stretch
  landseg-segment a.tif a_k6.tif --k 6 --save-centres centres_k6.npy
  landseg-segment b.tif b_k6.tif --k 6 --centres centres_k6.npy     # same ids as a.tif
  python -m runtime fit-centres a.tif b.tif c.tif --k 6 --out area_k6.npy   # one clustering of all three
  landseg-segment c.tif c_k6.tif --k 6 --centres area_k6.npy
  python -m runtime info --model model/best                          # what the model is

exit status: 0 on success, 2 on bad input (message on stderr), 130 on Ctrl-C, 143 on SIGTERM.
OUT (and --save-centres) must be new files, or regular files with --overwrite; never the input, a
folder or a device. Both are checked before any work, written under a temporary name and renamed
when complete, so an error or an interruption never leaves a partial file.
"""


def _bands(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected band numbers like 1,2,3, got {text!r}") from None


def _metres(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of metres, got {text!r}")
    return value


def _pixel_size(text: str):
    if text in ("auto", "native"):
        return text
    try:
        return _metres(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, native or a positive number of metres, "
                                         f"got {text!r}") from None


def _rescale(text: str):
    if text in ("auto", "none", "percentile"):
        return text
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 6):
        raise argparse.ArgumentTypeError(f"expected auto, none, percentile, LOW,HIGH or six numbers "
                                         f"(R, G, B low,high pairs), got {text!r}")
    return values  # segment_raster takes a pair or six numbers (`runtime.rescale.check_limits`)


def segment_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="input RGB raster (3 bands, or more with --bands; 8-bit, 16-bit "
                                                 "or float: see --rescale)")
    p.add_argument("output", metavar="OUT", help="output GeoTIFF of cluster ids")
    _add_model_options(p)
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, metavar="PIXELS",
                   help="tile side in pixels, a multiple of 4; memory grows with it, results do not "
                        "change (default: %(default)s)")
    p.add_argument("--centres", default="fit", metavar="fit|artifact|FILE.npy",
                   help="'fit': fit cluster centres on this raster (default); 'artifact': the model's "
                        "precomputed centres for K; or a .npy file written by --save-centres")
    p.add_argument("--save-centres", default=None, metavar="FILE.npy",
                   help="save the centres used, to reuse them on other rasters with --centres (an existing "
                        "file is replaced only with --overwrite)")
    _add_fitting_options(p, PER_IMAGE_BALANCE)
    p.add_argument("--smooth-iters", type=int, default=None, metavar="N",
                   help="3x3 probability smoothing passes; 0 = none (default: the model's)")
    _add_reading_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT (and the --save-centres file) if it exists as a regular file")
    p.add_argument("--overviews", action="store_true", help="build internal overviews (nearest) for fast display")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, required=True, help="number of clusters, 2..max_k of the model (often 8)")
    p.add_argument("--model", default="model/best",
                   help="model directory with model.npz, meta.json, metrics.json (default: %(default)s)")
    p.add_argument("--bands", type=_bands, default=None, metavar="R,G,B",
                   help="1-based band numbers of red, green and blue; required when the input has "
                        "more than 3 bands (e.g. 1,2,3 for NAIP RGBN)")


def _add_fitting_options(p: argparse.ArgumentParser, balance_default: int) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the centre fitting (default: %(default)s)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help="embedding samples used to fit centres (default: %(default)s)")
    p.add_argument("--cluster-iters", type=int, default=None, metavar="N",
                   help="soft k-means iterations when fitting centres (default: the model's)")
    p.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS, metavar="N",
                   help="k-means starts when fitting centres; the best is kept (default: %(default)s)")
    p.add_argument("--balance", type=int, default=balance_default, metavar="N",
                   help="density-balanced centre fitting: the samples are resampled so that each of N "
                        "micro-clusters weighs the same, so rare covers can get a cluster; 0 = plain "
                        "k-means (default: %(default)s)")


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pixel-size", type=_pixel_size, default="auto", metavar="auto|native|METRES",
                   help="ground sample distance the network runs at: auto = the model's training pixel size "
                        "when the raster's differs by more than 1.25x (georeferenced rasters only), native = the "
                        "raster's own, or metres; labels are written on the raster's grid (default: %(default)s)")
    p.add_argument("--raster-pixel-size", type=_metres, default=None, metavar="METRES",
                   help="ground pixel size of an input without a CRS (a scan, a plain PNG), so that --pixel-size "
                        "auto can resample it like a georeferenced raster; an error for an input with a CRS")
    p.add_argument("--rescale", type=_rescale, default="auto", metavar="auto|none|percentile|LOW,HIGH",
                   help="how values become the model's 8-bit input: auto = as the model's training data were "
                        "mapped (meta.json input_rescale); for a model trained on 8-bit data, 8-bit as it is "
                        "and 16-bit or float stretched band by band from its 2nd-98th percentiles (like "
                        "QGIS's default display); "
                        "none = 8-bit only; percentile = stretch even 8-bit; LOW,HIGH (or six numbers, a "
                        "pair per band) = map that range to 0..255 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: all available cores)")


FIT_DESCRIPTION = """\
Fit one set of K cluster centres over several RGB rasters (a mosaic of tiles, several flights) and
save it as a .npy file. Segmenting each raster with --centres FILE then gives every raster the same
cluster ids: one clustering of the whole area instead of one per raster. Each raster is read as
`segment` reads it (--bands, --pixel-size, --raster-pixel-size and --rescale: give segment the same
values) and sampled from the same seeded windows; each contributes cells in proportion to its valid
area. Centres are plain k-means by default (--balance 0), unlike segment's per-raster default.
"""

FIT_EPILOG = """\
examples:
  python -m runtime fit-centres tiles/*.tif --k 6 --out area_k6.npy
  for f in tiles/*.tif; do landseg-segment "$f" "out/$(basename "$f")" --k 6 --centres area_k6.npy; done

exit status: 0 on success, 2 on bad input (message on stderr), 130 on Ctrl-C, 143 on SIGTERM.
The file is written under a temporary name and renamed when complete.
"""


def fit_centres_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime fit-centres", description=FIT_DESCRIPTION,
                                epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", metavar="IN", nargs="+", help="input RGB rasters, as for segment")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="where to write the (K, D) centres")
    _add_model_options(p)
    _add_fitting_options(p, 0)
    _add_reading_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


class _Progress:
    """A tqdm bar when tqdm is importable, else one plain line per tile (display only)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None
        if not quiet:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:
                self._tqdm = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self._tqdm is not None:
            if self.bar is None:
                self.bar = self._tqdm(total=total, unit="tile", desc="segmenting", file=sys.stderr)
            self.bar.update(done - self.bar.n)
        else:
            print(f"segmenting: tile {done}/{total} ({100 * done // total}%)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_segment(args) -> int:
    from .model import load_model
    from .raster import segment_raster

    model = load_model(args.model, threads=args.threads)
    centres = args.centres
    reads = [args.input, *artifact_files(args.model)]
    if centres not in ("fit", "artifact"):
        reads.append(Path(centres))
        centres = load_centres(Path(centres))
    if args.save_centres:  # before the work, so that a bad path never costs a run nor leaves OUT behind
        if Path(args.save_centres).resolve() == Path(args.output).resolve():
            raise OutputError(f"{args.save_centres}: --save-centres names OUT; give the centres their own file")
        check_file(args.save_centres, overwrite=args.overwrite, inputs=reads, what="centres file")
    progress = _Progress(args.quiet)
    try:
        result = segment_raster(args.input, args.output, args.k, model, tile=args.tile, bands=args.bands,
                                centres=centres, seed=args.seed,
                                samples=args.samples, iters=args.cluster_iters, restarts=args.restarts,
                                balance=args.balance,
                                smooth_iters=args.smooth_iters, pixel_size=args.pixel_size,
                                raster_pixel_size_m=args.raster_pixel_size, rescale=args.rescale,
                                overwrite=args.overwrite, overviews=args.overviews, progress=progress)
    finally:
        progress.close()
    if args.save_centres:
        save_centres(Path(args.save_centres), result.centres, overwrite=args.overwrite, inputs=reads)
    if not args.quiet:
        print(f"wrote {result.dst}: {result.k} clusters (ids 0..{result.k - 1}, 255 = nodata), "
              f"{result.tiles} tile(s), {result.seconds:.1f} s; centres {result.centres_source}; "
              f"{result.resolution}; {result.rescale}", file=sys.stderr)
        if not result.georeferenced:
            print(f"note: {args.input} has no CRS and no geotransform, so {result.dst} has none either "
                  "(it is on the input's pixel grid)", file=sys.stderr)
        for line in cluster_share_lines(result.cluster_pixels):
            print(line, file=sys.stderr)
    return 0


def cluster_share_lines(cluster_pixels: np.ndarray) -> list[str]:
    """The share of valid pixels per cluster id, and a note naming the near-empty clusters."""
    total = int(cluster_pixels.sum())
    if total == 0:
        return ["clusters: no valid pixel (every output pixel is nodata)"]
    shares = cluster_pixels / total
    lines = ["clusters (% of valid pixels): "
             + ", ".join(f"{i}: {100 * s:.1f}" for i, s in enumerate(shares))]
    small = [i for i, s in enumerate(shares) if s < NEAR_EMPTY_SHARE]
    if small:
        ids = ", ".join(map(str, small))
        which = f"clusters {ids} cover" if len(small) > 1 else f"cluster {ids} covers"
        lines.append(f"note: {which} less than {100 * NEAR_EMPTY_SHARE:.0f} % of the valid pixels: this "
                     f"raster may hold fewer distinct covers than --k {len(shares)}; a smaller --k may "
                     "give a cleaner map")
    return lines


def load_centres(path: Path) -> np.ndarray:
    """Centres saved by `save_centres` (--save-centres, fit-centres); InputError naming the file
    when it is missing or not a .npy array."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise InputError(f"{path}: not a .npy file (centres are written by --save-centres or fit-centres)")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read centres (.npy from --save-centres or fit-centres): {e}") from None


def save_centres(path: Path, centres: np.ndarray, overwrite: bool, inputs=()) -> None:
    """Write (k, D) centres to `path` exactly (no suffix added) as .npy, under a temporary name first."""
    with atomic_file(path, overwrite=overwrite, inputs=inputs, what="centres file") as tmp:
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(centres, dtype=np.float32), allow_pickle=False)
        except OSError as e:
            raise OutputError(f"{path}: cannot save centres: {e}") from None


def run_fit_centres(args) -> int:
    from .model import load_model
    from .sampling import fit_shared_centres

    out = Path(args.out)
    reads = [*args.inputs, *artifact_files(args.model)]
    check_file(out, overwrite=args.overwrite, inputs=reads, what="centres file")  # before the work
    model = load_model(args.model, threads=args.threads)
    shared = fit_shared_centres(args.inputs, args.k, model, bands=args.bands, seed=args.seed,
                                samples=args.samples, iters=args.cluster_iters, restarts=args.restarts,
                                balance=args.balance,
                                pixel_size=args.pixel_size, raster_pixel_size_m=args.raster_pixel_size,
                                rescale=args.rescale)
    save_centres(out, shared.centres, overwrite=args.overwrite, inputs=reads)
    if not args.quiet:
        k = shared.centres.shape[0]
        print(f"wrote {out}: {k} centres fitted on {sum(shared.cells):,} cells of {len(shared.sources)} "
              f"raster(s)", file=sys.stderr)
        for src, cells, note in zip(shared.sources, shared.cells, shared.notes):
            print(f"  {src}: {cells:,} cells; {note}", file=sys.stderr)
        empty = [src for src, cells in zip(shared.sources, shared.cells) if cells == 0]
        if empty:
            print(f"note: no valid pixels in the sample windows of {', '.join(empty)}: not used for the centres",
                  file=sys.stderr)
        print(f"segment each raster with --k {k} --centres {out}, and the same --bands, --pixel-size, "
              "--raster-pixel-size and --rescale", file=sys.stderr)
    return 0


def run_info(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime info",
                                description="Print what a model artifact is (meta.json and metrics.json).")
    p.add_argument("--model", default="model/best", help="model directory (default: %(default)s)")
    args = p.parse_args(argv)
    from .artifact import load_artifact

    art = load_artifact(args.model)
    meta = {k: v for k, v in art.meta.items() if k != "layers"}
    meta["layers"] = f"{len(art.layers)} top-level layers"
    meta["precomputed_centres_for_k"] = sorted(int(n[9:]) for n in art.arrays if n.startswith("centres_k"))
    print(json.dumps({"meta": meta, "metrics": art.metrics}, indent=2))
    return 0


REGION_DESCRIPTION = """\
Segment many RGB rasters (the tiles of a mosaic, a county of quarter-quads) with one legend, on a
Dask cluster: centres are fitted once from sample windows of every raster (sampled on the
workers), then every raster is a task that writes OUT_DIR/<name>.tif, and OUT_DIR/region.vrt
mosaics them so that QGIS opens the region as one layer. A rerun skips outputs that are complete
for the same rasters, model and options (their landseg_region tag); a raster that fails is named
with its error and the others finish (exit status 2 when any failed). Needs Dask:
pip install 'dask[distributed]'."""

REGION_EPILOG = """\
examples:
  python -m runtime segment-region tiles/*.tif --out-dir region --k 6
  python -m runtime segment-region tiles/*.tif --out-dir region --k 6 --scheduler tcp://10.0.0.5:8786
"""


def region_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime segment-region", description=REGION_DESCRIPTION,
                                epilog=REGION_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", metavar="IN", nargs="+", help="input RGB rasters, as for segment")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="folder of the outputs (created if missing)")
    _add_model_options(p)
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="Dask scheduler address (tcp://host:8786); default: a local cluster on this machine")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes of the local cluster (default: one per core)")
    _add_fitting_options(p, 0)
    p.add_argument("--pixel-size", type=_pixel_size, default="auto", metavar="auto|native|METRES",
                   help="as for segment (default: %(default)s)")
    p.add_argument("--rescale", type=_rescale, default="auto", metavar="auto|none|percentile|LOW,HIGH",
                   help="as for segment (default: %(default)s)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, metavar="PIXELS",
                   help="tile side of each raster's segmentation (default: %(default)s)")
    p.add_argument("--block", type=int, default=8192, metavar="PIXELS",
                   help="a raster larger than this on a side is segmented as one task per block of this side, "
                        "written as <name>_r<row>_c<col>.tif (a multiple of 4; default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def run_segment_region(args) -> int:
    from .region import segment_region

    say = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    result = segment_region(args.inputs, args.out_dir, args.k, args.model, scheduler=args.scheduler,
                            workers=args.workers, bands=args.bands, seed=args.seed, samples=args.samples,
                            iters=args.cluster_iters, restarts=args.restarts, balance=args.balance,
                            pixel_size=args.pixel_size, rescale=args.rescale, tile=args.tile, block=args.block,
                            progress=say)
    if not args.quiet:
        where = result.vrt if result.vrt is not None else f"no mosaic ({result.vrt_note})"
        print(f"{len(result.written)} written, {len(result.skipped)} already complete, {len(result.failed)} "
              f"failed, in {result.seconds:.1f} s; {where}", flush=True)
    for src, message in result.failed.items():
        print(f"error: {src}: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT if result.failed else 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of `landseg-segment IN OUT --k K ...` and `python -m runtime segment|fit-centres|info ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "info":
        return run_command("info", lambda: run_info(argv[1:]), interrupted="nothing written")
    if argv and argv[0] == "fit-centres":
        args = fit_centres_parser().parse_args(argv[1:])
        return run_command("fit-centres", lambda: run_fit_centres(args), interrupted=f"{args.out} not written")
    if argv and argv[0] == "segment-region":
        args = region_parser().parse_args(argv[1:])
        return run_command("segment-region", lambda: run_segment_region(args),
                           interrupted=f"complete outputs in {args.out_dir} are kept")
    if argv and argv[0] == "segment":
        argv = argv[1:]
    args = segment_parser(prog).parse_args(argv)
    return run_command("segment", lambda: run_segment(args), interrupted=f"nothing written to {args.output}")
