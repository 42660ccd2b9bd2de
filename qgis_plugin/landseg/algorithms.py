"""The landseg Processing algorithms: Segment raster, Fit shared centres, Segment to polygons and Model
information. Each is a thin shell around the vendored runtime (`landseg.runtime`, numpy and GDAL
only), so the toolbox, `qgis_process` and `python -m runtime` give the same result for the same
options."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qgis.core import (
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsPalettedRasterRenderer,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBand,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingUtils,
    QgsProviderRegistry,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

from .runtime.artifact import artifact_files
from .runtime.errors import Cancelled, LandsegError

PLUGIN_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL = PLUGIN_DIR / "model"
PIXEL_SIZE_MODES = ["auto: the model's training pixel size when the raster's differs by more than 1.25x",
                    "native: the raster's own pixels", "metres: the pixel size below"]
RESCALE_MODES = ["auto", "none", "percentile"]
_POST_PROCESSORS = []  # referenced until QGIS has run them (QGIS crashes on a collected one)
_BLAS_NOTED = []


def _model_path(alg, parameters, context) -> Path:
    given = alg.parameterAsFile(parameters, "MODEL", context)
    return Path(given) if given else BUNDLED_MODEL


def _load_model(path: Path, feedback):
    from .runtime import load_model
    from .runtime._blas import reference_blas_note

    if not _BLAS_NOTED:
        note = reference_blas_note()
        if note:
            feedback.pushWarning(note)
        _BLAS_NOTED.append(True)
    return load_model(path)


def _raster_path(layer, name: str) -> str:
    """The GDAL path of a raster layer (a file, a VRT, /vsicurl/...)."""
    if layer is None:
        raise QgsProcessingException(f"{name}: no raster layer given")
    if layer.providerType() != "gdal":
        raise QgsProcessingException(f"{layer.name()}: a {layer.providerType()} layer; landseg reads rasters "
                                     "that GDAL opens (GeoTIFF, VRT, JPEG, a COG over /vsicurl/...)")
    return QgsProviderRegistry.instance().decodeUri("gdal", layer.source()).get("path") or layer.source()


def _bands(alg, parameters, context):
    picked = [alg.parameterAsInt(parameters, name, context) if parameters.get(name) not in (None, "") else 0
              for name in ("RED_BAND", "GREEN_BAND", "BLUE_BAND")]
    if not any(picked):
        return None
    if not all(picked):
        raise QgsProcessingException("Red, green and blue bands: give all three, or none for a 3-band raster")
    return tuple(picked)


def _pixel_size(alg, parameters, context):
    mode = alg.parameterAsEnum(parameters, "PIXEL_SIZE_MODE", context)
    if mode == 2:
        metres = alg.parameterAsDouble(parameters, "PIXEL_SIZE", context)
        if not metres > 0:
            raise QgsProcessingException("Pixel size: give a positive number of metres for the 'metres' mode")
        return metres
    return ("auto", "native")[mode]


def _add_model_and_reading_parameters(alg, layer_parameter: str | None) -> None:
    alg.addParameter(QgsProcessingParameterFile(
        "MODEL", "Model folder (empty: the model bundled with the plugin)",
        behavior=QgsProcessingParameterFile.Folder, optional=True))
    alg.addParameter(QgsProcessingParameterNumber(
        "CLUSTERS", "Number of clusters (land-cover classes to find)", QgsProcessingParameterNumber.Integer,
        defaultValue=6, minValue=2, maxValue=16))
    for name, colour in (("RED_BAND", "Red"), ("GREEN_BAND", "Green"), ("BLUE_BAND", "Blue")):
        if layer_parameter:
            alg.addParameter(QgsProcessingParameterBand(name, f"{colour} band (empty: band {'RGB'.index(colour[0]) + 1} "
                                                        "of a 3-band raster)", parentLayerParameterName=layer_parameter,
                                                        optional=True))
        else:
            alg.addParameter(QgsProcessingParameterNumber(name, f"{colour} band number (empty: 3-band rasters)",
                                                          QgsProcessingParameterNumber.Integer, optional=True,
                                                          minValue=1))
    alg.addParameter(QgsProcessingParameterEnum("PIXEL_SIZE_MODE", "Ground pixel size the model sees",
                                                PIXEL_SIZE_MODES, defaultValue=0))
    alg.addParameter(QgsProcessingParameterNumber("PIXEL_SIZE", "Pixel size in metres (for the 'metres' mode)",
                                                  QgsProcessingParameterNumber.Double, optional=True, minValue=0.0))
    alg.addParameter(QgsProcessingParameterEnum("RESCALE", "How values become 8-bit (auto: as the model was "
                                                "trained; 16-bit and float stretched 2-98 %)", RESCALE_MODES,
                                                defaultValue=0))
    alg.addParameter(QgsProcessingParameterNumber("SEED", "Seed of the cluster fitting",
                                                  QgsProcessingParameterNumber.Integer, defaultValue=0, minValue=0))


class _Algorithm(QgsProcessingAlgorithm):
    def group(self):
        return "Segmentation"

    def groupId(self):  # noqa: N802 (QGIS's names)
        return "segmentation"

    def createInstance(self):  # noqa: N802
        return type(self)()

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        """Each algorithm's `_process`, with the runtime's errors (which name the file, key or value
        at fault) reported as the algorithm's failure, in one place."""
        try:
            return self._process(parameters, context, feedback)
        except Cancelled as e:
            raise QgsProcessingException(f"cancelled: {e}") from None
        except LandsegError as e:
            raise QgsProcessingException(str(e)) from None


class SegmentRaster(_Algorithm):
    def name(self):
        return "segment"

    def displayName(self):  # noqa: N802
        return "Segment raster"

    def shortHelpString(self):  # noqa: N802
        return ("Segments an RGB orthophoto (aerial or drone imagery; any raster GDAL opens, of any size) into "
                "land-cover clusters, without labels. The output is a single-band 8-bit GeoTIFF on the input's "
                "grid (same CRS, extent and pixel size): each pixel holds a cluster id 0..K-1, 255 where the input "
                "is nodata. Clusters are not named classes: name them by looking at the map.\n\n"
                "Number of clusters: how many covers to look for (6 is a good start; fewer give broader classes).\n"
                "Bands: which bands are red, green and blue, for rasters with more than 3 bands (NAIP RGBN: 1, 2, 3).\n"
                "Centres: empty fits the clusters on this raster; a .npy file from 'Fit shared centres' (or from "
                "this algorithm's centres output) gives several rasters the same cluster ids, so that a mosaic "
                "has one legend.\n"
                "Ground pixel size: 'auto' resamples the raster to the model's training resolution when they "
                "differ (labels are written back on the raster's own grid).\n"
                "Smoothing passes: more give smoother, blockier maps; -1 uses the model's setting.\n\n"
                "The raster is processed tile by tile: memory stays small and the result equals segmenting it in "
                "one piece. Cancelling stops within one tile and leaves no output file.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Input RGB raster"))
        _add_model_and_reading_parameters(self, "INPUT")
        self.addParameter(QgsProcessingParameterFile("CENTRES", "Cluster centres file (.npy; empty: fit on this raster)",
                                                     extension="npy", optional=True))
        self.addParameter(QgsProcessingParameterNumber("SMOOTHING", "Smoothing passes (-1: the model's default)",
                                                       QgsProcessingParameterNumber.Integer, defaultValue=-1,
                                                       minValue=-1, maxValue=64))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT", "Clusters"))
        self.addParameter(QgsProcessingParameterFileDestination(
            "OUTPUT_CENTRES", "Save the cluster centres (to reuse on other rasters)", "NumPy array (*.npy)",
            optional=True, createByDefault=False))

    def _process(self, parameters, context, feedback):
        from .runtime import segment_raster
        from .runtime.cli import load_centres, save_centres

        src = _raster_path(self.parameterAsRasterLayer(parameters, "INPUT", context), "Input RGB raster")
        model_dir = _model_path(self, parameters, context)
        model = _load_model(model_dir, feedback)
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        centres_out = self.parameterAsFileOutput(parameters, "OUTPUT_CENTRES", context)
        centres_file = self.parameterAsFile(parameters, "CENTRES", context)
        smoothing = self.parameterAsInt(parameters, "SMOOTHING", context)
        centres = load_centres(Path(centres_file)) if centres_file else "fit"
        result = segment_raster(
            src, out, self.parameterAsInt(parameters, "CLUSTERS", context), model,
            bands=_bands(self, parameters, context), centres=centres,
            seed=self.parameterAsInt(parameters, "SEED", context),
            smooth_iters=None if smoothing < 0 else smoothing, pixel_size=_pixel_size(self, parameters, context),
            rescale=RESCALE_MODES[self.parameterAsEnum(parameters, "RESCALE", context)], overwrite=True,
            progress=lambda done, total: feedback.setProgress(100.0 * done / total),
            cancel=feedback.isCanceled)
        if centres_out:
            save_centres(Path(centres_out), result.centres, overwrite=True, inputs=[src, *artifact_files(model_dir)])
        feedback.pushInfo(f"{result.k} clusters, {result.tiles} tile(s), {result.seconds:.1f} s; centres "
                          f"{result.centres_source}; {result.resolution}; {result.rescale}")
        total = int(result.cluster_pixels.sum())
        if total:
            feedback.pushInfo("clusters (% of valid pixels): " + ", ".join(
                f"{i}: {100 * n / total:.1f}" for i, n in enumerate(result.cluster_pixels)))
        if context.willLoadLayerOnCompletion(out):
            styler = ClusterStyle(result.k, [int(n) for n in result.cluster_pixels])
            _POST_PROCESSORS.append(styler)
            context.layerToLoadOnCompletionDetails(out).setPostProcessor(styler)
        return {"OUTPUT": out, "OUTPUT_CENTRES": centres_out or None}


def cluster_classes(k: int, pixels=None):
    """One paletted-renderer class per cluster id, in the output file's colours."""
    from .runtime.raster import PALETTE

    total = sum(pixels) if pixels else 0
    classes = []
    for i in range(k):
        share = f" ({100 * pixels[i] / total:.1f} %)" if total else ""
        classes.append(QgsPalettedRasterRenderer.Class(i, QColor(*PALETTE[i % len(PALETTE)]), f"cluster {i}{share}"))
    return classes


class ClusterStyle(QgsProcessingLayerPostProcessorInterface):
    """Gives a loaded cluster raster a paletted renderer: one colour and one legend entry per cluster."""

    def __init__(self, k: int, pixels):
        super().__init__()
        self.k, self.pixels = k, pixels

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        if layer is not None and layer.isValid():
            layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, cluster_classes(self.k, self.pixels)))
            layer.triggerRepaint()


class FitSharedCentres(_Algorithm):
    def name(self):
        return "fitcentres"

    def displayName(self):  # noqa: N802
        return "Fit shared centres"

    def shortHelpString(self):  # noqa: N802
        return ("Fits one set of cluster centres over several RGB rasters (the tiles of a mosaic, several flights) "
                "and saves it as a .npy file. Segmenting each raster with that file gives all of them the same "
                "cluster ids: one legend for the whole area. Each raster contributes in proportion to its valid "
                "area. Give 'Segment raster' the same bands, pixel size and value options.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers("LAYERS", "Input RGB rasters",
                                                               QgsProcessing.TypeRaster))
        _add_model_and_reading_parameters(self, None)
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "Cluster centres", "NumPy array (*.npy)"))

    def _process(self, parameters, context, feedback):
        from .runtime import fit_shared_centres
        from .runtime.cli import save_centres

        layers = self.parameterAsLayerList(parameters, "LAYERS", context)
        if not layers:
            raise QgsProcessingException("Input RGB rasters: give at least one raster")
        paths = [_raster_path(layer, "Input RGB rasters") for layer in layers]
        model_dir = _model_path(self, parameters, context)
        model = _load_model(model_dir, feedback)
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        shared = fit_shared_centres(paths, self.parameterAsInt(parameters, "CLUSTERS", context), model,
                                    bands=_bands(self, parameters, context),
                                    seed=self.parameterAsInt(parameters, "SEED", context),
                                    pixel_size=_pixel_size(self, parameters, context),
                                    rescale=RESCALE_MODES[self.parameterAsEnum(parameters, "RESCALE", context)])
        save_centres(Path(out), shared.centres, overwrite=True, inputs=[*paths, *artifact_files(model_dir)])
        for src, cells, note in zip(shared.sources, shared.cells, shared.notes):
            feedback.pushInfo(f"{src}: {cells:,} cells; {note}")
        return {"OUTPUT": out}


class SegmentToPolygons(_Algorithm):
    def name(self):
        return "polygons"

    def displayName(self):  # noqa: N802
        return "Segment to polygons"

    def shortHelpString(self):  # noqa: N802
        return ("Turns a cluster raster (the output of 'Segment raster') into polygons: patches smaller than the "
                "minimum mapping unit are first merged into their largest neighbour (GDAL's sieve filter), then "
                "each connected patch of one cluster becomes a polygon with its cluster id and its area in map "
                "units (square metres for a metric CRS). Nodata pixels (255) give no polygon.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Cluster raster"))
        self.addParameter(QgsProcessingParameterNumber(
            "MIN_AREA", "Minimum mapping unit (area in map units, e.g. square metres)",
            QgsProcessingParameterNumber.Double, defaultValue=0.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterEnum("CONNECTIVITY", "Pixels touching by", ["edges (4)", "edges and corners (8)"],
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterFeatureSink("OUTPUT", "Cluster polygons", QgsProcessing.TypeVectorPolygon))
        self.addParameter(QgsProcessingParameterRasterDestination("SIEVED", "Sieved cluster raster", optional=True,
                                                                  createByDefault=False))

    def _process(self, parameters, context, feedback):
        from osgeo import gdal, ogr

        from .runtime.destination import atomic_file

        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        src = _raster_path(layer, "Cluster raster")
        connectivity = (4, 8)[self.parameterAsEnum(parameters, "CONNECTIVITY", context)]
        ds = gdal.Open(src)
        if ds is None or ds.RasterCount != 1:
            raise QgsProcessingException(f"{src}: expected a single-band cluster raster")
        gt = ds.GetGeoTransform()
        pixel_area = abs(gt[1] * gt[5] - gt[2] * gt[4])
        threshold = math.ceil(self.parameterAsDouble(parameters, "MIN_AREA", context) / pixel_area - 1e-9)
        sieved_out = self.parameterAsOutputLayer(parameters, "SIEVED", context)
        target = Path(sieved_out or QgsProcessingUtils.generateTempFilename("sieved.tif"))

        def progress(start: float, end: float):
            def callback(fraction, message, data):
                feedback.setProgress(start + (end - start) * fraction)
                return 0 if feedback.isCanceled() else 1
            return callback

        fields = QgsFields()
        fields.append(QgsField("cluster", QVariant.Int))
        fields.append(QgsField("area", QVariant.Double))
        scratch = QgsProcessingUtils.generateTempFilename("polygons.gpkg")
        try:
            with atomic_file(target, overwrite=True, inputs=[src], what="sieved raster") as tmp:
                sieved = gdal.GetDriverByName("GTiff").CreateCopy(str(tmp), ds, options=["TILED=YES", "COMPRESS=DEFLATE"])
                band = sieved.GetRasterBand(1)
                if threshold > 1:  # patches under the unit merge into their largest neighbour
                    gdal.SieveFilter(band, band.GetMaskBand(), band, threshold, connectivity,
                                     callback=progress(0.0, 50.0))
                # on disk, not in memory: a large raster's polygons can outgrow RAM before the sink copies them
                polygons = ogr.GetDriverByName("GPKG").CreateDataSource(scratch)
                out = polygons.CreateLayer("polygons", srs=sieved.GetSpatialRef(), geom_type=ogr.wkbPolygon)
                out.CreateField(ogr.FieldDefn("cluster", ogr.OFTInteger))
                if not feedback.isCanceled():
                    gdal.Polygonize(band, band.GetMaskBand(), out, 0, ["8CONNECTED=8"] if connectivity == 8 else [],
                                    callback=progress(50.0, 90.0))
                if feedback.isCanceled():
                    raise QgsProcessingException("cancelled: no polygons written")
                sink, dest = self.parameterAsSink(parameters, "OUTPUT", context, fields, QgsWkbTypes.Polygon,
                                                  layer.crs())
                for feature in out:
                    geometry = QgsGeometry()
                    geometry.fromWkb(bytes(feature.GetGeometryRef().ExportToWkb()))
                    f = QgsFeature(fields)
                    f.setGeometry(geometry)
                    f.setAttributes([feature.GetField(0), geometry.area()])
                    sink.addFeature(f, QgsFeatureSink.FastInsert)
                sieved = band = out = polygons = None  # closed before the rename
        finally:
            gdal.Unlink(scratch)
        if not sieved_out:
            target.unlink(missing_ok=True)
        return {"OUTPUT": dest, "SIEVED": sieved_out or None}


class ModelInformation(_Algorithm):
    def name(self):
        return "info"

    def displayName(self):  # noqa: N802
        return "Model information"

    def group(self):
        return "Model"

    def groupId(self):  # noqa: N802
        return "model"

    def shortHelpString(self):  # noqa: N802
        return ("What a landseg model folder holds: the ground pixel size it was trained at (rasters are resampled "
                "to it by default), the largest number of clusters it supports, where it comes from (commit, "
                "training parameters) and its validation scores. Empty folder: the model bundled with the plugin.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model folder (empty: the bundled model)",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addOutput(QgsProcessingOutputNumber("TRAINING_PIXEL_SIZE", "Training pixel size (m)"))
        self.addOutput(QgsProcessingOutputNumber("MAX_K", "Largest number of clusters"))
        self.addOutput(QgsProcessingOutputString("MODEL_COMMIT", "Commit the model was trained at"))
        self.addOutput(QgsProcessingOutputString("DETAILS", "meta.json and metrics.json (JSON)"))

    def _process(self, parameters, context, feedback):
        from .runtime import load_artifact

        path = _model_path(self, parameters, context)
        art = load_artifact(path)
        meta = {k: v for k, v in art.meta.items() if k != "layers"}
        gsd = meta.get("training_pixel_size_m")
        feedback.pushInfo(f"{path}: trained at {'an unknown' if gsd is None else f'{gsd:g} m'} pixel size, "
                          f"up to {meta['max_k']} clusters, commit {meta['provenance']['git_commit']}")
        details = json.dumps({"meta": meta, "metrics": art.metrics}, indent=2)
        feedback.pushInfo(details)
        return {"TRAINING_PIXEL_SIZE": gsd, "MAX_K": meta["max_k"],
                "MODEL_COMMIT": meta["provenance"]["git_commit"], "DETAILS": details}
