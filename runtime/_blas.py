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
        for path in _loaded_openblas_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
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


def _loaded_openblas_paths() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    paths = {line.split()[-1] for line in lines if "openblas" in line.lower() and "/" in line}
    return sorted(paths)


_instance: BlasThreads | None = None


def blas_threads() -> BlasThreads:
    """The process-wide BLAS thread controller (created on first use, after numpy is loaded)."""
    global _instance
    if _instance is None:
        import numpy  # noqa: F401  (the BLAS must be loaded before it can be found)

        _instance = BlasThreads()
    return _instance
