"""The encoder forward pass in numpy: the layer list of an artifact executed with BLAS matrix products.

Layout and conventions (numerically the same as `stages/model.py`):
- activations are channels-last float32 arrays (H, W, C); the input is
  (rgb / input_scale - input_mean) / input_std;
- a conv pads with zeros by `padding` = dilation * (kernel // 2) on every side, so a stride-2 conv
  maps H to ceil(H / 2); batch norm is already folded into the conv weight and bias at export;
- a k x k conv is an im2col + sgemm: for a band of output rows, the k*k shifted views of the padded
  input are copied side by side into one (rows * W_out, k*k*C) matrix and multiplied by the
  (k*k*C, C_out) weight matrix straight into the output array. Bands bound the im2col buffer
  (`band_bytes`), so memory is the activations plus a few MB whatever the image size;
- bias, the residual add and ReLU are applied in place on each band while it is still in cache.

Layer ops (what `stages.model.Encoder.export_layers()` emits, validated by `validate_layers`):
    {"op": "conv", "name", "in", "out", "kernel", "stride", "dilation", "padding", "act"}
        arrays "<name>.weight" (out, in, kernel, kernel) and "<name>.bias" (out,)
    {"op": "residual", "name", "layers": [...], "act"}   act(x + layers(x)), shape-preserving
    {"op": "l2norm"}                                      unit length over channels (eps 1e-12)
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._blas import blas_threads
from .errors import ArtifactError, InputError

ACTIVATIONS = ("relu", "none")
# Upper bound of one band's im2col buffer. About 1-2 MB keeps a band's buffer and output in cache
# while its single-threaded sgemm runs, with enough bands to keep every thread busy
# (measured with benchmarks/runtime_bench.py --band-bytes).
DEFAULT_BAND_BYTES = 2 << 20
SERIAL_BAND_BYTES = 16 << 20  # when BLAS threads cannot be controlled (see Network)


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
    """A conv's weight as the (k*k*C_in, C_out) matrix matching the im2col column order (dy, dx, c)."""

    def __init__(self, layer: dict, weight: np.ndarray, bias: np.ndarray):
        self.name = layer["name"]
        self.kernel, self.stride = layer["kernel"], layer["stride"]
        self.dilation, self.padding, self.act = layer["dilation"], layer["padding"], layer["act"]
        self.cin, self.cout = layer["in"], layer["out"]
        w = np.asarray(weight, dtype=np.float32)
        self.matrix = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, self.cout))
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)

    @property
    def flops_per_output(self) -> int:
        return 2 * self.matrix.shape[0] * self.cout


def conv2d(x: np.ndarray, cw: ConvWeights, skip: np.ndarray | None = None, act: str | None = None,
           band_bytes: int = DEFAULT_BAND_BYTES, pool: "BandPool | None" = None) -> np.ndarray:
    """act(conv(x) + bias [+ skip]) for channels-last x (H, W, C_in) -> (H_out, W_out, C_out).

    `skip` (same shape as the output) is added before the activation (a fused residual add);
    `act` overrides the layer's own activation (used for the residual's activation). Bands of output
    rows run on `pool` (serially when None); each band's result depends only on its own rows, so
    the output is the same whatever the band size or the number of threads.
    """
    h, w, c = x.shape
    k, s, d, p = cw.kernel, cw.stride, cw.dilation, cw.padding
    ho, wo = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    out = np.empty((ho, wo, cw.cout), dtype=np.float32)
    act = cw.act if act is None else act
    pointwise = k == 1 and s == 1
    # contiguous: the strided tap views below assume float32 rows packed as (W, C)
    xin = np.pad(x, ((p, p), (p, p), (0, 0))) if p else np.ascontiguousarray(x, dtype=np.float32)
    kkc = k * k * c
    row_bytes = wo * (c if pointwise else kkc) * 4
    rows_per_band = max(1, min(ho, band_bytes // max(1, row_bytes)))

    def band(r0: int) -> None:
        r1 = min(ho, r0 + rows_per_band)
        n = r1 - r0
        if pointwise:
            a = xin[r0:r1].reshape(-1, c)
        else:
            cols = _scratch(n * wo * kkc).reshape(n, wo, kkc)
            for dy in range(k):
                rs = r0 * s + dy * d
                rows = xin[rs: rs + (n - 1) * s + 1: s]
                if d == 1:
                    # the k taps of one kernel row are k adjacent pixels: copy them as one run of
                    # k*C floats per output pixel (an overlapping read-only view), not k runs of C
                    taps = as_strided(rows, shape=(n, wo, k * c),
                                      strides=(rows.strides[0], s * c * 4, 4), writeable=False)
                    cols[:, :, dy * k * c:(dy + 1) * k * c] = taps
                    continue
                for dx in range(k):
                    cs = dx * d
                    j = (dy * k + dx) * c
                    cols[:, :, j:j + c] = rows[:, cs: cs + (wo - 1) * s + 1: s]
            a = cols.reshape(-1, kkc)
        o = out[r0:r1].reshape(-1, cw.cout)
        np.matmul(a, cw.matrix, out=o)
        o += cw.bias
        if skip is not None:
            o += skip[r0:r1].reshape(-1, cw.cout)
        if act == "relu":
            np.maximum(o, 0.0, out=o)

    starts = range(0, ho, rows_per_band)
    if pool is None:
        for r0 in starts:
            band(r0)
    else:
        pool.map(band, starts)
    return out


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A per-thread float32 buffer of at least `size` elements (reused across bands and layers)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < size:
        buf = _local.buf = np.empty(size, dtype=np.float32)
    return buf[:size]


class BandPool:
    """A thread pool running a conv's row bands in parallel with single-threaded BLAS calls.

    numpy releases the GIL in copies and sgemm, so `threads` bands run truly in parallel. The pool
    is only used inside `Network.__call__`, which limits BLAS to one thread for its duration.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="landseg-band")

    def map(self, fn, items) -> None:
        # list() re-raises the first exception of any band
        list(self._executor.map(fn, items))


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


class Network:
    """Executes a validated layer list on channels-last float32 input."""

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
        # tall matrices to pay off): the same results, slower.
        self.parallel = self.threads > 1 and self._blas.available
        self._pool = BandPool(self.threads) if self.parallel else None
        if not self._blas.available:
            self.band_bytes = max(band_bytes, SERIAL_BAND_BYTES)
        self.layers = layers
        self.convs: dict[str, ConvWeights] = {}

        def collect(ops):
            for layer in ops:
                if layer["op"] == "conv":
                    name = layer["name"]
                    self.convs[name] = ConvWeights(layer, arrays[f"{name}.weight"], arrays[f"{name}.bias"])
                elif layer["op"] == "residual":
                    collect(layer["layers"])

        collect(layers)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Channels-last normalised input (H, W, 3) float32 -> (ceil(H/4), ceil(W/4), D) embeddings."""
        if x.ndim != 3 or x.shape[2] != self.summary.in_channels:
            raise InputError(f"expected input (H, W, {self.summary.in_channels}), got {x.shape}")
        if not self._blas.available:
            return self._run(self.layers, x)
        with self._blas.single_threaded():  # also when threads == 1: one thread means one thread
            return self._run(self.layers, x)

    def describe(self) -> str:
        """How the forward pass is parallelised (for logs and the benchmark)."""
        if self.parallel:
            return f"{self.threads} band threads, single-threaded BLAS ({self._blas.description})"
        if self._blas.available:
            return f"1 thread, single-threaded BLAS ({self._blas.description})"
        return f"serial bands, BLAS's own threading ({self._blas.description})"

    def _run(self, ops, x: np.ndarray) -> np.ndarray:
        for layer in ops:
            op = layer["op"]
            if op == "conv":
                x = conv2d(x, self.convs[layer["name"]], band_bytes=self.band_bytes, pool=self._pool)
            elif op == "residual":
                inner = layer["layers"]
                last = inner[-1]
                if last["op"] == "conv" and last["act"] == "none":
                    # fuse the skip add and the residual's activation into the last conv's bands
                    h = self._run(inner[:-1], x)
                    x = conv2d(h, self.convs[last["name"]], skip=x, act=layer["act"],
                               band_bytes=self.band_bytes, pool=self._pool)
                else:
                    h = self._run(inner, x)
                    h += x
                    if layer["act"] == "relu":
                        np.maximum(h, 0.0, out=h)
                    x = h
            else:  # l2norm (validated to be last)
                x = l2_normalise(x)
        return x

    def flops(self, height: int, width: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of the convolutions for an input of height x width pixels."""
        total = 0

        def walk(ops, h, w):
            nonlocal total
            for layer in ops:
                if layer["op"] == "conv":
                    cw = self.convs[layer["name"]]
                    k, s, d, p = cw.kernel, cw.stride, cw.dilation, cw.padding
                    h = (h + 2 * p - d * (k - 1) - 1) // s + 1
                    w = (w + 2 * p - d * (k - 1) - 1) // s + 1
                    total += h * w * cw.flops_per_output
                elif layer["op"] == "residual":
                    walk(layer["layers"], h, w)
            return h, w

        walk(self.layers, height, width)
        return total
