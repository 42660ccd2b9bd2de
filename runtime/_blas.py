"""Control of the BLAS library's own thread count, so the runtime can run its bands in parallel.

The convolutions run as many small row-tap + sgemm bands on a pool of Python threads (numpy
releases the GIL in copies and matmul). That is about twice as fast as one big multi-threaded
sgemm per layer, but only while each band's sgemm is single-threaded: a multi-threaded BLAS called
from several threads at once oversubscribes the cores and runs several times slower. So, around a
forward pass, the BLAS that numpy loaded is limited to one thread and then restored.

Which library: threadpoolctl when it is installed (it knows OpenBLAS, MKL and BLIS on every OS);
otherwise the OpenBLAS that numpy loaded, found in /proc/self/maps (Linux) and driven through
ctypes. When neither works (e.g. Apple Accelerate), `BlasThreads.available` is False and the
network runs its bands one after another with BLAS's own threading instead: the same results,
just slower, and `describe()` says which mode is in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

_OPENBLAS_SYMBOLS = (  # (get, set) pairs: numpy's bundled scipy-openblas first, then plain OpenBLAS
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


class BlasThreads:
    """Sets the BLAS thread count to 1 inside `single_threaded()`, restoring it afterwards."""

    def __init__(self):
        self._lock = threading.RLock()
        self._depth = 0
        self._saved = None
        self._get = self._set = None
        self._controller = None
        self.description = "no BLAS thread control found"
        try:
            import threadpoolctl  # optional: only used when installed

            ctl = threadpoolctl.ThreadpoolController()
            blas = ctl.select(user_api="blas")
            if blas.lib_controllers:
                self._controller = blas
                self.description = "threadpoolctl: " + ", ".join(
                    sorted({c.internal_api for c in blas.lib_controllers}))
                return
        except Exception:  # not installed or cannot inspect: try the direct route below
            pass
        for _, lib in loaded_openblas():
            for get_name, set_name in _OPENBLAS_SYMBOLS:
                if hasattr(lib, get_name) and hasattr(lib, set_name):
                    self._get, self._set = getattr(lib, get_name), getattr(lib, set_name)
                    self._get.restype = ctypes.c_int
                    self._set.argtypes = [ctypes.c_int]
                    self.description = f"OpenBLAS via ctypes ({set_name})"
                    return

    @property
    def available(self) -> bool:
        return self._controller is not None or self._set is not None

    @contextlib.contextmanager
    def single_threaded(self):
        """Within the block, BLAS calls use one thread each (re-entrant)."""
        if not self.available:
            yield
            return
        with self._lock:
            if self._depth == 0:
                if self._controller is not None:
                    self._ctx = self._controller.limit(limits=1)
                    self._ctx.__enter__()
                else:
                    self._saved = self._get()
                    self._set(1)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    if self._controller is not None:
                        self._ctx.__exit__(None, None, None)
                    else:
                        self._set(self._saved)


def _loaded_libraries(word: str) -> list[str]:
    """Paths of the loaded shared libraries whose path holds `word` (Linux: /proc/self/maps; else [])."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in lines if word in line.lower() and "/" in line})


def loaded_openblas() -> list[tuple[str, ctypes.CDLL]]:
    """(path, library bound by handle) of every OpenBLAS loaded in this process that ctypes can open."""
    found = []
    for path in _loaded_libraries("openblas"):
        try:
            found.append((path, ctypes.CDLL(path)))
        except OSError:
            continue
    return found


# Optimised BLAS libraries numpy may use; anything else named *blas* is taken for the reference one
_FAST_BLAS = ("openblas", "blis", "mkl", "accelerate", "atlas", "flexiblas")


def reference_blas_note() -> str | None:
    """A sentence for the user when the runtime's matrix products run on an unoptimised BLAS, which
    makes them several times slower: numpy linked to the netlib reference BLAS (Debian's numpy is
    unless OpenBLAS is installed), or GSL's CBLAS shadowing numpy's with no other BLAS to turn to.
    None otherwise, or when it cannot be told (no /proc/self/maps)."""
    import numpy as np

    np.dot(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))  # numpy loads its BLAS lazily
    routed = routed_blas()
    if routed is not None:
        blas = [routed.path]
    elif _shadowing_library() is not None:
        return (f"numpy's matrix products run on GSL's unoptimised CBLAS ({_shadowing_library()}, linked by the "
                "QGIS executable), which makes landseg several times slower: install OpenBLAS (Debian and "
                "Ubuntu: sudo apt install libopenblas0-pthread) and restart QGIS")
    else:
        blas = [p for p in _loaded_libraries("blas") if "gslcblas" not in p]
    if not blas or any(fast in path.lower() for path in blas for fast in _FAST_BLAS):
        return None
    return (f"numpy runs on the reference BLAS ({blas[0]}), which makes landseg several times slower: install "
            "OpenBLAS (Debian and Ubuntu: sudo apt install libopenblas0-pthread) and restart QGIS")


# -- numpy's own BLAS when another library shadows it ----------------------------------------------
#
# QGIS's executables (qgis, qgis_process) link GSL, and its libgslcblas then comes first in the
# process's symbol lookup: Debian's numpy, which calls cblas_sgemm by name, gets GSL's unoptimised
# CBLAS instead of the OpenBLAS it was installed with (measured in qgis_process: a 2000 x 2000
# sgemm 38x slower, the network 3.5x, and other rounding than numpy's own BLAS, so other cluster
# centres than the command line's). `matmul` then makes the calls numpy's matmul makes (gemm, or
# syrk for a matrix times its own transpose, with numpy's choice of transposes and strides) to
# numpy's own BLAS, bound by handle. Elsewhere it is np.matmul itself.

_ROW_MAJOR, _NO_TRANS, _TRANS, _UPPER = 101, 111, 112, 121


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _shadowing_library() -> str | None:
    """The library `cblas_sgemm` resolves to in the process's global scope when that is GSL's
    CBLAS (which Debian's numpy then calls), else None."""
    try:
        scope = ctypes.CDLL(None)
        address = ctypes.cast(scope.cblas_sgemm, ctypes.c_void_p).value
        info = _DlInfo()
        if not scope.dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
            return None
    except (AttributeError, OSError, ValueError):  # no such symbol in the global scope, or no dladdr
        return None
    path = info.dli_fname.decode(errors="replace") if info.dli_fname else ""
    return path if "gslcblas" in path else None


class RoutedBlas:
    """cblas_?gemm and cblas_?syrk of one library, called as numpy's matmul calls them."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        p, i, f, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_double
        self.gemm = {np_type: getattr(lib, name) for np_type, name in (("f", "cblas_sgemm"), ("d", "cblas_dgemm"))}
        self.syrk = {np_type: getattr(lib, name) for np_type, name in (("f", "cblas_ssyrk"), ("d", "cblas_dsyrk"))}
        for kind, scalar in (("f", f), ("d", d)):
            self.gemm[kind].argtypes = [i, i, i, i, i, i, scalar, p, i, p, i, scalar, p, i]
            self.gemm[kind].restype = None
            self.syrk[kind].argtypes = [i, i, i, i, i, scalar, p, i, scalar, p, i]
            self.syrk[kind].restype = None

    def matmul(self, a, b, out=None):
        import numpy as np

        kind = a.dtype.char
        if a.dtype != b.dtype or kind not in "fd" or b.ndim != 2 or a.ndim not in (2, 3) or a.shape[-1] != b.shape[0]:
            return np.matmul(a, b, out=out)
        if out is None:
            out = np.empty(a.shape[:-1] + (b.shape[1],), dtype=a.dtype)
        elif out.dtype != a.dtype or out.shape != a.shape[:-1] + (b.shape[1],):
            return np.matmul(a, b, out=out)
        if a.ndim == 2:
            self._matmul2d(a, b, out, kind)
        elif a.shape[0]:
            call = self._gemm_call(a[0], b, out[0], kind)
            if call is None or call[0] is self.syrk[kind]:  # numpy's special cases, slice by slice
                for a2, o2 in zip(a, out):
                    self._matmul2d(a2, b, o2, kind)
            else:  # one gemm per slice, as numpy's outer loop makes them, planned once
                gemm, args, (ia, ib, io) = call
                pa, po, sa, so = a.ctypes.data, out.ctypes.data, a.strides[0], out.strides[0]
                args[ib] = b.ctypes.data
                for i in range(a.shape[0]):
                    args[ia], args[io] = pa + i * sa, po + i * so
                    gemm(*args)
        return out

    def _matmul2d(self, a, b, out, kind) -> None:
        import numpy as np

        call = self._gemm_call(a, b, out, kind)
        if call is None:
            np.matmul(a, b, out=out)
            return
        gemm, args, (ia, ib, io) = call
        args[ia], args[ib], args[io] = a.ctypes.data, b.ctypes.data, out.ctypes.data
        gemm(*args)
        if gemm is self.syrk[kind]:  # numpy fills the lower triangle from the upper one
            lower = np.tril_indices(out.shape[0], -1)
            out[lower] = out.T[lower]

    def _gemm_call(self, a, b, out, kind):
        """(function, argument list, positions of the a / b / out pointers in it) of the BLAS call
        numpy's matmul makes for these 2-D operands' shapes and strides; None where numpy makes
        none (a dimension of 1: its gemv / dot special cases; operands BLAS cannot take: its loop)."""
        (m, n), p, sz = a.shape, b.shape[1], a.itemsize
        s1m, s1n = a.strides
        s2n, s2p = b.strides
        som, sop = out.strides
        i1 = _blasable(s1m, s1n, n, sz) or _blasable(s1n, s1m, m, sz)
        i2 = _blasable(s2n, s2p, p, sz) or _blasable(s2p, s2n, n, sz)
        if min(m, n, p) <= 1 or not (i1 and i2):
            return None
        if _blasable(som, sop, p, sz):
            return self._matrixmatrix(a, s1m, s1n, b, s2n, s2p, som, m, n, p, kind, swapped=False)
        if _blasable(sop, som, m, sz):  # numpy: matmul(a, b, o) == matmul(b.T, a.T, o.T)
            return self._matrixmatrix(b, s2p, s2n, a, s1n, s1m, sop, p, n, m, kind, swapped=True)
        return None

    def _matrixmatrix(self, a, s1m, s1n, b, s2n, s2p, som, m, n, p, kind, swapped: bool):
        sz = a.itemsize
        ldc = som // sz
        if _blasable(s1m, s1n, n, sz):
            trans1, lda = _NO_TRANS, s1m // sz
        else:
            trans1, lda = _TRANS, s1n // sz
        if _blasable(s2n, s2p, p, sz):
            trans2, ldb = _NO_TRANS, s2n // sz
        else:
            trans2, ldb = _TRANS, s2p // sz
        if a.ctypes.data == b.ctypes.data and m == p and s1m == s2p and s1n == s2n and trans1 != trans2:
            args = [_ROW_MAJOR, _UPPER, trans1, p, n, 1.0, None, lda if trans1 == _NO_TRANS else ldb, 0.0, None, ldc]
            return self.syrk[kind], args, (6, 6, 9)
        args = [_ROW_MAJOR, trans1, trans2, m, p, n, 1.0, None, lda, None, ldb, 0.0, None, ldc]
        a_at, b_at = (9, 7) if swapped else (7, 9)  # numpy hands BLAS (b.T, a.T) when it swaps
        return self.gemm[kind], args, (a_at, b_at, 12)


def _blasable(stride1: int, stride2: int, d2: int, itemsize: int) -> bool:
    """numpy's test of a 2-D operand BLAS can take: unit stride along the second axis, and a first
    stride of at least its length."""
    return stride2 == itemsize and stride1 % itemsize == 0 and d2 <= stride1 // itemsize <= 2**31 - 2


_routed: list = []  # [RoutedBlas or None], decided once


def routed_blas() -> RoutedBlas | None:
    """numpy's own BLAS bound by handle when GSL's CBLAS shadows it in this process, else None."""
    if not _routed:
        chosen = None
        # LANDSEG_NO_BLAS_ROUTING=1 leaves numpy's calls as they are (benchmarks/qgis_bench.py measures both)
        if _shadowing_library() is not None and os.environ.get("LANDSEG_NO_BLAS_ROUTING") != "1":
            candidates = [p for p in _loaded_libraries("blas") if "gslcblas" not in p]
            candidates.sort(key=lambda p: "openblas" not in p)  # numpy's OpenBLAS before a plain libblas
            for path in candidates:
                try:
                    chosen = RoutedBlas(ctypes.CDLL(path), path)
                    break
                except (OSError, AttributeError):
                    continue
        _routed.append(chosen)
    return _routed[0]


def matmul(a, b, out=None):
    """np.matmul(a, b, out=out), made with numpy's own BLAS where another library shadows it."""
    import numpy as np

    routed = routed_blas()
    return np.matmul(a, b, out=out) if routed is None else routed.matmul(a, b, out)


_instance: BlasThreads | None = None


def blas_threads() -> BlasThreads:
    """The process-wide BLAS thread controller (created on first use, after numpy is loaded)."""
    global _instance
    if _instance is None:
        import numpy  # noqa: F401  (the BLAS must be loaded before it can be found)

        _instance = BlasThreads()
    return _instance


# -- sgemm with the arguments numpy's matmul does not expose ----------------------------------------
#
# A stride-1 convolution is a sum of k * k products of shifted views of its padded input (see
# runtime.network): with BLAS's leading-dimension and accumulate (beta) arguments, each is one sgemm
# straight on the input's memory, adding into the output, with no copies and no separate sums.

_SGEMM_SYMBOLS = (  # (symbol, 64-bit integers): numpy's bundled scipy-openblas (ILP64), then OpenBLAS
    ("scipy_cblas_sgemm64_", True),
    ("cblas_sgemm64_", True),
    ("cblas_sgemm", False),
)


class DirectSgemm:
    """C (m, n) = A (m, k) @ B (k, n) + beta * C, row-major float32, on raw pointers with leading
    dimensions in elements, made by numpy's own OpenBLAS (bound by handle, so a shadowing CBLAS in
    the process does not matter). ctypes releases the GIL for the call."""

    def __init__(self, fn, path: str, symbol: str):
        self.path, self.symbol = path, symbol
        self._fn = fn

    def __call__(self, m: int, n: int, k: int, a: int, lda: int, b: int, ldb: int, beta: float,
                 c: int, ldc: int) -> None:
        self._fn(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc)


_direct: list = []  # [DirectSgemm or None], decided once


def direct_sgemm() -> DirectSgemm | None:
    """numpy's OpenBLAS sgemm for direct calls, or None (another BLAS, or none found): callers then
    use np.matmul. LANDSEG_NO_DIRECT_SGEMM=1 forces None (tests compare both paths)."""
    if not _direct:
        import numpy as np

        np.dot(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))  # numpy loads its BLAS lazily
        chosen = None
        if os.environ.get("LANDSEG_NO_DIRECT_SGEMM") != "1":
            for path, lib in loaded_openblas():
                for symbol, wide in _SGEMM_SYMBOLS:
                    fn = getattr(lib, symbol, None)
                    if fn is None:
                        continue
                    i, n = ctypes.c_int, (ctypes.c_int64 if wide else ctypes.c_int)
                    p, f = ctypes.c_void_p, ctypes.c_float
                    fn.argtypes = [i, i, i, n, n, n, f, p, n, p, n, f, p, n]
                    fn.restype = None
                    chosen = DirectSgemm(fn, path, symbol)
                    break
                if chosen is not None:
                    break
        _direct.append(chosen)
    return _direct[0]
