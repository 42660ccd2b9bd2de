"""The raster I/O backend on rasterio (the project's environment). See `runtime.raster_io` for the
interface both backends implement; this module is imported only when rasterio is the backend."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from .errors import RasterReadError, error_text

NAME = "rasterio"
_RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear, "average": Resampling.average}


@contextlib.contextmanager
def env(cache_mb: int):
    """GDAL settings for the run: a bounded block cache (MB); rasterio's NotGeoreferencedWarning
    silenced (`SegmentResult.georeferenced` says it once)."""
    with rasterio.Env(GDAL_CACHEMAX=cache_mb * 1024 * 1024), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


class Source:
    """An open raster (or a warped view of one): size, bands, georeferencing, windowed reads.
    Windows are (row0, col0, height, width) in pixels; `transform` maps pixel (col, row) corners to
    CRS units (x = a col + b row + c, y = d col + e row + f); `crs` is None without one."""

    def __init__(self, ds, path: str, owned: list | None = None):
        self.ds, self.path, self._owned = ds, path, owned or [ds]
        self.width, self.height, self.count = ds.width, ds.height, ds.count
        self.dtypes = list(ds.dtypes)
        self.crs, self.transform, self.nodata = ds.crs, ds.transform, ds.nodata
        self.georeferenced = ds.crs is not None or not ds.transform.is_identity
        self.has_alpha = any(MaskFlags.alpha in flags for flags in ds.mask_flag_enums)

    def read(self, bands, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        try:
            return self.ds.read(list(bands), window=Window(col0, row0, width, height))
        except (RasterioError, OSError) as e:
            raise RasterReadError(f"{self.path}: GDAL failed to read window rows {row0}..{row0 + height}, "
                                  f"cols {col0}..{col0 + width}: {error_text(e)}") from None

    def all_valid(self, bands) -> bool:
        """Whether GDAL reports every pixel of these bands valid (no nodata value, alpha or mask
        band): their masks are then all 255 and need not be read."""
        return all(self.ds.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands)

    def read_masks(self, bands, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        try:
            return self.ds.read_masks(list(bands), window=Window(col0, row0, width, height))
        except (RasterioError, OSError) as e:
            raise RasterReadError(f"{self.path}: GDAL failed to read the mask of rows {row0}..{row0 + height}, "
                                  f"cols {col0}..{col0 + width}: {error_text(e)}") from None

    def read_decimated(self, bands, out_height: int, out_width: int, window=None) -> tuple[np.ndarray, np.ndarray]:
        """Values and masks of `window` ((col0, row0, width, height), default the whole raster) read
        at out_height x out_width pixels (nearest)."""
        win = None if window is None else Window(*window)
        shape = (len(bands), out_height, out_width)
        try:
            data = self.ds.read(list(bands), window=win, out_shape=shape, resampling=Resampling.nearest)
            masks = self.ds.read_masks(list(bands), window=win, out_shape=shape, resampling=Resampling.nearest)
        except (RasterioError, OSError) as e:
            raise RasterReadError(f"{self.path}: GDAL failed to read the raster for its value statistics: "
                                  f"{error_text(e)}") from None
        return data, masks

    def warped(self, transform, width: int, height: int, resampling: str, *, add_alpha: bool = False,
               src_nodata=None, nodata=None) -> Source:
        """A GDAL warped VRT of this raster on another grid of the same CRS."""
        kw = {"add_alpha": True} if add_alpha else {}
        if src_nodata is not None:
            kw.update(src_nodata=src_nodata, nodata=nodata)
        vrt = WarpedVRT(self.ds, crs=self.ds.crs, transform=Affine(*tuple(transform)[:6]), width=width,
                        height=height, resampling=_RESAMPLING[resampling], **kw)
        return Source(vrt, self.path, [vrt])

    def close(self) -> None:
        for ds in self._owned:
            ds.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_source(path) -> Source:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return Source(rasterio.open(path), str(path))
    except (RasterioError, OSError) as e:
        raise RasterReadError(f"{path}: GDAL cannot read this raster: {error_text(e)}") from None


def from_dataset(ds) -> Source:
    """A `Source` over a rasterio dataset the caller opened (and closes)."""
    return Source(ds, ds.name, owned=[])


def wgs84_points(crs, xs, ys):
    """(lon, lat) lists of the points (xs, ys) in `crs`; None when GDAL cannot relate it to WGS 84."""
    from rasterio.warp import transform as reproject_points

    try:
        return reproject_points(crs, "EPSG:4326", xs, ys)
    except Exception:  # CRSError / ValueError: no transformation to WGS 84 (e.g. a local CRS)
        return None


class LabelWriter:
    """A new single-band uint8 GeoTIFF of cluster ids: tiled BLOCK x BLOCK, DEFLATE, BIGTIFF when
    needed, nodata `nodata`, written window by window."""

    def __init__(self, path, width: int, height: int, crs, transform, *, block: int, nodata: int):
        profile = {"driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8",
                   "crs": crs, "transform": Affine(*tuple(transform)[:6]), "nodata": nodata, "tiled": True,
                   "blockxsize": block, "blockysize": block, "compress": "deflate", "zlevel": 1, "predictor": 2,
                   "BIGTIFF": "IF_SAFER"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self.out = rasterio.open(path, "w", **profile)

    def write(self, labels: np.ndarray, row0: int, col0: int) -> None:
        self.out.write(labels[None], window=Window(col0, row0, labels.shape[1], labels.shape[0]))

    def close(self) -> None:
        self.out.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def finish_labels(path, colormap: dict, description: str, tags: dict, overview_factors: list[int]) -> None:
    """Colour table, band description, tags and (nearest) internal overviews of a written label file."""
    with rasterio.open(path, "r+") as out:
        out.write_colormap(1, colormap)
        out.set_band_description(1, description)
        out.update_tags(**tags)
        if overview_factors:
            out.build_overviews(overview_factors, Resampling.nearest)
            out.update_tags(ns="rio_overview", resampling="nearest")


@contextlib.contextmanager
def errors_as_read_errors(what: str):
    """RasterReadError for a GDAL error inside the block, naming `what`."""
    try:
        yield
    except RasterioError as e:
        raise RasterReadError(f"GDAL error while {what}: {error_text(e)}") from None


def read_tags(path) -> dict:
    """The GeoTIFF metadata items (default domain) of a raster; RasterReadError when GDAL cannot open it."""
    with open_source(path) as src:
        return dict(src.ds.tags())


def crs_wkt(source: Source) -> str | None:
    """A source's CRS as WKT, None without one."""
    return source.crs.to_wkt() if source.crs is not None else None


def window_transform(transform, row0: int, col0: int):
    """The transform of the window whose top-left pixel is (row0, col0) of `transform`'s grid."""
    return Affine(*tuple(transform)[:6]) * Affine.translation(col0, row0)
