"""Checks of the landseg QGIS plugin inside real, headless QGIS, run by tests/test_qgis_plugin.py:

    QT_QPA_PLATFORM=offscreen XDG_DATA_HOME=<tmp> /usr/bin/python3 tests/qgis_checks.py PLUGINS_DIR WORK OUT.json

PLUGINS_DIR holds the unzipped plugin (`landseg/`); WORK the inputs the test wrote. Each check's
findings go into OUT.json; the pytest side compares them with the command line's results.
"""

import json
import sys
from pathlib import Path

from qgis.core import (
    QgsApplication,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

plugins_dir, work, out_json = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
app = QgsApplication([], False)
app.initQgis()
sys.path.insert(0, "/usr/share/qgis/python/plugins")
sys.path.insert(0, str(plugins_dir))

import processing  # noqa: E402
from processing.core.Processing import Processing  # noqa: E402

Processing.initialize()
import landseg  # noqa: E402

plugin = landseg.classFactory(None)  # kept referenced until exitQgis
plugin.initProcessing()
found = {"algorithms": sorted(a.id() for a in QgsApplication.processingRegistry().providerById("landseg").algorithms())}


def run(alg, params, feedback=None):
    try:
        return processing.run(alg, params, feedback=feedback or QgsProcessingFeedback()), None
    except QgsProcessingException as e:
        return None, str(e)


def leftovers():
    return sorted(p.name for p in work.iterdir() if p.name.startswith("."))


# 1. the toolbox's result equals the command line's
_, err = run("landseg:segment", {"INPUT": str(work / "in.tif"), "CLUSTERS": 4, "OUTPUT": str(work / "qgis.tif")})
found["segment_error"] = err

# 2. run as the toolbox runs it: the layer loads, valid, in the input's CRS and extent, paletted
results = processing.runAndLoadResults("landseg:segment", {"INPUT": str(work / "in.tif"), "CLUSTERS": 4,
                                                           "OUTPUT": str(work / "loaded.tif")})
layer = QgsProject.instance().mapLayer(results["OUTPUT"]) if results.get("OUTPUT") in QgsProject.instance().mapLayers() \
    else next(iter(QgsProject.instance().mapLayers().values()), None)
source = QgsRasterLayer(str(work / "in.tif"), "in")
renderer = layer.renderer() if layer is not None else None
found["loaded"] = {
    "valid": bool(layer is not None and layer.isValid()),
    "crs_equal": bool(layer is not None and layer.crs() == source.crs()),
    "extent_equal": bool(layer is not None and layer.extent() == source.extent()),
    "renderer": renderer.type() if renderer else None,
    "classes": [(c.value, c.label) for c in renderer.classes()] if renderer and renderer.type() == "paletted" else [],
    "legend": [text for text, _ in renderer.legendSymbologyItems()] if renderer else [],
}
del source, layer, renderer
QgsProject.instance().removeAllMapLayers()


# 3. cancel mid-raster: no output, no temporaries
class CancelHalfway(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.progressChanged.connect(lambda p: self.cancel() if p >= 30 else None)


_, err = run("landseg:segment", {"INPUT": str(work / "big.tif"), "CLUSTERS": 4, "OUTPUT": str(work / "cancelled.tif"),
                                 "SMOOTHING": 1}, CancelHalfway())
found["cancel"] = {"error": err, "output_exists": (work / "cancelled.tif").exists(), "leftovers": leftovers()}

# 4. bad input: the runtime's message, no output
bad = {}
for name, params in {
    "one_band": {"INPUT": str(work / "gray.tif"), "CLUSTERS": 4},
    "k_out_of_range": {"INPUT": str(work / "in.tif"), "CLUSTERS": 12},
    "corrupt_model": {"INPUT": str(work / "in.tif"), "CLUSTERS": 4, "MODEL": str(work / "corrupt_model")},
}.items():
    _, err = run("landseg:segment", {**params, "OUTPUT": str(work / f"bad_{name}.tif")})
    bad[name] = {"error": err, "output_exists": (work / f"bad_{name}.tif").exists()}
found["bad"] = bad
found["leftovers"] = leftovers()

# 5. polygons: the sieved raster's area per cluster is the polygons' area per cluster
res, err = run("landseg:polygons", {"INPUT": str(work / "qgis.tif"), "MIN_AREA": 20.0, "CONNECTIVITY": 0,
                                    "SIEVED": str(work / "sieved.tif"), "OUTPUT": str(work / "polygons.gpkg")})
polys = {"error": err, "area": {}, "features": 0}
if res:
    vl = QgsVectorLayer(res["OUTPUT"], "polygons", "ogr")
    for f in vl.getFeatures():
        polys["area"][str(f["cluster"])] = polys["area"].get(str(f["cluster"]), 0.0) + f.geometry().area()
        assert abs(f["area"] - f.geometry().area()) < 1e-6
        polys["features"] += 1
    polys["crs_equal"] = vl.crs() == QgsRasterLayer(str(work / "qgis.tif"), "q").crs()
    del vl
found["polygons"] = polys

# 6. shared centres and model information
_, err = run("landseg:fitcentres", {"LAYERS": [str(work / "in.tif"), str(work / "in2.tif")], "CLUSTERS": 4,
                                    "OUTPUT": str(work / "shared_qgis.npy")})
found["fitcentres_error"] = err
res, err = run("landseg:info", {})
found["info"] = {"error": err, "max_k": res and res["MAX_K"], "pixel_size": res and res["TRAINING_PIXEL_SIZE"]}

out_json.write_text(json.dumps(found, indent=2))
QgsProject.instance().removeAllMapLayers()
plugin.unload()
app.exitQgis()
