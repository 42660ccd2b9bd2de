"""landseg runtime: numpy-only inference for the exported segmenter (runs inside QGIS's Python).

Importing this package needs numpy only; rasterio is imported lazily by `segment_raster`.
"""

from .artifact import Artifact, build_meta, load_artifact, write_artifact
from .errors import ArtifactError, Cancelled, InputError, LandsegError, OutputExistsError, RasterReadError

__all__ = ["Artifact", "ArtifactError", "Cancelled", "InputError", "LandsegError", "OutputExistsError",
           "RasterReadError", "build_meta", "load_artifact", "write_artifact"]
