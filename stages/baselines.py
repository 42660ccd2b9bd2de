"""What a GIS user can already do for free: k-means on pixel features, scored beside the model.

Two baselines, both clustering per-pixel feature vectors with the runtime's k-means (Euclidean,
k-means++ seeded init), under the same two protocols as the model (see `stages/metrics.py`):
- `kmeans_rgb`: raw RGB digital numbers (0..255), the plugin's free path;
- `kmeans_features`: hand-crafted colour + texture features: CIE Lab colour (D65, sRGB input)
  blurred by a Gaussian of sigma 5 px, plus the local standard deviation of Lab lightness L over a
  9 x 9 px window. Features are left in their natural units (L 0..100, a/b about -128..127, std in
  L units), unscaled. On the Dubai set (k = 5, global protocol, 256 px tiles) this scores about
  0.41 mIoU; z-scoring the features scored lower there (about 0.32).

All windows are in pixels; borders reflect (scipy.ndimage's default), so a tile's features do
not depend on zero padding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import gaussian_filter, uniform_filter

from runtime.cluster import assign, kmeans

LAB_BLUR_SIGMA_PX = 5.0
TEXTURE_WINDOW_PX = 9

# sRGB (linear) -> CIE XYZ, D65 white point.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]], dtype=np.float32)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB array, got {rgb.dtype} {rgb.shape}")


def lab_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB (H, W, 3) -> float32 CIE Lab (H, W, 3), D65."""
    _check_rgb(rgb)
    c = rgb.astype(np.float32) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE_D65
    delta = 6.0 / 29.0
    f = np.where(xyz > delta ** 3, np.cbrt(xyz), xyz / (3 * delta ** 2) + 4.0 / 29.0)
    lab = np.stack([116.0 * f[..., 1] - 16.0,
                    500.0 * (f[..., 0] - f[..., 1]),
                    200.0 * (f[..., 1] - f[..., 2])], axis=-1)
    return lab.astype(np.float32)


def rgb_features(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H*W, 3) float32 raw digital numbers."""
    _check_rgb(rgb)
    return rgb.reshape(-1, 3).astype(np.float32)


def handcrafted_features(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H*W, 4) float32: blurred L, a, b and local std of L."""
    lab = lab_from_rgb(rgb)
    blurred = [gaussian_filter(lab[..., i], LAB_BLUR_SIGMA_PX) for i in range(3)]
    lightness = lab[..., 0].astype(np.float64)  # float64: E[L^2] - E[L]^2 cancels badly in float32
    mean = uniform_filter(lightness, TEXTURE_WINDOW_PX)
    mean_sq = uniform_filter(lightness * lightness, TEXTURE_WINDOW_PX)
    std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0)).astype(np.float32)
    return np.stack(blurred + [std], axis=-1).reshape(-1, 4)


class KMeansBaseline:
    """k-means on per-pixel features, behind the interface `stages.evaluate` scores every method by.

    `features(rgb)` -> (H*W, F) rows; `fit(samples, k, seed)` -> (k, F) centres: the runtime's
    k-means (`iters` Lloyd iterations) from `restarts` seeded k-means++ starts (seed, seed + 1, ...),
    keeping the lowest inertia (sum of squared distances), as scikit-learn's n_init does: one start
    alone swings Dubai's mIoU by several points. `labels(feats, shape, centres)` -> uint8 (H, W)
    nearest centre. Which rows the centres are fitted on (one tile's or all tiles') is the
    caller's protocol.
    """

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], iters: int, restarts: int = 1):
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        self.features, self.iters, self.restarts = features, iters, restarts

    def fit(self, samples: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
        best, best_inertia = None, np.inf
        x = samples.astype(np.float64)
        for r in range(self.restarts):
            centres = kmeans(samples, k, seed=seed + r, iters=self.iters)
            inertia = float(((x - centres[assign(samples, centres)]) ** 2).sum())
            if inertia < best_inertia:  # strict: ties keep the earlier start
                best, best_inertia = centres, inertia
        return best

    def fit_tile(self, samples: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
        """A tile's own centres: the same plain k-means (what a GIS user gets for free)."""
        return self.fit(samples, k, seed)

    def labels(self, feats: np.ndarray, rgb: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """uint8 (H, W) cluster ids of `feats`, the features of the image `rgb`."""
        return assign(feats, centres).reshape(rgb.shape[:2]).astype(np.uint8)
