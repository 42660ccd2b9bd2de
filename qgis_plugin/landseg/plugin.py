"""The plugin object QGIS loads: it registers the `landseg` Processing provider (toolbox, batch mode,
graphical modeler, qgis_process)."""

from qgis.core import QgsApplication


class LandsegPlugin:
    def __init__(self, iface=None):
        self.iface = iface
        self.provider = None  # kept referenced: QGIS crashes when the provider object is collected

    def initProcessing(self):  # noqa: N802 (QGIS's names)
        from .provider import LandsegProvider

        self.provider = LandsegProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802
        self.initProcessing()

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
