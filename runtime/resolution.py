"""Ground sample distance: where the network runs, and numpy resampling for arrays.

The features are tied to the ground sample distance (GSD) the model was trained at (on Dubai at half
resolution the model lost 0.06 mIoU and resampling back recovered it). `plan_resolution` decides the
working GSD for a raster (`segment_raster`, which resamples through a GDAL warped VRT) or an array
(`Model.predict_labels(..., pixel_size_m=...)`, which resamples with `resample_image` here).

Units and conventions: sizes in metres; `scale` is working pixel size / source pixel size (> 1
coarser, < 1 finer). Grids share their origin (the top-left corner): working pixel (i, j) covers
source pixels [i * scale, (i + 1) * scale) along each axis, as GDAL's warped VRT of `segment_raster`
lays it out, and has max(1, ceil(n / scale)) pixels along an axis of n. Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

RESAMPLE_TOLERANCE = 1.25  # pixel_size="auto" leaves data within this factor of the training GSD as it is
# pixel_size="auto" refines a coarser raster at most this many times along each axis (16x the pixels):
# beyond it the network would see mostly interpolation, at a cost that grows with the factor squared
MAX_AUTO_UPSAMPLE = 4.0


@dataclass
class ResolutionPlan:
    """Where the network runs: at the raster's own grid (`scale` 1) or on a resampled grid whose
    pixels are `scale` times the raster's (> 1 coarser, < 1 finer). Sizes in metres, None = unknown."""

    raster_m: float | None
    working_m: float | None
    scale: float
    note: str


def plan_resolution(raster_m: float | None, model, pixel_size, src) -> ResolutionPlan:
    """Decide the working ground sample distance for `segment_raster`.

    pixel_size: "auto" resamples to the model's training pixel size when the raster's and the
    model's are both known and differ by more than RESAMPLE_TOLERANCE (the features are tied to the
    training scale: on Dubai at half resolution the model lost 0.06 mIoU and resampling back
    recovered it); "native" never resamples; a number is the working pixel size in metres.
    raster_m: the raster's `ground_pixel_size_m` (None = unknown); model: anything with a
    `training_pixel_size_m` (a `Model`); src: names the raster or array in messages.
    """
    train_m = model.training_pixel_size_m
    trained = "unknown" if train_m is None else f"{train_m:.3g} m"
    if isinstance(pixel_size, str) and pixel_size == "native":
        return ResolutionPlan(raster_m, raster_m, 1.0, "at the raster's own resolution (pixel_size='native')")
    if isinstance(pixel_size, str) and pixel_size == "auto":
        if train_m is None:
            return ResolutionPlan(raster_m, raster_m, 1.0, "at the raster's own resolution: the model does not "
                                  "record its training pixel size")
        if raster_m is None:
            return ResolutionPlan(None, None, 1.0, f"at the raster's own resolution: its ground pixel size is "
                                  f"unknown (no CRS, or one GDAL cannot relate to WGS 84); the model was trained at "
                                  f"{trained}: declare the raster's size (raster_pixel_size_m) or resample it")
        if 1 / RESAMPLE_TOLERANCE <= raster_m / train_m <= RESAMPLE_TOLERANCE:
            return ResolutionPlan(raster_m, raster_m, 1.0, f"at the raster's own {raster_m:.3g} m (model "
                                  f"trained at {trained})")
        if train_m * MAX_AUTO_UPSAMPLE < raster_m:
            factor = raster_m / train_m
            raise InputError(f"{src}: its {raster_m:.3g} m pixels are {factor:.1f}x coarser than the model's "
                             f"training {trained}; resampling to it would make {factor * factor:.0f}x the pixels "
                             f"(pixel_size='auto' refines at most {MAX_AUTO_UPSAMPLE:g}x per axis). Run at the "
                             "raster's own pixels (pixel_size='native' / --pixel-size native) or choose a pixel "
                             "size in metres; a model trained on imagery of this resolution will serve it better")
        target = float(train_m)
    elif (target := positive_metres(pixel_size)) is not None:
        if raster_m is None:
            raise InputError(f"{src}: pixel_size={target:g} m needs a raster with a CRS that GDAL can relate "
                             f"to WGS 84 (its ground pixel size is unknown); georeference it, declare its "
                             f"size (raster_pixel_size_m) or use pixel_size='native'")
    else:
        raise InputError(f"pixel_size must be 'auto', 'native' or a positive number of metres, got {pixel_size!r}")
    scale = target / raster_m
    # a factor within a millionth of n or 1/n is taken as exactly that, so the working grid nests in
    # the raster's (rounding in the pixel sizes must not shift it by a sliver of a pixel)
    for exact in (float(round(scale)), 1.0 / max(1, round(1.0 / scale))):
        if exact > 0 and abs(scale / exact - 1.0) < 1e-6:
            scale = exact
    if scale == 1.0:
        return ResolutionPlan(raster_m, raster_m, 1.0, f"at the raster's own {raster_m:.3g} m (model trained "
                              f"at {trained})")
    return ResolutionPlan(raster_m, target, scale, f"resampled from {raster_m:.3g} m to {target:.3g} m "
                          f"({1 / scale ** 2:.3g}x the pixels; model trained at {trained}); labels written "
                          "back on the raster's grid")


def positive_metres(value) -> float | None:
    """`value` as float when it is a finite positive number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _axis_taps(n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (n_out, taps) and weights (n_out, taps) of one axis of n pixels resampled by
    `scale`: area average when coarser (each source pixel weighted by the length of it the working
    pixel covers, the part beyond the edge left out), bilinear between the two nearest pixel centres
    when finer (half-pixel centres, clamped at the edges)."""
    n_out = max(1, math.ceil(n / scale - 1e-9))
    o = np.arange(n_out, dtype=np.float64)
    if scale > 1:
        lo, hi = o * scale, np.minimum((o + 1) * scale, n)
        idx = np.floor(lo).astype(np.int64)[:, None] + np.arange(math.ceil(scale) + 1)
        w = np.clip(np.minimum(idx + 1, hi[:, None]) - np.maximum(idx, lo[:, None]), 0.0, None)
        w /= w.sum(axis=1, keepdims=True)
    else:
        x = (o + 0.5) * scale - 0.5
        i0 = np.floor(x)
        idx = i0.astype(np.int64)[:, None] + np.arange(2)
        w = np.stack([1.0 - (x - i0), x - i0], axis=1)
    return np.clip(idx, 0, n - 1), w


def resample_image(rgb: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (ceil(H / scale), ceil(W / scale), C) on the working grid."""
    if not scale > 0:
        raise InputError(f"scale must be positive, got {scale!r}")
    out = rgb.astype(np.float32)
    for axis in (0, 1):
        idx, w = _axis_taps(out.shape[axis], scale)
        shape = [1, 1, 1]
        shape[axis] = -1
        acc = np.zeros_like(np.take(out, idx[:, 0], axis=axis))
        for t in range(idx.shape[1]):  # a few taps: memory of one output image, not taps x image
            acc += np.take(out, idx[:, t], axis=axis) * w[:, t].astype(np.float32).reshape(shape)
        out = acc
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_source_grid(values: np.ndarray, scale: float, height: int, width: int) -> np.ndarray:
    """(..., h, w) values on the working grid -> (..., height, width) on the source grid, nearest:
    each source pixel takes the working pixel its centre falls in."""
    rows = np.minimum(((np.arange(height) + 0.5) / scale).astype(np.int64), values.shape[-2] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) / scale).astype(np.int64), values.shape[-1] - 1)
    return values[..., rows[:, None], cols[None, :]]
