"""Bringing imagery that is not 8-bit (16-bit sensors, float reflectance) to the model's 0..255 input.

The model was trained on 8-bit RGB. Other data is mapped linearly, band by band, from a
(low, high) range of its own values to 0..255 and clipped, the way a GIS shows it on screen:
`percentile_limits` takes the range from the 2nd and 98th percentiles of a band's valid values
(QGIS's default "cumulative count cut"); `to_uint8` applies it. For a raster, `segment_raster`
computes the limits once from a decimated read of the whole raster, so every tile is mapped the
same way (tiled still equals untiled). Values are in the data's own units (digital numbers or
reflectance); the limits are (3, 2) arrays of (low, high) per band, in R, G, B order.
"""

from __future__ import annotations

import numpy as np

from .errors import ArtifactError, InputError

PERCENTILES = (2.0, 98.0)  # the stretch QGIS applies by default to multiband rasters
TRAINING_MODES = ("auto", "none", "percentile", "fixed")  # `ingest.rescale` of the training data
STATS_SIZE = 1024  # pixels: long side of the decimated read the percentiles of a raster come from


def percentile_limits(values: np.ndarray, valid: np.ndarray | None = None,
                      percentiles: tuple[float, float] = PERCENTILES, src="array") -> np.ndarray:
    """(3, 2) float64 (low, high) per band from the given percentiles of the valid, finite values.

    values: (H, W, 3) any numeric dtype. valid: (H, W) bool, True where a pixel counts (default all).
    A band whose low and high percentiles coincide (constant data) is an error: it has no range to
    stretch.
    """
    values = np.asarray(values)
    if values.ndim != 3 or values.shape[2] != 3:
        raise InputError(f"{src}: expected (H, W, 3) values, got shape {values.shape}")
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    mask = np.ones(values.shape[:2], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    limits = np.empty((3, 2), dtype=np.float64)
    for b in range(3):
        band = values[..., b][mask].astype(np.float64)
        band = band[np.isfinite(band)]
        if band.size == 0:
            raise InputError(f"{src}: band {b + 1} of the RGB selection has no valid (finite, non-nodata) "
                             "values to compute its stretch from")
        low, high = np.percentile(band, [lo_p, hi_p])
        if not high > low:
            raise InputError(f"{src}: band {b + 1} of the RGB selection is constant ({low:g}) between its "
                             f"{lo_p:g} % and {hi_p:g} % percentiles; give explicit limits instead")
        limits[b] = low, high
    return limits


def check_limits(limits, src="rescale") -> np.ndarray:
    """(3, 2) float64 from one (low, high) pair for all bands or three pairs (R, G, B), nested or
    flat (low_r, high_r, low_g, high_g, low_b, high_b)."""
    try:
        a = np.asarray(limits, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.empty(0)
    if a.shape == (2,):
        a = np.tile(a, (3, 1))
    elif a.shape == (6,):
        a = a.reshape(3, 2)
    if a.shape != (3, 2) or not np.isfinite(a).all() or not (a[:, 1] > a[:, 0]).all():
        raise InputError(f"{src}: expected (low, high) with low < high, or three such pairs for R, G, B; "
                         f"got {limits!r}")
    return a


def to_uint8(values: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: each band mapped linearly from its (low, high) in `limits` to 0..255,
    clipped and rounded. Non-finite values map to 0 (callers mask them as nodata)."""
    values = np.asarray(values)
    low = limits[:, 0].astype(np.float32)
    scale = (255.0 / (limits[:, 1] - limits[:, 0])).astype(np.float32)
    out = (values.astype(np.float32) - low) * scale
    np.nan_to_num(out, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def check_training_rescale(record, where: str) -> None:
    """Check the `input_rescale` record of a model (meta.json, written by `export` from
    `ingest.rescale`): {"mode": one of TRAINING_MODES, "limits": three [low, high] pairs for
    "fixed", else null}; raises ArtifactError naming `where` otherwise."""
    ok = isinstance(record, dict) and set(record) == {"mode", "limits"} and record["mode"] in TRAINING_MODES
    if ok and record["mode"] == "fixed":
        try:
            check_limits(record["limits"])
            return
        except InputError:
            ok = False
    if ok and record["limits"] is None:
        return
    raise ArtifactError(f"{where}: 'input_rescale' must be {{'mode': one of {list(TRAINING_MODES)}, 'limits': "
                        f"three [low, high] pairs with low < high for 'fixed', else null}}, got {record!r}")
