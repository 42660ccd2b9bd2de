"""Raster I/O for `runtime.raster`: one interface, two backends.

- `runtime.io_rasterio` on rasterio (the project's environment),
- `runtime.io_gdal` on GDAL's own bindings, `osgeo.gdal`, which QGIS's Python ships (rasterio is
  not there).

Both give the same pixels, masks, warped views and output files, so `segment_raster` and
`fit_shared_centres` give the same labels whichever runs (tests/test_raster_backends.py). A backend
module provides:

    NAME                              "rasterio" or "gdal"
    env(cache_mb)                     context manager: a bounded GDAL block cache for the run
    open_source(path) -> Source       RasterReadError when GDAL cannot open it
    Source: path, width, height, count, dtypes (numpy names; complex ones contain "complex"),
        crs (None without one), transform (.a .b .c .d .e .f, .is_identity: x = a col + b row + c,
        y = d col + e row + f, pixel corners), georeferenced, nodata (band 1), has_alpha;
        read(bands, row0, col0, height, width) -> (n, h, w) in the raster's dtype;
        read_masks(...) -> (n, h, w) uint8, 0 = masked (nodata value, alpha or mask band);
        all_valid(bands) -> bool: GDAL reports every pixel of those bands valid (masks need no read);
        read_decimated(bands, out_h, out_w, window=(col0, row0, w, h) | None) -> (values, masks), nearest;
        warped(transform, width, height, resampling, add_alpha=, src_nodata=, nodata=) -> Source:
            a GDAL warped VRT on another grid of the same CRS ("nearest", "bilinear", "average");
        close(), and use as a context manager
    wgs84_points(crs, xs, ys) -> (lons, lats) or None
    LabelWriter(path, width, height, crs, transform, block=, nodata=): write(labels, row0, col0), close()
    finish_labels(path, colormap, description, tags, overview_factors)
    read_tags(path) -> dict           the metadata items of a raster (default domain)
    crs_wkt(source) -> str | None     a Source's CRS as WKT
    window_transform(transform, row0, col0)  the transform of a window starting at that pixel
    errors_as_read_errors(what): context manager turning the backend's GDAL errors into RasterReadError

`backend()` picks rasterio when it is importable, else GDAL's bindings; LANDSEG_RASTER_BACKEND
(`rasterio` or `gdal`) forces one, an execution setting that changes no result.
"""

from __future__ import annotations

import importlib
import os

from .errors import InputError

BACKENDS = {"rasterio": ".io_rasterio", "gdal": ".io_gdal"}  # relative: the QGIS plugin vendors this package
ENV_VAR = "LANDSEG_RASTER_BACKEND"


def backend(name: str | None = None):
    """The raster I/O backend module: `name`, else $LANDSEG_RASTER_BACKEND, else rasterio when it is
    importable, else GDAL's Python bindings."""
    name = name or os.environ.get(ENV_VAR) or None
    if name is not None:
        if name not in BACKENDS:
            raise InputError(f"raster backend must be one of {sorted(BACKENDS)}, got {name!r} ({ENV_VAR})")
        try:
            return importlib.import_module(BACKENDS[name], __package__)
        except ImportError as e:
            raise InputError(f"raster backend {name!r} is not importable here ({e}); "
                             f"{_how_to_get(name)}") from None
    for candidate in ("rasterio", "gdal"):
        try:
            return importlib.import_module(BACKENDS[candidate], __package__)
        except ImportError:
            continue
    raise InputError("reading rasters needs rasterio or GDAL's Python bindings (osgeo.gdal), and neither is "
                     f"importable: {_how_to_get('rasterio')}; or {_how_to_get('gdal')}")


def _how_to_get(name: str) -> str:
    if name == "rasterio":
        return "install rasterio (pip install rasterio)"
    return ("use a Python that has GDAL's bindings (QGIS's own Python has them; on Debian and Ubuntu: "
            "apt install python3-gdal)")
