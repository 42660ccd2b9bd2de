"""landseg for QGIS: unsupervised land-cover segmentation of RGB orthophotos from the Processing
toolbox, with numpy and GDAL only (what QGIS ships). The runtime and a model are vendored inside
this package (`landseg.runtime`, `landseg/model/`) by `make plugin`."""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin import LandsegPlugin

    return LandsegPlugin(iface)
