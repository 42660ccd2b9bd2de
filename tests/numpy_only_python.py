"""Run `python -m runtime ...` the way QGIS's Python would: importing rasterio, torch, scipy, affine,
tqdm, threadpoolctl or the pipeline's stages raises ImportError, so the runtime must take GDAL's own
bindings (`osgeo.gdal`) for raster I/O and numpy for the rest.

    /usr/bin/python3 tests/numpy_only_python.py segment in.tif out.tif --k 6
"""

import sys
from pathlib import Path

BLOCKED = ("rasterio", "torch", "scipy", "stages", "affine", "tqdm", "threadpoolctl")


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not importable in this process (a numpy-only Python)")


sys.meta_path.insert(0, _Blocked())
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from runtime.cli import main

    sys.exit(main(sys.argv[1:]))
