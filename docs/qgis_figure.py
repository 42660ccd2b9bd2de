"""The README's QGIS picture: an orthophoto and its landseg cluster layer side by side, rendered by
real, headless QGIS (map settings rendered offscreen), from the plugin zip as a user installs it.

    make plugin    # dist/landseg-qgis-<version>.zip with model/best
    QT_QPA_PLATFORM=offscreen /usr/bin/python3 docs/qgis_figure.py [RASTER] [--k 6] [--out docs/images/qgis_segment.png]

RASTER defaults to the first synthetic scene of data/raw (after `make repro`). Runs in QGIS's own
Python (/usr/bin/python3 with python3-qgis), not the project's environment.
"""

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raster", nargs="?", default=str(REPO / "data" / "raw" / "images" / "scene-0000.tif"))
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--zip", default=None, help="plugin zip (default: the newest dist/landseg-qgis-*.zip)")
    p.add_argument("--out", default=str(REPO / "docs" / "images" / "qgis_segment.png"))
    p.add_argument("--size", type=int, default=480, help="pixels of each panel")
    args = p.parse_args(argv)
    zips = sorted((REPO / "dist").glob("landseg-qgis-*.zip"), key=os.path.getmtime)
    zip_path = Path(args.zip) if args.zip else (zips[-1] if zips else None)
    if zip_path is None or not zip_path.is_file():
        print("error: no plugin zip: run `make plugin` first (or pass --zip)", file=sys.stderr)
        return 2

    from qgis.core import QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsRasterLayer
    from qgis.PyQt.QtCore import QSize, Qt
    from qgis.PyQt.QtGui import QColor, QFont, QImage, QPainter

    app = QgsApplication([], False)
    app.initQgis()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        sys.path[:0] = [tmp, "/usr/share/qgis/python/plugins"]
        import processing
        from processing.core.Processing import Processing

        Processing.initialize()
        import landseg
        from landseg.algorithms import cluster_classes

        plugin = landseg.classFactory(None)
        plugin.initProcessing()
        clusters = Path(tmp) / "clusters.tif"
        processing.run("landseg:segment", {"INPUT": args.raster, "CLUSTERS": args.k, "OUTPUT": str(clusters)})
        ortho = QgsRasterLayer(args.raster, "orthophoto")
        labels = QgsRasterLayer(str(clusters), "clusters")
        from qgis.core import QgsPalettedRasterRenderer

        labels.setRenderer(QgsPalettedRasterRenderer(labels.dataProvider(), 1, cluster_classes(args.k)))
        panels = []
        for layer in (ortho, labels):
            settings = QgsMapSettings()
            settings.setLayers([layer])
            settings.setDestinationCrs(ortho.crs())
            settings.setExtent(ortho.extent())
            settings.setOutputSize(QSize(args.size, args.size))
            settings.setBackgroundColor(QColor(255, 255, 255))
            job = QgsMapRendererParallelJob(settings)
            job.start()
            job.waitForFinished()
            panels.append(job.renderedImage())
        gap, title = 12, 28
        figure = QImage(2 * args.size + gap, args.size + title, QImage.Format_ARGB32)
        figure.fill(QColor(255, 255, 255))
        painter = QPainter(figure)
        painter.setFont(QFont("DejaVu Sans", 11))
        for i, (image, text) in enumerate(zip(panels, ("orthophoto", f"landseg:segment, {args.k} clusters"))):
            x = i * (args.size + gap)
            painter.drawText(x, 0, args.size, title, Qt.AlignCenter, text)
            painter.drawImage(x, title, image)
        painter.end()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if not figure.save(args.out):
            print(f"error: cannot write {args.out}", file=sys.stderr)
            return 2
        del ortho, labels, panels
        plugin.unload()
    app.exitQgis()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
