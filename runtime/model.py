"""`Model`: the exported encoder plus clustering, on numpy arrays.

Units and conventions: images are uint8 RGB arrays (H, W, 3) in pixels; the network works on a
stride-4 grid of cells (cell (i, j) covers pixels 4i..4i+3, 4j..4j+3; ceil(H/4) x ceil(W/4) cells).
Probabilities are softmax(cos(embedding, centre) / temperature) on cells, optionally smoothed by
`smooth_probs` (3x3 mean over valid neighbours, renormalised), then upsampled to pixels by
`upsample4` (bilinear, fixed scale 4, half-pixel centres, cropped): the same maths as
`stages.model.smooth_probs` / `upsample_to`, which the tests check numerically. An artifact may
guide both by the image's colours (`smooth_probs_guided`, `upsample4_guided`).

Centres: `fit_centres(images, k)` fits one set of k centres for many images (the "global"
protocol: the same id means the same cluster everywhere); `predict_*(rgb, k)` with centres=None
fits them on that image alone, density-balanced (`PER_IMAGE_BALANCE` micro-clusters, as
`segment_raster` fits them per raster); `artifact_centres(k)` returns precomputed ones when the artifact
carries `centres_k<K>`.

Resolution: `predict_*(rgb, k, pixel_size_m=...)` with the array's ground pixel size runs the
network at the model's training pixel size (`runtime.resolution`) and returns results on the
array's own grid; without it the array is used as it is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from . import cluster
from .artifact import FORMAT_NAME, FORMAT_VERSION, cluster_dim, load_artifact, validate
from .cue import append_cue, dark_tophat_cells
from .errors import InputError
from .network import DEFAULT_BAND_BYTES, Network, output_size
from .resolution import plan_resolution, positive_metres, resample_image, to_source_grid

DEFAULT_SAMPLES = 50_000  # embeddings (cells) drawn to fit centres
# Micro-clusters of the density-balanced fitting used when centres are fitted on one image or raster
# (`predict_*` with centres=None, `segment_raster`): on Dubai it lifted the per-tile mIoU of every
# model tried by 0.06-0.09 (docs/experiments.md, "Balanced centres"); centres for many images at
# once (`fit_centres`) stay plain by default, since one clustering over a region did not gain.
PER_IMAGE_BALANCE = 64
_LABEL_BAND_CELLS = 64  # block rows (cell rows) labelled at a time, one band per task on the band threads


class Model:
    """An exported encoder ready to embed, cluster and segment RGB arrays (numpy only)."""

    def __init__(self, layers: list, arrays: dict, meta: dict, *, threads: int | None = None,
                 band_bytes: int = DEFAULT_BAND_BYTES):
        meta = dict(meta)
        meta.setdefault("format", FORMAT_NAME)
        meta.setdefault("format_version", FORMAT_VERSION)
        meta["layers"] = layers
        arrays = {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype == np.float64 else v
                  for k, v in arrays.items()}
        validate(layers, arrays, meta, where="in-memory model")
        self.meta = meta
        self.arrays = arrays
        self.network = Network(layers, arrays, band_bytes=band_bytes, threads=threads)
        self._mean = np.asarray(meta["input_mean"], dtype=np.float32)
        self._std = np.asarray(meta["input_std"], dtype=np.float32)
        self._scale = np.float32(meta["input_scale"])

    # -- properties ---------------------------------------------------------------------------
    embed_dim = property(lambda self: self.meta["embed_dim"])
    # the optional texture cue appended before clustering ({"kind": "dark_tophat", "size", "scale"})
    cue = property(lambda self: self.meta.get("cue"))
    # width of what is clustered: the embedding, plus one channel when the artifact has a cue
    cluster_dim = property(lambda self: cluster_dim(self.meta))
    max_k = property(lambda self: self.meta["max_k"])
    stride = property(lambda self: self.meta["stride"])
    temperature = property(lambda self: self.meta["temperature"])
    # temperature of the soft k-means updates when centres are fitted (default: `temperature`)
    fit_temperature = property(lambda self: self.meta.get("fit_temperature") or self.meta["temperature"])
    receptive_field = property(lambda self: self.meta["receptive_field"])
    smooth_iters_default = property(lambda self: self.meta["smooth_iters_default"])
    # colour distance (RGB in 0..1) at which smoothing between two neighbour cells falls to
    # exp(-1/2) of its weight; 0 (or absent) = plain smoothing, blind to the image
    smooth_colour_sigma = property(lambda self: self.meta.get("smooth_colour_sigma") or 0.0)
    # the least weight a neighbour cell keeps however far its colour (0..1): texture inside one
    # cover still gets smoothed
    smooth_colour_floor = property(lambda self: self.meta.get("smooth_colour_floor") or 0.0)
    # colour distance (RGB in 0..1) at which a cell's weight in a pixel's label falls to exp(-1/2):
    # label edges follow the image's inside the 4 px cells; 0 (or absent) = plain bilinear labels
    label_colour_sigma = property(lambda self: self.meta.get("label_colour_sigma") or 0.0)
    cluster_iters_default = property(lambda self: self.meta["cluster_iters_default"])
    # ground sample distance (metres) of the training imagery; None when unknown
    training_pixel_size_m = property(lambda self: self.meta.get("training_pixel_size_m"))
    # how the training data became 8-bit ({"mode", "limits"}; None for artifacts that predate it)
    input_rescale = property(lambda self: self.meta.get("input_rescale"))
    # uint8 (3,) colour fed to the network where the input is nodata: the input mean, which the
    # normalisation maps to zero
    nodata_fill = property(lambda self: np.clip(np.round(self._mean * self._scale), 0, 255).astype(np.uint8))

    def halo(self, smooth_iters: int | None = None) -> int:
        """Pixels of context a tile needs on each side so that its core equals the untiled result:
        the receptive field, plus one cell per smoothing iteration and one for bilinear upsampling,
        rounded up to a multiple of the stride (tile origins stay on the cell grid)."""
        smooth = self.smooth_iters_default if smooth_iters is None else smooth_iters
        reach = self.receptive_field
        if self.cue:  # a cell's cue reads size - 1 pixels on either side of the cell
            reach = max(reach, 2 * (self.cue["size"] - 1) + self.stride)
        px = reach + self.stride * (smooth + 1)
        return -(-px // self.stride) * self.stride

    def check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= self.max_k:
            raise InputError(f"k must be an integer in 2..{self.max_k} (this model's max_k), got {k!r}")
        return int(k)

    def artifact_centres(self, k: int) -> np.ndarray:
        """The artifact's precomputed centres for k (InputError if it carries none)."""
        k = self.check_k(k)
        c = self.arrays.get(f"centres_k{k}")
        if c is None:
            have = sorted(int(n[len("centres_k"):]) for n in self.arrays if n.startswith("centres_k"))
            has = f"it has them for k = {', '.join(map(str, have))}" if have else "it has none"
            raise InputError(f"the model carries no precomputed centres for k={k} ({has}); fit them "
                             "instead (centres=None, CLI --centres fit, the default)")
        return c

    # -- embeddings ---------------------------------------------------------------------------
    def _check_rgb(self, rgb) -> np.ndarray:
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise InputError("expected an RGB image as a uint8 array (H, W, 3), got "
                             f"{getattr(rgb, 'dtype', type(rgb).__name__)} {getattr(rgb, 'shape', '')} "
                             "(16-bit or float data: runtime.to_uint8(values, runtime.percentile_limits(values)))")
        if rgb.shape[0] < 1 or rgb.shape[1] < 1:
            raise InputError(f"empty image {rgb.shape}")
        return rgb

    def embed_cells(self, rgb: np.ndarray) -> np.ndarray:
        """What is clustered: channels-last unit rows (ceil(H/4), ceil(W/4), cluster_dim) float32.

        The network's unit embeddings (the input normalised as (rgb / input_scale - input_mean) /
        input_std inside the forward pass), with the artifact's texture cue appended and each row
        renormalised when it has one (`runtime.cue`); `embed` is the network's output alone."""
        rgb = self._check_rgb(rgb)
        cells = self.network.forward_rgb(rgb, self._scale, self._mean, self._std)
        cue = self.cue
        if cue:
            cells = append_cue(cells, dark_tophat_cells(rgb, cue["size"]), cue["scale"])
        return cells

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        """Unit embeddings (D, ceil(H/4), ceil(W/4)) float32, as the torch encoder's output."""
        return self.network.forward_rgb(self._check_rgb(rgb), self._scale, self._mean, self._std,
                                        channels_first=True)

    # -- centres --------------------------------------------------------------------------------
    def fit_centres(self, images, k: int, seed: int = 0, samples: int = DEFAULT_SAMPLES,
                    iters: int | None = None, restarts: int = cluster.DEFAULT_RESTARTS,
                    balance: int = 0) -> np.ndarray:
        """One set of (k, D) centres for a list of uint8 RGB images (the global protocol)."""
        if isinstance(images, np.ndarray):
            images = [images]
        return self.fit_centres_from_cells([self.embed_cells(im) for im in images], k, seed, samples, iters,
                                           restarts, balance)

    def fit_centres_from_cells(self, cells, k: int, seed: int = 0, samples: int = DEFAULT_SAMPLES,
                               iters: int | None = None, restarts: int = cluster.DEFAULT_RESTARTS,
                               balance: int = 0) -> np.ndarray:
        """Centres from channels-last embeddings (h, w, D) or flat (N, D) arrays, e.g. from
        `embed_cells` (lets a caller embed once and reuse the embeddings to predict).

        Draws at most `samples` cells uniformly (seeded) across all inputs; with `balance` = m > 0
        resamples them so that each of m micro-clusters weighs the same
        (`runtime.cluster.balanced_rows`); then runs spherical k-means from `restarts` seeded
        starts and soft k-means (`iters` updates, default the artifact's cluster_iters_default, at
        its `fit_temperature`);
        see `runtime.cluster.fit_centres`."""
        k = self.check_k(k)
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < k:
            raise InputError(f"samples must be an integer >= k={k}, got {samples!r}")
        if isinstance(balance, bool) or not isinstance(balance, (int, np.integer)) or balance < 0:
            raise InputError(f"balance must be an integer >= 0 (micro-clusters; 0 = off), got {balance!r}")
        flat = [np.asarray(c, dtype=np.float32).reshape(-1, self.cluster_dim) for c in cells]
        x = sample_rows(flat, samples, seed)
        if balance:
            x = cluster.balanced_rows(x, int(balance), seed)
        it = self.cluster_iters_default if iters is None else iters
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 0:
            raise InputError(f"iters must be an integer >= 0, got {it!r}")
        # the seeded starts run on the band threads, each with single-threaded BLAS
        with self.network.single_threaded_blas():
            return cluster.fit_centres(x, k, self.fit_temperature, int(it), seed, restarts=restarts,
                                       map_starts=self.network.map)

    def check_centres(self, k: int, centres) -> np.ndarray:
        """`centres` as a float32 (k, cluster_dim) array; InputError if the shape or values are wrong."""
        c = np.asarray(centres, dtype=np.float32)
        if c.shape != (k, self.cluster_dim):
            what = "embed_dim + 1 (the embedding and the artifact's cue)" if self.cue else "embed_dim"
            raise InputError(f"centres must have shape (k, {what}) = ({k}, {self.cluster_dim}), got {c.shape}")
        if not np.all(np.isfinite(c)) or np.any(np.linalg.norm(c, axis=1) == 0):
            raise InputError("centres must be finite non-zero vectors")
        return c

    # -- probabilities and labels ------------------------------------------------------------------
    def cell_proba(self, cells: np.ndarray, centres: np.ndarray, smooth_iters: int | None = None,
                   image: np.ndarray | None = None, colours: np.ndarray | None = None) -> np.ndarray:
        """(h, w, D) embeddings -> (k, h, w) cell probabilities (smoothed `smooth_iters` times).

        `image`: the uint8 (H, W, 3) image the cells were embedded from. A model with a
        `smooth_colour_sigma` needs it: its smoothing weighs each neighbour cell by how close the
        two cells' mean colours are (`smooth_probs_guided`). `colours`: `cell_colours(image)`,
        when the caller has them (`image_colours`)."""
        h, w, d = cells.shape
        p = cluster.soft_assign_columns(cells.reshape(-1, d), centres, self.temperature,
                                        self.network.map).reshape(-1, h, w)
        smooth = self.smooth_iters_default if smooth_iters is None else smooth_iters
        if isinstance(smooth, bool) or not isinstance(smooth, (int, np.integer)) or smooth < 0:
            raise InputError(f"smooth_iters must be an integer >= 0, got {smooth!r}")
        if not self.smooth_colour_sigma or not smooth:
            return smooth_probs(p, int(smooth), self.network.map)
        if image is None:
            raise InputError("this model smooths its cluster map along the image's colour edges "
                             "(meta.json smooth_colour_sigma): cell_proba needs image=, the RGB array "
                             "the cells were embedded from")
        if output_size(image.shape[0]) != h or output_size(image.shape[1]) != w:
            raise InputError(f"image {image.shape[:2]} does not give the {h} x {w} cells it was passed with "
                             f"(expected ceil(H / {self.stride}) x ceil(W / {self.stride}))")
        if colours is None:
            colours = cell_colours(image, self.stride)
        return smooth_probs_guided(p, int(smooth), colours, self.smooth_colour_sigma, self.network.map,
                                   floor=self.smooth_colour_floor)

    def labels_from_cells(self, cells: np.ndarray, centres, height: int, width: int,
                          smooth_iters: int | None = None, image: np.ndarray | None = None) -> np.ndarray:
        """uint8 (height, width) labels from `embed_cells` output and (k, D) centres: lets a caller
        embed each image once, fit global centres on all of them, then label each (`image` as in
        `cell_proba`)."""
        c = self.check_centres(self.check_k(len(centres)), centres)
        colours = self.image_colours(image)
        return self.labels_from_proba(self.cell_proba(cells, c, smooth_iters, image, colours), height, width,
                                      image, colours)

    def image_colours(self, image: np.ndarray | None) -> np.ndarray | None:
        """`cell_colours(image)` when this model's smoothing or labels are guided by colour (else
        None): computed once, for `cell_proba` and `labels_from_proba` both."""
        if image is None or not (self.smooth_colour_sigma or self.label_colour_sigma):
            return None
        return cell_colours(image, self.stride)

    def labels_from_proba(self, probs: np.ndarray, height: int, width: int,
                          image: np.ndarray | None = None, colours: np.ndarray | None = None) -> np.ndarray:
        """uint8 (height, width) labels from (k, h, w) cell probabilities (`cell_proba`); `image`,
        the uint8 (height, width, 3) pixels the cells cover, is needed by a model with a
        `label_colour_sigma` (its labels follow the image's edges, `upsample4_guided`); `colours`
        as in `cell_proba`."""
        sigma = self.label_colour_sigma
        if sigma and image is None:
            raise InputError("this model draws its label edges along the image's colour edges "
                             "(meta.json label_colour_sigma): labelling needs image=, the RGB array "
                             "the cells were embedded from")
        return labels_from_cell_proba(probs, height, width, map_bands=self.network.map,
                                      image=image, colour_sigma=sigma, colours=colours)

    def _prepare(self, rgb, k, centres, seed, samples, iters, balance=PER_IMAGE_BALANCE):
        k = self.check_k(k)
        cells = self.embed_cells(rgb)
        if centres is None:
            centres = self.fit_centres_from_cells([cells], k, seed, samples, iters, balance=balance)
        return cells, self.check_centres(k, centres)

    def working_image(self, rgb: np.ndarray, pixel_size_m=None) -> tuple[np.ndarray, float]:
        """(the image on the grid the network runs at, its scale) for an image whose pixels are
        `pixel_size_m` metres on the ground: resampled to the training pixel size when both are
        known and differ by more than RESAMPLE_TOLERANCE (area average when coarsening, bilinear
        when refining; `runtime.resolution`), else the image itself and scale 1. None = unknown
        size: the image as it is."""
        self._check_rgb(rgb)
        if pixel_size_m is None:
            return rgb, 1.0
        if positive_metres(pixel_size_m) is None:
            raise InputError(f"pixel_size_m must be a positive number of metres, got {pixel_size_m!r}")
        if self.training_pixel_size_m is None:
            warnings.warn(f"pixel_size_m={pixel_size_m:g} ignored: the model does not record its training "
                          "pixel size, so the image is segmented as it is", stacklevel=3)
            return rgb, 1.0
        plan = plan_resolution(float(pixel_size_m), self, "auto", "array")
        return (rgb, 1.0) if plan.scale == 1.0 else (resample_image(rgb, plan.scale), plan.scale)

    def predict_proba(self, rgb: np.ndarray, k: int, centres=None, smooth_iters: int | None = None,
                      seed: int = 0, samples: int = DEFAULT_SAMPLES, iters: int | None = None,
                      pixel_size_m=None, balance: int = PER_IMAGE_BALANCE) -> np.ndarray:
        """float32 (k, H, W) cluster probabilities; centres=None fits them on this image alone
        (`balance`: micro-clusters of density-balanced fitting, as in `fit_centres_from_cells`;
        0 = plain k-means).

        pixel_size_m: the ground size of the image's pixels in metres, if known; an image far from
        the training pixel size is then segmented at it and the result put back on the image's
        grid (nearest), as `segment_raster` does for rasters (`working_image`)."""
        work, scale = self.working_image(rgb, pixel_size_m)
        cells, c = self._prepare(work, k, centres, seed, samples, iters, balance)
        probs = self.cell_proba(cells, c, smooth_iters, work)
        proba = (upsample4_guided(probs, work, self.label_colour_sigma) if self.label_colour_sigma
                 else upsample4(probs, work.shape[0], work.shape[1]))
        return proba if scale == 1.0 else to_source_grid(proba, scale, rgb.shape[0], rgb.shape[1])

    def predict_labels(self, rgb: np.ndarray, k: int, centres=None, smooth_iters: int | None = None,
                       seed: int = 0, samples: int = DEFAULT_SAMPLES, iters: int | None = None,
                       pixel_size_m=None, balance: int = PER_IMAGE_BALANCE) -> np.ndarray:
        """uint8 (H, W) cluster ids 0..k-1 (argmax of predict_proba, computed in row bands);
        pixel_size_m and balance as in `predict_proba`."""
        work, scale = self.working_image(rgb, pixel_size_m)
        cells, c = self._prepare(work, k, centres, seed, samples, iters, balance)
        labels = self.labels_from_cells(cells, c, work.shape[0], work.shape[1], smooth_iters, work)
        return labels if scale == 1.0 else to_source_grid(labels, scale, rgb.shape[0], rgb.shape[1])


def load_model(path, *, threads: int | None = None) -> Model:
    """Load and validate an artifact directory (e.g. model/best) as a `Model`."""
    art = load_artifact(Path(path))
    return Model(art.layers, art.arrays, art.meta, threads=threads)


def sample_rows(arrays: list, samples: int, seed: int | np.random.Generator) -> np.ndarray:
    """At most `samples` rows drawn uniformly without replacement from the concatenation of the
    (N_i, D) arrays, in index order; all rows when there are fewer. `seed` is a seed or a generator
    whose stream the draw continues (one generator over many images draws each its own rows)."""
    sizes = np.asarray([a.shape[0] for a in arrays], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        raise InputError("no embeddings to fit centres on (empty images or all nodata)")
    if total <= samples:
        return np.concatenate(arrays, axis=0)
    idx = np.sort(np.random.default_rng(seed).choice(total, size=samples, replace=False))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for i, a in enumerate(arrays):
        lo, hi = np.searchsorted(idx, bounds[i]), np.searchsorted(idx, bounds[i + 1])
        parts.append(a[idx[lo:hi] - bounds[i]])
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------------------------
# Post-processing on the stride-4 grid (numerically as stages.model.smooth_probs / upsample_to)
# --------------------------------------------------------------------------------------------


def _box3(x: np.ndarray, axis: int, out: np.ndarray | None = None) -> np.ndarray:
    """Sum of each element and its in-bounds neighbours along `axis` (zero outside), as
    (x[i] + x[i - 1]) + x[i + 1], into `out` (a new array when None)."""
    out = np.empty_like(x) if out is None else out
    n = x.shape[axis]
    if n == 1:
        out[...] = x
        return out

    def at(a, i):
        idx = [slice(None)] * x.ndim
        idx[axis] = i
        return a[tuple(idx)]

    np.add(at(x, slice(1, None)), at(x, slice(None, n - 1)), out=at(out, slice(1, None)))
    at(out, 0)[...] = at(x, 0)
    at(out, slice(None, n - 1))[...] += at(x, slice(1, None))
    return out


def _valid_counts(n: int) -> np.ndarray:
    c = np.full(n, 3.0 if n > 2 else float(min(n, 2)), dtype=np.float32)
    if n > 1:
        c[0] = c[-1] = 2.0
    else:
        c[0] = 1.0
    return c


_SMOOTH_BAND_BYTES = 512 << 10  # rows (then columns) smoothed at a time: a band and its buffers stay in cache


def smooth_probs(probs: np.ndarray, iters: int, map_bands=cluster.serial_map) -> np.ndarray:
    """(k, h, w): `iters` times a 3x3 mean over valid neighbours (renormalised over k).

    The 3x3 mean is a 1-D mean along the width then the height, and its count of valid neighbours
    is the product of the two axes' counts, so `iters` passes equal `iters` 1-D passes along the
    width (each row on its own) then `iters` along the height (each column on its own). Each pass
    keeps the k probabilities of a cell summing to 1 (the mean of distributions is one), so the
    renormalisation is made once at the end. Bands of rows, then each cluster's plane, run through
    `map_bands(fn, starts)` (a thread pool's map: numpy releases the GIL); the result is the same
    for any banding. Returns a new array; `probs` is left as it is."""
    if iters <= 0:
        return probs
    k, h, w = probs.shape
    out = np.empty_like(probs)

    def passes(src: np.ndarray, axis: int, count: np.ndarray, dst: np.ndarray) -> None:
        bufs = (np.empty_like(src), np.empty_like(src))
        for i in range(iters):
            nxt = _box3(src, axis, bufs[i % 2])
            nxt /= count
            src = nxt
        dst[...] = src

    rows = max(1, _SMOOTH_BAND_BYTES // (k * w * 4))
    count_w = _valid_counts(w)
    map_bands(lambda r0: passes(probs[:, r0:r0 + rows], 2, count_w, out[:, r0:r0 + rows]), range(0, h, rows))
    count_h = _valid_counts(h)[:, None]
    # along the height, cluster by cluster: (h, w) planes whose rows stay long inner loops
    map_bands(lambda c: passes(out[c].copy(), 0, count_h, out[c]), range(k))

    def normalise(r0: int) -> None:
        band = out[:, r0:r0 + rows]
        band /= np.maximum(band.sum(axis=0), 1e-12)

    map_bands(normalise, range(0, h, rows))
    return out


def cell_colours(rgb: np.ndarray, stride: int = 4) -> np.ndarray:
    """float32 (ceil(H / stride), ceil(W / stride), 3): the mean colour (RGB, 0..1) of each cell's
    stride x stride pixels (a last row or column of cells over the pixels it has)."""
    h_px, w_px = rgb.shape[:2]
    h, w = -(-h_px // stride), -(-w_px // stride)
    fh, fw = h_px // stride, w_px // stride  # whole cells
    sums = np.empty((h, w, 3), np.float32)
    # integer block sums (exact in uint16: at most stride^2 x 255), strided row then column slices
    # added in place: no float copy of the image and no slow strided reduction
    block = rgb[:fh * stride].reshape(fh, stride, w_px, 3)
    rows = block[:, 0].astype(np.uint16)
    for i in range(1, stride):
        rows += block[:, i]
    cols = rows[:, :fw * stride].reshape(fh, fw, stride, 3)
    whole = cols[:, :, 0].copy()
    for j in range(1, stride):
        whole += cols[:, :, j]
    sums[:fh, :fw] = whole
    if fw < w:  # the last, partial column of cells
        sums[:, fw] = np.add.reduceat(rgb[:, fw * stride:].sum(axis=1, dtype=np.uint32),
                                      np.arange(0, h_px, stride), axis=0)
    if fh < h:  # the last, partial row of cells (its whole cells; the corner is done above)
        sums[fh, :fw] = rgb[fh * stride:, :fw * stride].reshape(h_px - fh * stride, fw, stride, 3).sum(
            axis=(0, 2), dtype=np.uint32)
    count_h = np.minimum(stride, h_px - stride * np.arange(h)).astype(np.float32)
    count_w = np.minimum(stride, w_px - stride * np.arange(w)).astype(np.float32)
    return sums / (255.0 * count_h[:, None, None] * count_w[None, :, None])


def smooth_probs_guided(probs: np.ndarray, iters: int, colours: np.ndarray, sigma: float,
                        map_bands=cluster.serial_map, floor: float = 0.0) -> np.ndarray:
    """(k, h, w): `iters` passes of colour-guided smoothing, each a 3-tap weighted mean along the
    width then one along the height. A neighbour cell weighs
    floor + (1 - floor) exp(-|c_i - c_j|^2 / (2 sigma^2)) against the cell's own 1, with c the
    cells' mean colours (`cell_colours`): cells of one colour are smoothed as by `smooth_probs`,
    while a house or a road of its own colour keeps its cluster instead of melting into its
    surroundings; `floor` keeps some smoothing across texture within one cover (floor 1 is
    plain smoothing). Every cluster's plane is smoothed with
    the same weights, so each cell's probabilities keep summing to 1 (renormalised once at the
    end for rounding). Planes run through `map_bands` (a thread pool's map). Returns a new array."""
    if iters <= 0:
        return probs
    k, h, w = probs.shape
    scale = np.float32(-0.5 / (sigma * sigma))
    # weight between each cell and its right neighbour (h, w - 1), and its lower one (h - 1, w)
    right = np.exp(((colours[:, 1:] - colours[:, :-1]) ** 2).sum(axis=2) * scale).astype(np.float32)
    down = np.exp(((colours[1:] - colours[:-1]) ** 2).sum(axis=2) * scale).astype(np.float32)
    if floor:
        right, down = (np.float32(floor) + np.float32(1 - floor) * a for a in (right, down))
    inv_w = np.ones((h, w), np.float32)
    inv_w[:, 1:] += right
    inv_w[:, :-1] += right
    inv_h = np.ones((h, w), np.float32)
    inv_h[1:] += down
    inv_h[:-1] += down
    inv_w, inv_h = 1.0 / inv_w, 1.0 / inv_h
    out = np.empty_like(probs)

    def plane(c: int) -> None:
        p = probs[c].copy()
        acc = np.empty_like(p)
        tmp = np.empty_like(p)  # products, preallocated: no fresh pages per pass
        for _ in range(iters):
            if w > 1:
                acc[...] = p
                t = tmp[:, :w - 1]
                np.multiply(right, p[:, :-1], out=t)
                acc[:, 1:] += t
                np.multiply(right, p[:, 1:], out=t)
                acc[:, :-1] += t
                np.multiply(acc, inv_w, out=p)
            if h > 1:
                acc[...] = p
                t = tmp[:h - 1]
                np.multiply(down, p[:-1], out=t)
                acc[1:] += t
                np.multiply(down, p[1:], out=t)
                acc[:-1] += t
                np.multiply(acc, inv_h, out=p)
        out[c] = p

    map_bands(plane, range(k))
    out /= np.maximum(out.sum(axis=0), 1e-12)
    return out


# Bilinear weights (fixed scale 4, half-pixel centres) of output phase 0..3 of cell i:
# (weight of the previous cell, of cell i, of the next cell)
_PHASES = ((0.375, 0.625, 0.0), (0.125, 0.875, 0.0), (0.0, 0.875, 0.125), (0.0, 0.625, 0.375))


def _up4_axis(x: np.ndarray, axis: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Upsample cells lo..hi-1 of `axis` by 4 (4 * (hi - lo) outputs); neighbours beyond the array
    are clamped to its edge, as torch's bilinear interpolation does."""
    n = x.shape[axis]
    hi = n if hi is None else hi

    def cells(a: int, b: int) -> np.ndarray:  # cells a..b-1 with indices clamped to 0..n-1
        idx = [slice(None)] * x.ndim
        if 0 <= a and b <= n:
            idx[axis] = slice(a, b)
            return x[tuple(idx)]
        idx[axis] = np.clip(np.arange(a, b), 0, n - 1)
        return x[tuple(idx)]

    cur, prv, nxt = cells(lo, hi), cells(lo - 1, hi - 1), cells(lo + 1, hi + 1)
    shape = list(cur.shape)
    out = np.empty(shape[:axis + 1] + [4] + shape[axis + 1:], dtype=np.float32)
    for phase, (wp, wc, wn) in enumerate(_PHASES):
        o = out[(slice(None),) * (axis + 1) + (phase,)]
        np.multiply(cur, np.float32(wc), out=o)
        o += np.float32(wp) * prv if wp else np.float32(wn) * nxt
    shape[axis] *= 4
    return out.reshape(shape)


def upsample4(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) cells -> (C, height, width) pixels: bilinear, fixed scale 4, cropped."""
    return np.ascontiguousarray(_up4_axis(_up4_axis(x, 2)[:, :, :width], 1)[:, :height])


# A 2 x 2 block of cells whose four cells have the same most probable cluster, each ahead of the
# runner-up by more than this, gives that cluster to every pixel it interpolates (see
# labels_from_cell_proba). float32 rounding of the interpolation is below 1e-6 on probabilities.
_SURE_MARGIN = np.float32(1e-5)


def labels_from_cell_proba(probs: np.ndarray, height: int, width: int,
                           band_cells: int = _LABEL_BAND_CELLS, map_bands=cluster.serial_map,
                           image: np.ndarray | None = None, colour_sigma: float = 0.0,
                           colours: np.ndarray | None = None) -> np.ndarray:
    """argmax over k of upsample4(probs) as uint8 (height, width), the same values as the full
    upsample, in a fraction of its time and memory. With `colour_sigma` > 0 and `image`, the uint8
    (height, width, 3) pixels the cells cover: argmax of `upsample4_guided(probs, image,
    colour_sigma)` instead, so that a label edge follows the image's own edge inside its 4 px cell
    (`colours`: `cell_colours(image)`, when the caller has them).

    A pixel's bilinear value mixes the 2 x 2 cells around it (pixels 4i+2 .. 4i+5 mix cell rows i
    and i+1). Where those four cells agree on the most probable cluster, each by more than
    `_SURE_MARGIN` over the runner-up, every convex mix of them has that argmax too, so the pixels
    of such a block take it directly; only the blocks where clusters meet are interpolated, with
    the same float32 operations as `upsample4`. Bands of `band_cells` block rows run through
    `map_bands(fn, starts)` (a thread pool's map), each writing its own pixel rows."""
    k, h, w = probs.shape
    guide = None
    if colour_sigma:
        if image is None or image.shape != (height, width, 3):
            raise InputError(f"colour-guided labels need the ({height}, {width}, 3) image the cells cover, "
                             f"got {None if image is None else image.shape}")
        if colours is None:
            colours = cell_colours(image)
        elif colours.shape != (h, w, 3):
            raise InputError(f"colours {colours.shape} are not the ({h}, {w}, 3) cell colours of the image")
        guide = (image, _planes(colours), _colour_scale(colour_sigma))
    out = np.empty((height, width), dtype=np.uint8)
    cols = np.clip(np.arange(-1, w + 1), 0, w - 1)
    bx = (np.arange(width) + 2) // 4  # pixel x lies in block column (x + 2) // 4

    def band(b0: int) -> None:
        # blocks b0..b1-1 (block b covers cell rows clamp(b - 1), clamp(b)) and their pixel rows
        b1 = min(h + 1, b0 + band_cells)
        y0, y1 = max(0, 4 * b0 - 2), min(height, 4 * b1 - 2)
        if y0 >= y1:
            return
        rows = np.clip(np.arange(b0 - 1, b1), 0, h - 1)
        p = probs[:, rows]
        top = np.argmax(p, axis=0)
        # a cell is sure when only its top cluster comes within the margin of its top probability
        sure = (p >= p.max(axis=0) - _SURE_MARGIN).sum(axis=0, dtype=np.int32) == 1
        t, su = top[:, cols], sure[:, cols]
        agree = ((t[:-1, :-1] == t[1:, :-1]) & (t[:-1, :-1] == t[:-1, 1:]) & (t[:-1, :-1] == t[1:, 1:])
                 & su[:-1, :-1] & su[1:, :-1] & su[:-1, 1:] & su[1:, 1:])
        out[y0:y1] = t[:-1, :-1].astype(np.uint8)[(np.arange(y0, y1) + 2) // 4 - b0][:, bx]
        bi, bj = np.nonzero(~agree)
        if len(bi):
            if guide is None:
                _interpolate_blocks(probs, bi + b0 - 1, bj - 1, out, height, width)
            else:
                _interpolate_blocks_guided(probs, bi + b0 - 1, bj - 1, out, *guide)

    map_bands(band, range(0, h + 1, band_cells))
    return out


# Bilinear weights of the 4 pixels of a block along one axis, block offset u = 0..3 (pixels
# 4b + 2 + u): (which cell is the pixel's own: 0 = cell b, 1 = cell b + 1), its weight, the other's
_BLOCK_TAPS = tuple((0, _PHASES[2 + u][1], _PHASES[2 + u][2]) if u < 2 else (1, _PHASES[u - 2][1], _PHASES[u - 2][0])
                    for u in range(4))


def _interpolate_blocks(probs: np.ndarray, bi: np.ndarray, bj: np.ndarray, out: np.ndarray,
                        height: int, width: int) -> None:
    """Labels of the 4 x 4 pixels of blocks (bi, bj) (cells bi, bi + 1 x bj, bj + 1, clamped),
    computed as `upsample4` computes them (along the width first, then the height), into out."""
    k, h, w = probs.shape
    r = (np.clip(bi, 0, h - 1), np.clip(bi + 1, 0, h - 1))
    c = (np.clip(bj, 0, w - 1), np.clip(bj + 1, 0, w - 1))
    wide = [[None] * 4 for _ in range(2)]  # wide[row a][column offset v]: (k, n) values
    for a in range(2):
        for v, (own, wc, wo) in enumerate(_BLOCK_TAPS):
            o = np.multiply(probs[:, r[a], c[own]], np.float32(wc))
            o += np.float32(wo) * probs[:, r[a], c[1 - own]]
            wide[a][v] = o
    for u, (own, wc, wo) in enumerate(_BLOCK_TAPS):
        y = 4 * bi + 2 + u
        for v in range(4):
            vals = np.multiply(wide[own][v], np.float32(wc))
            vals += np.float32(wo) * wide[1 - own][v]
            x = 4 * bj + 2 + v
            ok = (y >= 0) & (y < height) & (x >= 0) & (x < width)
            out[y[ok], x[ok]] = np.argmax(vals[:, ok], axis=0)


def _colour_scale(sigma: float) -> np.float32:
    if not (np.isfinite(sigma) and sigma > 0):
        raise InputError(f"colour_sigma must be a number > 0, got {sigma!r}")
    return np.float32(-0.5 / (sigma * sigma))


def _guided_weights(colours: list, pixels: list, bilinear: list, scale: np.float32) -> list:
    """The normalised weights of the 4 cells each pixel mixes: the cells' mean colours (each a
    list of the R, G, B planes, `cell_colours`, 0..1) and bilinear weights, broadcast against the
    pixels' R, G, B planes (float32, 0..1). A cell weighs its bilinear weight times
    exp(scale |pixel - cell colour|^2), normalised over the 4; distances are taken relative to the
    closest cell's, whose colour factor is then 1, so the weights never all vanish. A pixel's
    probabilities are then sum_i weight_i x probs_i, added in the order of the cells."""
    d2 = []
    for col in colours:
        dist = None
        for pc, cc in zip(pixels, col):
            diff = pc - cc
            diff *= diff
            dist = diff if dist is None else np.add(dist, diff, out=dist)
        d2.append(dist)
    nearest = np.minimum(np.minimum(d2[0], d2[1]), np.minimum(d2[2], d2[3]))
    wts = [b * np.exp((d - nearest) * scale) for b, d in zip(bilinear, d2)]
    inv = np.float32(1) / (wts[0] + wts[1] + wts[2] + wts[3])
    return [wt * inv for wt in wts]


def _planes(a: np.ndarray, scale: float = 1.0) -> list:
    """The R, G, B planes of a (..., 3) array as float32 times `scale` (1 / 255 for uint8 pixels)."""
    return [a[..., c].astype(np.float32) * np.float32(scale) for c in range(3)]


# bilinear weight of the first (upper or left) cell of a block for its pixel offsets 0..3
_FIRST_CELL_WEIGHT = np.array([wc if own == 0 else wo for own, wc, wo in _BLOCK_TAPS], np.float32)


def _interpolate_blocks_guided(probs: np.ndarray, bi: np.ndarray, bj: np.ndarray, out: np.ndarray,
                               image: np.ndarray, colours: np.ndarray, scale: np.float32) -> None:
    """`_interpolate_blocks` with colour-guided weights (`_guided_weights`): the labels of
    `upsample4_guided`, exactly. All 16 pixels of each block at once: (n, 4, 4) per cell."""
    k, h, w = probs.shape
    height, width = out.shape
    r = (np.clip(bi, 0, h - 1), np.clip(bi + 1, 0, h - 1))
    c = (np.clip(bj, 0, w - 1), np.clip(bj + 1, 0, w - 1))
    y = 4 * bi[:, None] + 2 + np.arange(4)  # (n, 4) pixel rows and columns of each block
    x = 4 * bj[:, None] + 2 + np.arange(4)
    flat = np.clip(y, 0, height - 1)[:, :, None] * width + np.clip(x, 0, width - 1)[:, None, :]  # (n, 4, 4)
    pixels = _planes(image.reshape(-1, 3)[flat], 1 / 255)
    wy = (_FIRST_CELL_WEIGHT[:, None], np.float32(1) - _FIRST_CELL_WEIGHT[:, None])  # (4, 1): by row offset
    wx = (_FIRST_CELL_WEIGHT, np.float32(1) - _FIRST_CELL_WEIGHT)  # (4,): by column offset
    cells = [(a, b) for a in range(2) for b in range(2)]
    wts = _guided_weights([[p[r[a], c[b]][:, None, None] for p in colours] for a, b in cells], pixels,
                          [wy[a] * wx[b] for a, b in cells], scale)  # 4 x (n, 4, 4)
    corner = [probs[:, r[a], c[b]][:, :, None, None] for a, b in cells]  # 4 x (k, n, 1, 1)
    # one cluster at a time (arrays of one band's mixed blocks stay in cache), keeping the first
    # best as argmax does
    best = np.empty_like(wts[0])
    labels = np.zeros(wts[0].shape, np.uint8)
    acc, term = np.empty_like(wts[0]), np.empty_like(wts[0])
    for j in range(k):
        np.multiply(wts[0], corner[0][j], out=acc)
        for wt, cp in zip(wts[1:], corner[1:]):
            acc += np.multiply(wt, cp[j], out=term)
        if j == 0:
            best[...] = acc
            continue
        better = acc > best
        labels[better] = j
        np.maximum(best, acc, out=best)
    ok = ((y >= 0) & (y < height))[:, :, None] & ((x >= 0) & (x < width))[:, None, :]
    out.reshape(-1)[flat[ok]] = labels[ok]


def upsample4_guided(probs: np.ndarray, image: np.ndarray, sigma: float) -> np.ndarray:
    """(k, h, w) cells -> (k, H, W) pixel probabilities for the uint8 (H, W, 3) `image` they
    cover: joint bilateral upsampling. Each pixel mixes the 2 x 2 cells `upsample4` mixes, each
    cell's bilinear weight times exp(-|c_p - c_j|^2 / (2 sigma^2)), c_p the pixel's colour and c_j
    the cell's mean colour (RGB, 0..1), normalised: a pixel on the bright side of an edge takes the
    bright cell's clusters. sigma -> infinity is `upsample4`."""
    k, h, w = probs.shape
    height, width = image.shape[:2]
    if (output_size(height), output_size(width)) != (h, w):
        raise InputError(f"image {image.shape[:2]} does not give the {h} x {w} cells it was passed with")

    def taps(n_px: int, n_cells: int):  # cells mixed by each pixel and their bilinear weights
        lo = (np.arange(n_px) + 2) // 4 - 1
        first = _FIRST_CELL_WEIGHT[(np.arange(n_px) + 2) % 4]
        return (np.clip(lo, 0, n_cells - 1), np.clip(lo + 1, 0, n_cells - 1)), (first, np.float32(1) - first)

    (r0, r1), (wy0, wy1) = taps(height, h)
    (c0, c1), (wx0, wx1) = taps(width, w)
    rows, cols = (r0[:, None], r1[:, None]), (c0[None, :], c1[None, :])
    wy, wx = (wy0[:, None], wy1[:, None]), (wx0[None, :], wx1[None, :])
    cells = [(a, b) for a in range(2) for b in range(2)]
    colours = _planes(cell_colours(image))
    wts = _guided_weights([[p[rows[a], cols[b]] for p in colours] for a, b in cells], _planes(image, 1 / 255),
                          [wy[a] * wx[b] for a, b in cells], _colour_scale(sigma))
    vals = wts[0] * probs[:, rows[0], cols[0]]
    for wt, (a, b) in zip(wts[1:], cells[1:]):
        vals += wt * probs[:, rows[a], cols[b]]
    return vals
