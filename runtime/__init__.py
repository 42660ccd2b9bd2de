"""landseg runtime: numpy-only inference for the exported segmenter (runs inside QGIS's Python).

    import runtime
    model = runtime.load_model("model/best")
    labels = model.predict_labels(rgb_uint8_hw3, k=6)            # one image, centres fitted on it
    runtime.segment_raster("in.tif", "out.tif", k=6, model=model)  # any size, seamless, tiled
    shared = runtime.fit_shared_centres(["a.tif", "b.tif"], k=6, model=model)  # one clustering of both
    runtime.segment_raster("a.tif", "a6.tif", k=6, model=model, centres=shared.centres)

Importing this package needs numpy only; the raster I/O (rasterio, or GDAL's own bindings as in QGIS:
`runtime.raster_io`) is imported when a raster is read.
"""

from .artifact import Artifact, build_meta, load_artifact, write_artifact
from .errors import (ArtifactError, Cancelled, InputError, LandsegError, OutputError, OutputExistsError,
                     RasterReadError, UnsafePathError)
from .model import Model, load_model
from .raster import fit_shared_centres, segment_raster
from .rescale import percentile_limits, to_uint8

__all__ = ["Artifact", "ArtifactError", "Cancelled", "InputError", "LandsegError", "Model", "OutputError",
           "OutputExistsError", "RasterReadError", "UnsafePathError", "build_meta", "fit_shared_centres",
           "load_artifact", "load_model", "percentile_limits", "segment_raster", "to_uint8", "write_artifact"]
