"""A hand-made texture cue appended to the learned embedding before clustering (numpy only).

The dark top-hat of lightness: grey closing over a `size` x `size` square minus the image, which
is large on dark structures narrower than `size` pixels (the gaps between bright roofs, narrow
roads) and 0 on flat areas and on dark areas wider than the square. It is averaged over each
stride-4 cell, multiplied by a scale stored in the artifact, appended to the cell's unit
embedding as one more channel, and the result renormalised, so the runtime's spherical
clustering works on it unchanged (docs/experiments.md, the top-hat rows of 2026-11-26).

Conventions: lightness is the mean of R, G and B over 255; borders are handled by mirroring
(`d c b a | a b c d`, scipy.ndimage's default 'reflect'), so a tile cut at the raster's edge and
the whole raster see the same border. The cue of a cell reads `size - 1` pixels around it, well
inside the halo that the network's receptive field already gives each tile.
"""

from __future__ import annotations

import numpy as np

STRIDE = 4


def valid_size(size) -> bool:
    """Whether `size` is a usable square side: an odd integer >= 3 (the window is centred)."""
    return not isinstance(size, bool) and isinstance(size, (int, np.integer)) and size >= 3 and size % 2 == 1


def _running_extreme_rows(x: np.ndarray, size: int, fn) -> np.ndarray:
    """max or min over a centred window of `size` rows, mirrored borders."""
    r, n = size // 2, x.shape[0]
    xp = np.pad(x, ((r, size - 1 - r), (0, 0)), mode="symmetric")
    out = xp[:n].copy()
    for s in range(1, size):
        fn(out, xp[s:s + n], out=out)
    return out


def _square_extreme(x: np.ndarray, size: int, fn) -> np.ndarray:
    """max or min over a centred size x size square (separable: rows, then columns)."""
    return _running_extreme_rows(_running_extreme_rows(x, size, fn).T, size, fn).T


def grey_closing(x: np.ndarray, size: int) -> np.ndarray:
    """Grey closing (dilation, then erosion) over a size x size square; mirrored borders."""
    return _square_extreme(_square_extreme(x, size, np.maximum), size, np.minimum)


def dark_tophat_cells(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (ceil(H/4), ceil(W/4)): the dark top-hat averaged per cell
    (cells cut by the image edge average the pixels they have)."""
    if not valid_size(size):
        raise ValueError(f"top-hat size must be an odd integer >= 3, got {size!r}")
    light = rgb.astype(np.float32).mean(axis=2) / np.float32(255.0)
    th = grey_closing(light, int(size)) - light
    h, w = th.shape
    hc, wc = -(-h // STRIDE), -(-w // STRIDE)
    pad = ((0, hc * STRIDE - h), (0, wc * STRIDE - w))
    sums = np.pad(th, pad).reshape(hc, STRIDE, wc, STRIDE).sum(axis=(1, 3), dtype=np.float64)
    counts = np.pad(np.ones_like(th), pad).reshape(hc, STRIDE, wc, STRIDE).sum(axis=(1, 3))
    return (sums / counts).astype(np.float32)


def append_cue(cells: np.ndarray, cue: np.ndarray, scale: float) -> np.ndarray:
    """(h, w, D) unit embeddings + (h, w) cue -> (h, w, D + 1) unit rows."""
    f = np.concatenate([cells, (np.float32(scale) * cue)[:, :, None]], axis=2)
    return (f / np.linalg.norm(f, axis=2, keepdims=True)).astype(np.float32)
