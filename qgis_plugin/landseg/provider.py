"""The `landseg` Processing provider: its algorithms appear in the Processing toolbox and in
`qgis_process list`."""

from pathlib import Path

from qgis.core import QgsProcessingProvider

from .algorithms import FitSharedCentres, ModelInformation, SegmentRaster, SegmentToPolygons


class LandsegProvider(QgsProcessingProvider):
    def id(self):
        return "landseg"

    def name(self):
        return "landseg"

    def longName(self):  # noqa: N802 (QGIS's names)
        return "landseg: unsupervised land-cover segmentation"

    def icon(self):
        return QgsProcessingProvider.icon(self)

    def loadAlgorithms(self):  # noqa: N802
        for algorithm in (SegmentRaster(), FitSharedCentres(), SegmentToPolygons(), ModelInformation()):
            self.addAlgorithm(algorithm)

    def supportedOutputRasterLayerExtensions(self):  # noqa: N802
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self):  # noqa: N802
        return ["gpkg"]

    @staticmethod
    def plugin_dir() -> Path:
        return Path(__file__).resolve().parent
