"""The raster I/O backend on GDAL's own Python bindings (`osgeo.gdal`, which QGIS ships): the same
interface as `runtime.io_rasterio` (see `runtime.raster_io`), for a Python without rasterio.

GDAL's error state is process-wide and shared with the host (QGIS): this module never calls
`gdal.UseExceptions()`; it silences GDAL's printed errors around each call, checks the result and
raises RasterReadError with GDAL's own message. The block cache is set for a run and restored after.
"""

from __future__ import annotations

import contextlib

import numpy as np
from osgeo import gdal, osr

from .errors import InputError, RasterReadError

NAME = "gdal"
_DTYPES = {"Byte": "uint8", "Int8": "int8", "UInt16": "uint16", "Int16": "int16", "UInt32": "uint32",
           "Int32": "int32", "UInt64": "uint64", "Int64": "int64", "Float32": "float32", "Float64": "float64",
           "CInt16": "complex_int16", "CInt32": "complex_int32", "CFloat32": "complex64", "CFloat64": "complex128"}
_RESAMPLING = {"nearest": "near", "bilinear": "bilinear", "average": "average"}


class Transform(tuple):
    """Affine pixel -> CRS transform (a, b, c, d, e, f): x = a col + b row + c, y = d col + e row + f."""

    a = property(lambda t: t[0])
    b = property(lambda t: t[1])
    c = property(lambda t: t[2])
    d = property(lambda t: t[3])
    e = property(lambda t: t[4])
    f = property(lambda t: t[5])
    is_identity = property(lambda t: tuple(t) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))

    @classmethod
    def from_gdal(cls, gt) -> Transform:
        return cls((float(gt[1]), float(gt[2]), float(gt[0]), float(gt[4]), float(gt[5]), float(gt[3])))

    def to_gdal(self) -> tuple:
        return (self.c, self.a, self.b, self.f, self.d, self.e)


@contextlib.contextmanager
def _gdal(what: str):
    """Run GDAL calls quietly; RasterReadError naming `what` with GDAL's message on a failure."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    gdal.ErrorReset()
    try:
        yield
    except RuntimeError as e:  # a host that called gdal.UseExceptions()
        raise RasterReadError(f"{what}: {e}") from None
    finally:
        gdal.PopErrorHandler()
    if gdal.GetLastErrorType() >= gdal.CE_Failure:
        raise RasterReadError(f"{what}: {gdal.GetLastErrorMsg() or 'GDAL error'}")


def _checked(result, what: str):
    if result is None:
        raise RasterReadError(f"{what}: {gdal.GetLastErrorMsg() or 'GDAL returned nothing'}")
    return result


def env(cache_mb: int):
    """A bounded GDAL block cache (MB) for the run, the host's restored after."""
    @contextlib.contextmanager
    def scope():
        before = gdal.GetCacheMax()
        gdal.SetCacheMax(cache_mb * 1024 * 1024)
        try:
            yield
        finally:
            gdal.SetCacheMax(before)
    return scope()


class Source:
    """An open raster (or a warped view of one): size, bands, georeferencing, windowed reads.
    Windows are (row0, col0, height, width) in pixels; `transform` maps pixel (col, row) corners to
    CRS units; `crs` is the CRS as WKT, None without one."""

    def __init__(self, ds, path: str, owned: list):
        self.ds, self.path, self._owned = ds, path, owned
        self.width, self.height, self.count = ds.RasterXSize, ds.RasterYSize, ds.RasterCount
        bands = [ds.GetRasterBand(i) for i in range(1, self.count + 1)]
        self.dtypes = [_DTYPES.get(gdal.GetDataTypeName(b.DataType), gdal.GetDataTypeName(b.DataType))
                       for b in bands]
        self.crs = ds.GetProjectionRef() or None
        gt = ds.GetGeoTransform(can_return_null=True)
        self.transform = Transform.from_gdal(gt) if gt is not None else Transform((1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
        self.georeferenced = self.crs is not None or not self.transform.is_identity
        self.nodata = bands[0].GetNoDataValue() if bands else None
        self.has_alpha = any(b.GetMaskFlags() & gdal.GMF_ALPHA for b in bands)

    def read(self, bands, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        what = f"{self.path}: GDAL failed to read window rows {row0}..{row0 + height}, cols {col0}..{col0 + width}"
        alpha = self._alpha_band(bands)
        with _gdal(what):
            data = _checked(self.ds.ReadAsArray(col0, row0, width, height,
                                                band_list=list(bands) + ([alpha] if alpha else [])), what)
        data = data if data.ndim == 3 else data[None]
        if alpha:  # the alpha band comes with the values in one read: a warped view warps once
            self._alpha = ((tuple(bands), row0, col0, height, width), data[-1])
            data = data[:-1]
        return data

    def _alpha_band(self, bands) -> int | None:
        """The alpha band that masks every one of `bands` (a warped view's added alpha, an RGBA
        raster's), read along with them; None for other masks."""
        if not hasattr(self, "_alpha_index"):
            flags = [self.ds.GetRasterBand(b).GetMaskFlags() for b in range(1, self.count + 1)]
            last = self.count
            self._alpha_index = (last if last > 1 and all(f & gdal.GMF_ALPHA and f & gdal.GMF_PER_DATASET
                                                           for f in flags[:-1])
                                 and self.ds.GetRasterBand(last).GetColorInterpretation() == gdal.GCI_AlphaBand
                                 # a wider alpha's mask is rescaled to 0..255: read as a mask then
                                 and self.ds.GetRasterBand(last).DataType == gdal.GDT_Byte
                                 else None)
            self._alpha = None
        return self._alpha_index if self._alpha_index not in bands else None

    def read_masks(self, bands, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        what = f"{self.path}: GDAL failed to read the mask of rows {row0}..{row0 + height}, cols {col0}..{col0 + width}"
        cached = getattr(self, "_alpha", None)
        if cached is not None and cached[0] == (tuple(bands), row0, col0, height, width):
            return np.repeat(cached[1][None], len(bands), axis=0)
        with _gdal(what):
            if self._shared_mask(bands):  # one mask for every band (alpha, dataset mask): read it once
                mask = _checked(self.ds.GetRasterBand(bands[0]).GetMaskBand().ReadAsArray(col0, row0, width, height),
                                what)
                return np.repeat(mask[None], len(bands), axis=0)
            return np.stack([_checked(self.ds.GetRasterBand(b).GetMaskBand().ReadAsArray(col0, row0, width, height),
                                      what) for b in bands])

    def all_valid(self, bands) -> bool:
        """Whether GDAL reports every pixel of these bands valid (no nodata value, alpha or mask
        band): their masks are then all 255 and need not be read."""
        return all(self.ds.GetRasterBand(b).GetMaskFlags() == gdal.GMF_ALL_VALID for b in bands)

    def _shared_mask(self, bands) -> bool:
        return all(self.ds.GetRasterBand(b).GetMaskFlags() & gdal.GMF_PER_DATASET for b in bands)

    def read_decimated(self, bands, out_height: int, out_width: int, window=None) -> tuple[np.ndarray, np.ndarray]:
        col0, row0, width, height = window if window is not None else (0, 0, self.width, self.height)
        what = f"{self.path}: GDAL failed to read the raster for its value statistics"
        kw = {"buf_xsize": out_width, "buf_ysize": out_height, "resample_alg": gdal.GRIORA_NearestNeighbour}
        with _gdal(what):
            data = _checked(self.ds.ReadAsArray(int(col0), int(row0), int(width), int(height),
                                                band_list=list(bands), **kw), what)
            masks = np.stack([_checked(self.ds.GetRasterBand(b).GetMaskBand().ReadAsArray(
                int(col0), int(row0), int(width), int(height), **kw), what) for b in bands])
        return (data if data.ndim == 3 else data[None]), masks

    def warped(self, transform, width: int, height: int, resampling: str, *, add_alpha: bool = False,
               src_nodata=None, nodata=None) -> Source:
        """A GDAL warped VRT of this raster on another grid of the same CRS."""
        src, own, target = self.ds, [], Transform(tuple(transform)[:6])
        if self.crs is None and _flipped(self.transform) and _flipped(target):
            # a raster without georeferencing is on its pixel grid (rows going down, as rasterio lays
            # it): give it and the target a north-up frame with the same pixel layout to warp in
            t = self.transform
            src = gdal.Translate("", self.ds, format="VRT",
                                 outputBounds=[t.c, -t.f, t.c + t.a * self.width, -(t.f + t.e * self.height)])
            own.append(src)
            target = Transform((target.a, 0.0, target.c, 0.0, -target.e, -target.f))
        elif not _north_up(self.transform) or not _north_up(target):
            raise InputError(f"{self.path}: resampling a rotated or south-up raster needs rasterio (pip install "
                             "rasterio); run it at its own pixels instead (pixel_size='native')")
        t = target
        options = {"format": "VRT", "width": width, "height": height, "resampleAlg": _RESAMPLING[resampling],
                   "outputBounds": [t.c, t.f + t.e * height, t.c + t.a * width, t.f], "dstAlpha": add_alpha,
                   "multithread": False}
        if src_nodata is not None:
            options.update(srcNodata=src_nodata, dstNodata=nodata)
        what = f"{self.path}: GDAL cannot build the resampled view"
        with _gdal(what):
            vrt = _checked(gdal.Warp("", src, **options), what)
        view = Source(vrt, self.path, [vrt, *own])
        view.transform = Transform(tuple(transform)[:6])  # the caller's frame, flipped back
        view.crs = self.crs
        view.georeferenced = self.georeferenced
        return view

    def close(self) -> None:
        self._owned.clear()  # GDAL closes a dataset when its last reference goes
        self.ds = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _north_up(t) -> bool:
    return t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0


def _flipped(t) -> bool:
    return t.b == 0 and t.d == 0 and t.a > 0 and t.e > 0


def open_source(path) -> Source:
    what = f"{path}: GDAL cannot read this raster"
    with _gdal(what):
        ds = _checked(gdal.Open(str(path), gdal.GA_ReadOnly), what)
    return Source(ds, str(path), [ds])


def wgs84_points(crs, xs, ys):
    """(lon, lat) lists of the points (xs, ys) in `crs` (WKT); None when GDAL cannot relate it to WGS 84."""
    with contextlib.suppress(RasterReadError), _gdal("CRS"):
        src, dst = osr.SpatialReference(), osr.SpatialReference()
        if src.ImportFromWkt(str(crs)) != 0 or dst.ImportFromEPSG(4326) != 0:
            return None
        for s in (src, dst):
            s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        ct = osr.CoordinateTransformation(src, dst)
        if ct is None:
            return None
        points = ct.TransformPoints([(float(x), float(y)) for x, y in zip(xs, ys)])
        return [p[0] for p in points], [p[1] for p in points]
    return None


class LabelWriter:
    """A new single-band uint8 GeoTIFF of cluster ids: tiled `block` x `block`, DEFLATE, BIGTIFF when
    needed, nodata `nodata`, written window by window."""

    def __init__(self, path, width: int, height: int, crs, transform, *, block: int, nodata: int):
        self.path = str(path)
        what = f"{path}: GDAL cannot create the output"
        options = ["TILED=YES", f"BLOCKXSIZE={block}", f"BLOCKYSIZE={block}", "COMPRESS=DEFLATE", "ZLEVEL=1",
                   "PREDICTOR=2", "BIGTIFF=IF_SAFER"]
        with _gdal(what):
            self.ds = _checked(gdal.GetDriverByName("GTiff").Create(self.path, width, height, 1, gdal.GDT_Byte,
                                                                    options=options), what)
            t = Transform(tuple(transform)[:6])
            if crs is not None or not t.is_identity:
                self.ds.SetGeoTransform(t.to_gdal())
            if crs is not None:
                self.ds.SetProjection(crs)
            self.band = self.ds.GetRasterBand(1)
            self.band.SetNoDataValue(nodata)

    def write(self, labels: np.ndarray, row0: int, col0: int) -> None:
        what = f"{self.path}: GDAL failed to write rows {row0}..{row0 + labels.shape[0]}"
        with _gdal(what):
            if self.band.WriteArray(labels, int(col0), int(row0)) != 0:
                raise RasterReadError(f"{what}: {gdal.GetLastErrorMsg()}")

    def close(self) -> None:
        if self.ds is not None:
            with _gdal(f"{self.path}: GDAL failed to finish the output"):
                self.ds.FlushCache()
            self.band = self.ds = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def finish_labels(path, colormap: dict, description: str, tags: dict, overview_factors: list[int]) -> None:
    """Colour table, band description, tags and (nearest) internal overviews of a written label file."""
    what = f"{path}: GDAL failed to finish the output"
    with _gdal(what):
        ds = _checked(gdal.Open(str(path), gdal.GA_Update), what)
        band = ds.GetRasterBand(1)
        table = gdal.ColorTable()
        for value, rgba in sorted(colormap.items()):
            table.SetColorEntry(int(value), tuple(int(v) for v in rgba))
        band.SetRasterColorTable(table)
        band.SetRasterColorInterpretation(gdal.GCI_PaletteIndex)
        band.SetDescription(description)
        for key, value in tags.items():
            ds.SetMetadataItem(str(key), str(value))
        if overview_factors:
            if ds.BuildOverviews("NEAREST", list(overview_factors)) != 0:
                raise RasterReadError(f"{what}: {gdal.GetLastErrorMsg()}")
            ds.SetMetadataItem("resampling", "nearest", "rio_overview")
        ds.FlushCache()
        band = ds = None


@contextlib.contextmanager
def errors_as_read_errors(what: str):
    """The GDAL backend raises RasterReadError itself; nothing to translate."""
    yield


def read_tags(path) -> dict:
    """The GeoTIFF metadata items (default domain) of a raster; RasterReadError when GDAL cannot open it."""
    with open_source(path) as src:
        return dict(src.ds.GetMetadata() or {})


def crs_wkt(source: Source) -> str | None:
    """A source's CRS as WKT, None without one."""
    return source.crs


def window_transform(transform: Transform, row0: int, col0: int) -> Transform:
    """The transform of the window whose top-left pixel is (row0, col0) of `transform`'s grid."""
    a, b, c, d, e, f = transform
    return Transform((a, b, c + a * col0 + b * row0, d, e, f + d * col0 + e * row0))
