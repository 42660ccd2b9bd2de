"""The encoder forward pass in numpy: the layer list of an artifact executed with BLAS matrix products.

Layout and conventions (numerically the same as `stages/model.py`):
- activations are channels-last float32 arrays (H, W, C); the input is
  (rgb / input_scale - input_mean) / input_std;
- a conv pads with zeros by `padding` = dilation * (kernel // 2) on every side, so a stride-2 conv
  maps H to ceil(H / 2); batch norm is already folded into the conv weight and bias at export;
- a k x k conv runs over bands of output rows as k sgemms ("row taps"): the k horizontal taps of
  every input row the band reads are copied side by side once, into an (input rows, W_out, k*C)
  buffer; kernel row dy is then one sgemm of the buffer's rows s*i + dy*d (a plain slice when the
  stride is 1) by that row's (k*C, C_out) weights, and the k products are summed. Each input value
  is copied about k times, not k*k times as by im2col: on the memory-bound 2-core development VM
  a 3 x 3 conv of 32 channels ran 1.5x faster than im2col + one sgemm, and even the RGB stem
  (k*C = 9) was no slower (measured). A 1 x 1 conv multiplies the input rows directly. Bands bound
  the copy buffers (`band_bytes`), so memory is the activations plus a few MB whatever the image
  size;
- bias, the residual add and ReLU are applied in place on each band while it is still in cache;
- activations are written straight into zero-bordered buffers with the padding of the conv that
  reads them next (no padding copies), and those buffers are reused across layers and calls
  (`BufferArena`): fresh memory costs a page fault per 4 KB, about a sixth of the whole pass when
  every layer allocated its output (measured).

Layer ops (what `stages.model.Encoder.export_layers()` emits, validated by `validate_layers`):
    {"op": "conv", "name", "in", "out", "kernel", "stride", "dilation", "padding", "act"}
        arrays "<name>.weight" (out, in, kernel, kernel) and "<name>.bias" (out,)
    {"op": "residual", "name", "layers": [...], "act"}   act(x + layers(x)), shape-preserving
    {"op": "l2norm"}                                      unit length over channels (eps 1e-12)
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._blas import blas_threads, direct_sgemm, matmul
from .errors import ArtifactError, InputError

ACTIVATIONS = ("relu", "none")
# Upper bound of one band's tap buffer. About 1-2 MB keeps a band's buffer and output in cache
# while its single-threaded sgemm runs, with enough bands to keep every thread busy
# (measured with benchmarks/runtime_bench.py --band-bytes).
DEFAULT_BAND_BYTES = 2 << 20
SERIAL_BAND_BYTES = 16 << 20  # when BLAS threads cannot be controlled (see Network)
# Bands of the input normalisation and the final L2 normalisation (cheap elementwise passes).
INPUT_BAND_BYTES = 1 << 20
# Intermediate activation buffers kept between forward passes (see BufferArena): enough for a
# 1024-pixel tile plus halo several times over, little next to what QGIS itself holds.
ARENA_KEEP_BYTES = 256 << 20


@dataclass(frozen=True)
class LayerSummary:
    """What a validated layer list computes: channels in/out, total stride, receptive field (pixels)
    and the exact shape of every array it needs."""

    in_channels: int
    out_channels: int
    stride: int
    receptive_field: int
    array_shapes: dict


def _int_field(layer: dict, key: str, where: str, lo: int) -> int:
    v = layer.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ArtifactError(f"{where}: '{key}' must be an integer >= {lo}, got {v!r}")
    return v


def validate_layers(layers, in_channels: int = 3) -> LayerSummary:
    """Check a layer list's structure and channel chain; return its summary. Raises ArtifactError."""
    shapes: dict[str, tuple] = {}
    # receptive field bookkeeping: rf in input pixels, jump = input pixels per step at this depth
    state = {"rf": 1, "jump": 1}

    def walk(ops, channels: int, where: str, inside_residual: bool) -> int:
        if not isinstance(ops, list) or not ops:
            raise ArtifactError(f"{where}: expected a non-empty list of layers, got {ops!r}")
        for i, layer in enumerate(ops):
            at = f"{where}[{i}]"
            if not isinstance(layer, dict) or "op" not in layer:
                raise ArtifactError(f"{at}: expected an object with an 'op' key, got {layer!r}")
            op = layer["op"]
            if op == "conv":
                name = layer.get("name")
                if not isinstance(name, str) or not name:
                    raise ArtifactError(f"{at}: conv needs a non-empty 'name'")
                if f"{name}.weight" in shapes:
                    raise ArtifactError(f"{at}: duplicate layer name {name!r}")
                cin = _int_field(layer, "in", at, 1)
                cout = _int_field(layer, "out", at, 1)
                k = _int_field(layer, "kernel", at, 1)
                s = _int_field(layer, "stride", at, 1)
                d = _int_field(layer, "dilation", at, 1)
                p = _int_field(layer, "padding", at, 0)
                if k % 2 != 1:
                    raise ArtifactError(f"{at} ({name}): kernel must be odd, got {k}")
                if p != d * (k // 2):
                    raise ArtifactError(f"{at} ({name}): padding must be dilation * (kernel // 2) = "
                                        f"{d * (k // 2)}, got {p}")
                if layer.get("act") not in ACTIVATIONS:
                    raise ArtifactError(f"{at} ({name}): act must be one of {ACTIVATIONS}, "
                                        f"got {layer.get('act')!r}")
                if cin != channels:
                    raise ArtifactError(f"{at} ({name}): expects {cin} input channels but receives "
                                        f"{channels}")
                if inside_residual and s != 1:
                    raise ArtifactError(f"{at} ({name}): convs inside a residual must have stride 1")
                shapes[f"{name}.weight"] = (cout, cin, k, k)
                shapes[f"{name}.bias"] = (cout,)
                state["rf"] += d * (k - 1) * state["jump"]
                state["jump"] *= s
                channels = cout
            elif op == "residual":
                if layer.get("act") not in ACTIVATIONS:
                    raise ArtifactError(f"{at}: residual act must be one of {ACTIVATIONS}, "
                                        f"got {layer.get('act')!r}")
                out = walk(layer.get("layers"), channels, f"{at}.layers", True)
                if out != channels:
                    raise ArtifactError(f"{at}: residual branch maps {channels} channels to {out}")
            elif op == "l2norm":
                if inside_residual or i != len(ops) - 1:
                    raise ArtifactError(f"{at}: l2norm must be the last top-level layer")
            else:
                raise ArtifactError(f"{at}: unknown op {op!r} (expected conv, residual or l2norm)")
        return channels

    out = walk(layers, in_channels, "layers", False)
    if layers[-1].get("op") != "l2norm":
        raise ArtifactError("layers: the last layer must be l2norm (embeddings are unit vectors)")
    return LayerSummary(in_channels, out, state["jump"], state["rf"], shapes)


def receptive_field(layers) -> int:
    """Receptive field, in input pixels, of one output cell of a layer list."""
    return validate_layers(layers).receptive_field


def output_size(size: int, stride: int = 4) -> int:
    """Output length of a stride-`stride` encoder (stride-2 stages) for an input length in pixels."""
    for _ in range(int(round(math.log2(stride)))):
        size = -(-size // 2)
    return size


# --------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------


class ConvWeights:
    """A conv's weights as sgemm operands: one (k*C_in, C_out) matrix per kernel row dy, its rows
    ordered (dx, c) like the row taps."""

    def __init__(self, layer: dict, weight: np.ndarray, bias: np.ndarray):
        self.name = layer["name"]
        self.kernel, self.stride = layer["kernel"], layer["stride"]
        self.dilation, self.padding, self.act = layer["dilation"], layer["padding"], layer["act"]
        self.cin, self.cout = layer["in"], layer["out"]
        w = np.asarray(weight, dtype=np.float32)
        self.row_matrices = [np.ascontiguousarray(w[:, :, dy].transpose(2, 1, 0).reshape(-1, self.cout))
                             for dy in range(self.kernel)]
        # (C_in, C_out) per tap (dy, dx), row-major over the taps: the shifted products' operands
        self.tap_matrices = [np.ascontiguousarray(w[:, :, dy, dx].T) for dy in range(self.kernel)
                             for dx in range(self.kernel)]
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self._bias_rows: dict[int, np.ndarray] = {}

    @property
    def flops_per_output(self) -> int:
        return 2 * self.kernel * self.kernel * self.cin * self.cout

    def bias_row(self, width: int) -> np.ndarray:
        """The bias repeated over an output row of `width` pixels: adding it to whole rows runs a
        long inner loop, broadcasting the (C_out,) bias runs one of C_out elements (slower)."""
        row = self._bias_rows.get(width)
        if row is None:
            row = self._bias_rows[width] = np.tile(self.bias, width)
        return row

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        k, s, d, p = self.kernel, self.stride, self.dilation, self.padding
        return (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1


def conv2d(x: np.ndarray, cw: ConvWeights, skip: np.ndarray | None = None, act: str | None = None,
           band_bytes: int = DEFAULT_BAND_BYTES, pool: BandPool | None = None) -> np.ndarray:
    """act(conv(x) + bias [+ skip]) for channels-last x (H, W, C_in) -> (H_out, W_out, C_out).

    `skip` (same shape as the output) is added before the activation (a fused residual add);
    `act` overrides the layer's own activation (used for the residual's activation).
    """
    p = cw.padding
    xin = np.pad(x, ((p, p), (p, p), (0, 0))) if p else np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((*cw.output_size(*x.shape[:2]), cw.cout), dtype=np.float32)
    conv2d_into(xin, cw, out, skip, act, band_bytes, pool)
    return out


def conv2d_into(xin: np.ndarray, cw: ConvWeights, out: np.ndarray, skip: np.ndarray | None = None,
                act: str | None = None, band_bytes: int = DEFAULT_BAND_BYTES,
                pool: BandPool | None = None) -> None:
    """conv2d of an input already zero-padded by `cw.padding`, written into `out` (H_out, W_out, C_out).

    `xin`, `out` and `skip` may be views with strided rows (the interior of a larger padded
    buffer) as long as each row's pixels are packed (W, C). Bands of output rows run on `pool`
    (serially when None); each band's result depends only on its own rows, so the output is the
    same bits whatever the number of threads. The band size may change the last bit: some BLAS
    kernels round a row differently by sgemm height (OpenBLAS 0.3.31 on AVX2 does).
    """
    act = cw.act if act is None else act
    ho = out.shape[0]
    if cw.kernel == 1 and cw.stride == 1:  # pointwise: the input rows are the sgemm operand
        rows_per_band = max(1, min(ho, band_bytes // (out.shape[1] * xin.shape[2] * 4)))

        def band(r0: int, r1: int, o: np.ndarray) -> None:
            _matmul_rows(xin[r0:r1], cw.row_matrices[0], o)
    else:
        band, rows_per_band = _row_taps_band(xin, cw, out, band_bytes)

    bias_row = cw.bias_row(out.shape[1])

    def run(r0: int) -> None:
        r1 = min(ho, r0 + rows_per_band)
        o = out[r0:r1]
        band(r0, r1, o)
        o2 = _rows(o)
        o2 += bias_row
        if skip is not None:
            o += skip[r0:r1]
        if act == "relu":
            np.maximum(o, 0.0, out=o)

    _each(run, range(0, ho, rows_per_band), pool)


def conv2d_shifted_into(xbuf: np.ndarray, cw: ConvWeights, ybuf: np.ndarray, sgemm,
                        skip: np.ndarray | None = None, act: str | None = None,
                        band_bytes: int = DEFAULT_BAND_BYTES, pool: BandPool | None = None) -> None:
    """A stride-1 conv as k * k shifted products, between zero-bordered buffers of the same layout.

    xbuf (h + 2p, w + 2p, C_in) holds the input inside a zero border of p = `cw.padding` pixels and
    ybuf (h + 2p, w + 2p, C_out) receives act(conv + bias [+ skip]) inside the same border; `skip`,
    when given, is a buffer of ybuf's shape and layout. With rows of pitch P = w + 2p, output pixel
    (r, x) and input pixel (r + dy*d, x + dx*d) are P*(dy*d) + dx*d apart in the flattened buffers:
    for a band of output rows, tap (dy, dx) is one sgemm of a contiguous run of input pixels by
    that tap's (C_in, C_out) matrix, accumulated (beta = 1) into the output run, which starts from
    the bias (plus the skip). A run's 2p pixels per row past the last column land on the output's
    border and are zeroed again afterwards. Each band depends on its own rows only, so the result
    is the same bits for any number of threads."""
    act = cw.act if act is None else act
    hp, pitch, cin = xbuf.shape
    p, k, d = cw.padding, cw.kernel, cw.dilation
    h, w, cout = hp - 2 * p, pitch - 2 * p, cw.cout
    assert cw.stride == 1 and ybuf.shape == (hp, pitch, cout) and xbuf.flags.c_contiguous and ybuf.flags.c_contiguous
    base = p * pitch + p  # flat index of output pixel (0, 0)
    rows_per_band = max(1, min(h, band_bytes // (pitch * max(cin, cout) * 4)))
    bias = cw.bias_row(rows_per_band * pitch)
    yflat = ybuf.reshape(-1, cout)
    sflat = None if skip is None else skip.reshape(-1, cout)
    xptr, yptr, isz = xbuf.ctypes.data, ybuf.ctypes.data, 4
    offsets = [dy * d * pitch + dx * d for dy in range(k) for dx in range(k)]
    taps = [(m.ctypes.data, off) for m, off in zip(cw.tap_matrices, offsets)]

    def run(r0: int) -> None:
        r1 = min(h, r0 + rows_per_band)
        q0 = r0 * pitch
        n = (r1 - r0) * pitch - (2 * p if r1 == h else 0)  # the last row's run stops at its last column
        o = yflat[base + q0: base + q0 + n]
        ov = o.reshape(-1)
        if sflat is None:
            ov[...] = bias[:n * cout]
        else:
            np.add(sflat[base + q0: base + q0 + n].reshape(-1), bias[:n * cout], out=ov)
        c = yptr + (base + q0) * cout * isz
        for b, off in taps:
            sgemm(n, cout, cin, xptr + (q0 + off) * cin * isz, cin, b, cout, 1.0, c, cout)
        if act == "relu":
            np.maximum(ov, 0.0, out=ov)
        ybuf[r0 + p: r1 + p, p + w:] = 0.0  # right border of the band's rows
        ybuf[r0 + p + 1: r1 + p + 1, :p] = 0.0  # left border of the next rows

    _each(run, range(0, h, rows_per_band), pool)


def _each(fn, items, pool: BandPool | None) -> None:
    """fn(item) for every item: on the pool's threads, or one after another without a pool."""
    if pool is None:
        for item in items:
            fn(item)
    else:
        pool.map(fn, items)


def _elementwise_rows(width: int, channels: int) -> int:
    """Rows per band of the cheap elementwise passes (input and final L2 normalisation)."""
    return max(1, INPUT_BAND_BYTES // (width * channels * 4))


def _rows(a: np.ndarray) -> np.ndarray:
    """An (n, w, c) array whose rows are each contiguous (also the interior of a padded buffer) as
    an (n, w * c) view; raises rather than silently copying when that is impossible."""
    v = a.view()
    v.shape = (a.shape[0], a.shape[1] * a.shape[2])
    return v


def _matmul_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out (n, w, N) = a (n, w, K) @ b (K, N): one sgemm when both are contiguous, else one per row
    (rows of a padded buffer's interior are strided)."""
    if a.flags.c_contiguous and out.flags.c_contiguous:
        matmul(a.reshape(-1, a.shape[2]), b, out=out.reshape(-1, out.shape[2]))
    else:
        matmul(a, b, out=out)


def _row_taps_band(xin: np.ndarray, cw: ConvWeights, out: np.ndarray, band_bytes: int):
    """The row-taps form (module docstring): (band function, output rows per band)."""
    wo, cout = out.shape[1:]
    c = xin.shape[2]
    k, s, d = cw.kernel, cw.stride, cw.dilation
    kc = k * c
    reach = d * (k - 1)  # input rows a band reads beyond the first tap row of its last output row
    rows_per_band = max(1, min(out.shape[0], (band_bytes // (wo * kc * 4) - reach) // s))

    def band(r0: int, r1: int, o: np.ndarray) -> None:
        n = r1 - r0
        n_in = s * (n - 1) + reach + 1
        buf = _scratch(n_in * wo * kc + n * wo * cout)
        taps = buf[:n_in * wo * kc].reshape(n_in, wo, kc)
        rows = xin[s * r0: s * r0 + n_in]
        if d == 1:  # the k taps of a row are k adjacent pixels: one overlapping run of k*C floats
            taps[...] = as_strided(rows, shape=(n_in, wo, kc), strides=(rows.strides[0], s * c * 4, 4),
                                   writeable=False)
        else:
            for dx in range(k):
                taps[:, :, dx * c:(dx + 1) * c] = rows[:, dx * d: dx * d + s * (wo - 1) + 1: s]
        tmp = buf[n_in * wo * kc:].reshape(n, wo, cout)
        for dy in range(k):  # kernel row dy reads tap rows s*i + dy*d (a plain slice when s == 1)
            _matmul_rows(taps[dy * d: dy * d + s * (n - 1) + 1: s], cw.row_matrices[dy], tmp if dy else o)
            if dy:
                o += tmp

    return band, rows_per_band


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A per-thread float32 buffer of at least `size` elements (reused across bands and layers)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < size:
        buf = _local.buf = np.empty(size, dtype=np.float32)
    return buf[:size]


class BandPool:
    """A thread pool running a conv's row bands in parallel with single-threaded BLAS calls.

    numpy releases the GIL in copies and sgemm, so `threads` bands run truly in parallel. Its users
    (a forward pass, and the band work around it through `Network.map`) run with BLAS limited to one
    thread (`Network.single_threaded_blas`).
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="landseg-band")

    def map(self, fn, items) -> None:
        """fn(item) for every item; the calling thread works too. Items are handed out one at a
        time from a shared iterator (a list iterator's next is atomic), so a slow band does not hold
        the others up, while the threads are woken once per call instead of once per item (a forward
        pass maps about 300 bands in 9 calls). Raises the first exception of any band, after the
        other threads have stopped taking items."""
        items = list(items)
        helpers = min(self.threads, len(items)) - 1
        if helpers <= 0:
            _each(fn, items, None)
            return
        queue = iter(items)

        def work() -> None:
            try:
                for item in queue:
                    fn(item)
            except BaseException:
                for _ in queue:  # drain: the other threads stop at their next item
                    pass
                raise

        futures = [self._executor.submit(work) for _ in range(helpers)]
        error = None
        try:
            work()
        except BaseException as e:
            error = e
        for f in futures:
            try:
                f.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error


def default_threads() -> int:
    """CPU cores available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Unit length over the last axis, as torch.nn.functional.normalize (x / max(||x||, eps)), in place."""
    norm = np.sqrt(np.einsum("...c,...c->...", x, x))
    np.maximum(norm, eps, out=norm)
    x /= norm[..., None]
    return x


class BufferArena:
    """Reusable float32 buffers for the intermediate activations of a forward pass.

    Kept between calls, so that the forward passes over a raster's tiles reuse the same memory
    instead of page-faulting a fresh buffer per layer (fresh memory costs about 4 ms per 32 MB on
    the development VM, a sixth of the whole pass). At most `keep_bytes` stay allocated between
    calls; `take` returns the smallest free buffer that fits, or a new one that replaces the largest
    free buffer (so the number of buffers stays that of the busiest forward pass).
    """

    def __init__(self, keep_bytes: int = ARENA_KEEP_BYTES):
        self.keep_bytes = keep_bytes
        self._free: list[np.ndarray] = []

    def take(self, size: int) -> np.ndarray:
        fits = [i for i, b in enumerate(self._free) if b.size >= size]
        if fits:
            return self._free.pop(min(fits, key=lambda i: self._free[i].size))
        if self._free:
            # a new, larger buffer replaces the largest free one: growing tiles do not pile up buffers
            self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].size))
        return np.empty(size, dtype=np.float32)

    def give(self, buf: np.ndarray) -> None:
        self._free.append(buf)

    def trim(self) -> None:
        """Drop the largest free buffers until at most keep_bytes remain."""
        self._free.sort(key=lambda b: b.size)
        while self._free and self.retained_bytes > self.keep_bytes:
            self._free.pop()

    @property
    def retained_bytes(self) -> int:
        return sum(b.nbytes for b in self._free)


@dataclass
class _Activation:
    """An (h, w, c) activation stored inside a zero border of `pad` pixels: buf (h + 2 pad, w + 2 pad, c).
    `flat` is the arena buffer it lives in (None when it does not come from the arena)."""

    buf: np.ndarray
    pad: int
    h: int
    w: int
    flat: np.ndarray | None = None

    @property
    def inner(self) -> np.ndarray:
        p = self.pad
        return self.buf[p:p + self.h, p:p + self.w]


class Network:
    """Executes a validated layer list on channels-last float32 input.

    Activations are written straight into zero-bordered buffers with the padding of the conv that
    reads them next (no padding copies), taken from a `BufferArena`; only the output is a fresh
    array. Calls are serialised by a lock (the pass is parallel inside).
    """

    def __init__(self, layers: list, arrays: dict, band_bytes: int = DEFAULT_BAND_BYTES,
                 threads: int | None = None):
        self.summary = validate_layers(layers)
        self.band_bytes = band_bytes
        self.threads = default_threads() if threads is None else threads
        if self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        self._blas = blas_threads()
        # Parallel bands need single-threaded BLAS. Without control over the BLAS's threads, run
        # bands serially with BLAS's own threading, in larger bands (a multi-threaded sgemm needs
        # tall matrices to pay off): the same results up to the rounding a band height may change,
        # slower.
        self.parallel = self.threads > 1 and self._blas.available
        self._pool = BandPool(self.threads) if self.parallel else None
        if not self._blas.available:
            self.band_bytes = max(band_bytes, SERIAL_BAND_BYTES)
        self.layers = layers
        self.convs: dict[str, ConvWeights] = {}
        order: list[str] = []

        def collect(ops):
            for layer in ops:
                if layer["op"] == "conv":
                    name = layer["name"]
                    self.convs[name] = ConvWeights(layer, arrays[f"{name}.weight"], arrays[f"{name}.bias"])
                    order.append(name)
                elif layer["op"] == "residual":
                    collect(layer["layers"])

        collect(layers)
        self._last_conv = order[-1]
        self._first_pad = self.convs[order[0]].padding
        # Stride-1 k x k convs run as shifted sgemms (conv2d_shifted_into) when numpy's OpenBLAS can
        # be called directly: their input and output then share one layout (a border of the conv's
        # own padding), which the next conv must be able to read (its padding no larger). Every
        # other conv writes its output with the zero border that the next conv reads it with.
        self._sgemm = direct_sgemm()
        self._shifted: set[str] = set()
        self._pad_after: dict[str, int] = {}
        in_pad = self._first_pad
        for name, nxt in zip(order, order[1:] + [None]):
            cw = self.convs[name]
            nxt_pad = self.convs[nxt].padding if nxt is not None else 0
            if (self._sgemm is not None and nxt is not None and cw.stride == 1 and cw.kernel > 1
                    and in_pad == cw.padding and nxt_pad <= cw.padding):
                self._shifted.add(name)
                self._pad_after[name] = cw.padding
            else:
                self._pad_after[name] = nxt_pad
            in_pad = self._pad_after[name]
        self.arena = BufferArena()
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Channels-last normalised input (H, W, 3) float32 -> (ceil(H/4), ceil(W/4), D) embeddings."""
        if x.ndim != 3 or x.shape[2] != self.summary.in_channels:
            raise InputError(f"expected input (H, W, {self.summary.in_channels}), got {x.shape}")

        def fill(dst: np.ndarray, r0: int, r1: int) -> None:
            dst[...] = x[r0:r1]

        return self._forward(x.shape[0], x.shape[1], fill)

    def forward_rgb(self, rgb: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray,
                    channels_first: bool = False) -> np.ndarray:
        """Embeddings of uint8 RGB (H, W, 3), normalised as (rgb / scale - mean) / std (float32, in
        that order of operations) straight into the first conv's padded input, in parallel bands.
        Channels-last (h, w, D), or (D, h, w) with `channels_first` (transposed band by band
        while the final normalisation has them in cache, not as a separate pass)."""
        if rgb.ndim != 3 or rgb.shape[2] != self.summary.in_channels:
            raise InputError(f"expected input (H, W, {self.summary.in_channels}), got {rgb.shape}")

        w = rgb.shape[1]
        # per-channel constants repeated along a row, so each pass runs over whole rows rather
        # than broadcasting (3,) arrays (an inner loop of 3 elements: 4x slower, measured)
        mean_row, std_row = np.tile(np.float32(mean), w), np.tile(np.float32(std), w)

        def fill(dst: np.ndarray, r0: int, r1: int) -> None:
            d = _rows(dst)
            np.copyto(d, rgb[r0:r1].reshape(r1 - r0, w * 3), casting="unsafe")
            d /= scale
            d -= mean_row
            d /= std_row

        return self._forward(rgb.shape[0], rgb.shape[1], fill, channels_first)

    def _forward(self, h: int, w: int, fill, channels_first: bool = False) -> np.ndarray:
        """Runs the layers on an input written by fill(dst, r0, r1) (input rows r0..r1 into the
        (r1 - r0, w, C) view dst) in bands on the pool."""
        # single-threaded BLAS whenever it can be set (also when threads == 1: one means one)
        blas = self._blas.single_threaded() if self._blas.available else contextlib.nullcontext()
        with self._lock, blas:
            try:
                x = self._activation(h, w, self.summary.in_channels, self._first_pad)
                rows = _elementwise_rows(w, self.summary.in_channels)

                def band(r0: int) -> None:
                    r1 = min(h, r0 + rows)
                    fill(x.inner[r0:r1], r0, r1)

                self.map(band, range(0, h, rows))
                # the last conv writes a fresh array that is returned, unless it gets transposed
                y = self._run(self.layers[:-1], x, keep_input=False,  # the last op is l2norm
                              fresh_last=not channels_first)
                rows = _elementwise_rows(y.w, y.buf.shape[2])
                if not channels_first:
                    self.map(lambda r0: l2_normalise(y.inner[r0:r0 + rows]), range(0, y.h, rows))
                    return y.buf
                out = np.empty((y.buf.shape[2], y.h, y.w), dtype=np.float32)

                def normalise_transpose(r0: int) -> None:
                    band = l2_normalise(y.inner[r0:r0 + rows])
                    out[:, r0:r0 + rows] = band.transpose(2, 0, 1)

                self.map(normalise_transpose, range(0, y.h, rows))
                self._release(y)
                return out
            finally:
                self.arena.trim()

    def single_threaded_blas(self):
        """A context in which BLAS runs single-threaded when the bands run on threads (nothing
        otherwise): for work around the forward passes, whose parallelism is the band threads'."""
        return self._blas.single_threaded() if self.parallel else contextlib.nullcontext()

    def map(self, fn, items) -> None:
        """fn(item) for every item on the network's band threads (serially without them), for
        the band-parallel work around a forward pass (fn must release the GIL to gain)."""
        _each(fn, items, self._pool)

    def _activation(self, h: int, w: int, c: int, pad: int, fresh: bool = False) -> _Activation:
        """An (h, w, c) activation buffer with a zeroed border of `pad` pixels (interior unset)."""
        shape = (h + 2 * pad, w + 2 * pad, c)
        if fresh:
            return _Activation(np.empty(shape, dtype=np.float32), pad, h, w)
        flat = self.arena.take(shape[0] * shape[1] * c)
        buf = flat[:shape[0] * shape[1] * c].reshape(shape)
        if pad:
            buf[:pad] = 0.0
            buf[pad + h:] = 0.0
            buf[pad:pad + h, :pad] = 0.0
            buf[pad:pad + h, pad + w:] = 0.0
        return _Activation(buf, pad, h, w, flat)

    def _release(self, x: _Activation) -> None:
        if x.flat is not None:
            self.arena.give(x.flat)
            x.flat = None

    def describe(self) -> str:
        """How the forward pass is parallelised (for logs and the benchmark)."""
        if self.parallel:
            return f"{self.threads} band threads, single-threaded BLAS ({self._blas.description})"
        if self._blas.available:
            return f"1 thread, single-threaded BLAS ({self._blas.description})"
        return f"serial bands, BLAS's own threading ({self._blas.description})"

    def _conv(self, name: str, x: _Activation, fresh_last: bool, skip: _Activation | None = None,
              act: str | None = None) -> _Activation:
        cw = self.convs[name]
        ho, wo = cw.output_size(x.h, x.w)
        last = name == self._last_conv and fresh_last  # returned to the caller: a fresh array
        y = self._activation(ho, wo, cw.cout, self._pad_after[name], fresh=last)
        if name in self._shifted:
            flat_skip = skip is not None and skip.pad == y.pad and skip.buf.shape == y.buf.shape
            conv2d_shifted_into(x.buf, cw, y.buf, self._sgemm, skip.buf if flat_skip else None,
                                "none" if skip is not None and not flat_skip else act,
                                self.band_bytes, self._pool)
            if skip is not None and not flat_skip:
                yi = y.inner
                yi += skip.inner
                if (cw.act if act is None else act) == "relu":
                    np.maximum(yi, 0.0, out=yi)
            return y
        # every activation was written with a border at least as wide as its next conv reads
        # (Network.__init__): a wider one (after a shifted conv) is read through a view
        extra = x.pad - cw.padding
        assert extra >= 0, (name, x.pad, cw.padding)
        xin = x.buf[extra:x.buf.shape[0] - extra, extra:x.buf.shape[1] - extra] if extra else x.buf
        conv2d_into(xin, cw, y.inner, None if skip is None else skip.inner, act, self.band_bytes, self._pool)
        return y

    def _run(self, ops, x: _Activation, keep_input: bool, fresh_last: bool) -> _Activation:
        """Runs ops on x; x's buffer goes back to the arena once read unless keep_input. With
        fresh_last the network's last conv writes a fresh array instead of an arena buffer."""
        for layer in ops:
            op = layer["op"]
            if op == "conv":
                y = self._conv(layer["name"], x, fresh_last)
            elif op == "residual":
                inner = layer["layers"]
                last = inner[-1]
                if last["op"] == "conv" and last["act"] == "none":
                    # fuse the skip add and the residual's activation into the last conv's bands
                    h = self._run(inner[:-1], x, True, fresh_last) if len(inner) > 1 else x
                    y = self._conv(last["name"], h, fresh_last, skip=x, act=layer["act"])
                    if h is not x:
                        self._release(h)
                else:
                    y = self._run(inner, x, True, fresh_last)
                    yi = y.inner
                    yi += x.inner
                    if layer["act"] == "relu":
                        np.maximum(yi, 0.0, out=yi)
            else:  # l2norm is validated to be the last layer, and applied by _forward
                raise AssertionError("l2norm inside _run")
            if not keep_input:
                self._release(x)
            keep_input = False  # later layers own their inputs
            x = y
        return x

    def flops(self, height: int, width: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of the convolutions for an input of height x width pixels."""
        total = 0

        def walk(ops, h, w):
            nonlocal total
            for layer in ops:
                if layer["op"] == "conv":
                    cw = self.convs[layer["name"]]
                    h, w = cw.output_size(h, w)
                    total += h * w * cw.flops_per_output
                elif layer["op"] == "residual":
                    walk(layer["layers"], h, w)
            return h, w

        walk(self.layers, height, width)
        return total
