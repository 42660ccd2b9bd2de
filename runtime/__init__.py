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

import importlib

# What `import runtime` offers, by the module that defines it. Loaded on first use (PEP 562), so that
# importing one module of the package (runtime.command, runtime.destination: every pipeline stage
# does) does not import the rest: a stage's imports are what it uses (tests/test_dvc_deps.py).
EXPORTS = {
    "Artifact": "artifact", "build_meta": "artifact", "load_artifact": "artifact", "write_artifact": "artifact",
    "ArtifactError": "errors", "Cancelled": "errors", "InputError": "errors", "LandsegError": "errors",
    "OutputError": "errors", "OutputExistsError": "errors", "RasterReadError": "errors",
    "UnsafePathError": "errors",
    "Model": "model", "load_model": "model",
    "fit_shared_centres": "sampling", "segment_raster": "raster",
    "percentile_limits": "rescale", "to_uint8": "rescale",
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(EXPORTS))
