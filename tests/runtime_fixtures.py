"""Helpers for the runtime tests: random torch encoders exported as artifacts, synthetic rasters.

Until trained checkpoints exist, artifacts come from randomly initialised `stages.model.Encoder`s
whose batch-norm statistics are randomised too, so folding batch norm into the convs is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime.artifact import build_meta, write_artifact
from stages.model import INPUT_MEAN, INPUT_SCALE, INPUT_STD, Encoder


def random_encoder(width: int = 16, depth: int = 1, embed_dim: int = 8, seed: int = 0,
                   refine: bool = False) -> Encoder:
    """An eval-mode Encoder with random weights and random batch-norm running statistics."""
    torch.manual_seed(seed)
    enc = Encoder(width, depth, embed_dim, "batch", 0.0, refine)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return enc.eval()


def encoder_meta(enc: Encoder, max_k: int = 8, temperature: float = 0.1, cluster_iters: int = 3,
                 smooth_iters: int = 1, **info) -> dict:
    return build_meta(embed_dim=enc.embed_dim, max_k=max_k, temperature=temperature,
                      cluster_iters_default=cluster_iters, smooth_iters_default=smooth_iters,
                      input_mean=INPUT_MEAN, input_std=INPUT_STD, input_scale=INPUT_SCALE,
                      supports_learned_refine=enc.refine is not None,
                      receptive_field=enc.receptive_field, git_commit="test", params_hash="test",
                      created="2026-01-01T00:00:00+00:00", source="test", **info)


def write_encoder_artifact(dst: Path, enc: Encoder, centres: dict | None = None, **meta_kw) -> Path:
    layers, arrays = enc.export_layers()
    for k, c in (centres or {}).items():
        arrays[f"centres_k{k}"] = c
    return write_artifact(dst, layers=layers, arrays=arrays, meta=encoder_meta(enc, **meta_kw),
                          metrics={"note": "random weights"}, overwrite=True)


def synthetic_rgb(height: int, width: int, seed: int = 0, regions: int = 5) -> np.ndarray:
    """uint8 (H, W, 3): a few colour regions (nearest of random seeds) plus texture and noise."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (regions, 2)) * [height, width]
    colours = rng.integers(20, 235, (regions, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    region = d.argmin(axis=-1)
    img = colours[region].astype(np.float64)
    img += 12 * np.sin(xx / 3.0 + region)[..., None] + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_raster(path: Path, bands_hwc: np.ndarray, nodata=None, crs: str = "EPSG:32611",
                 origin=(500000.0, 4000000.0), pixel: float = 0.6, tiled: bool = True,
                 photometric: str | None = None) -> Path:
    """Write (H, W, C) as a GeoTIFF with a north-up transform (GDAL's default for 4 bytes bands
    is RGBA: pass photometric="minisblack" for four plain bands such as RGBN)."""
    import rasterio
    from rasterio.transform import from_origin

    h, w, c = bands_hwc.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": bands_hwc.dtype.name,
               "crs": crs, "transform": from_origin(origin[0], origin[1], pixel, pixel)}
    if tiled and h >= 16 and w >= 16:
        profile.update(tiled=True, blockxsize=16 * max(1, min(16, w // 16)),
                       blockysize=16 * max(1, min(16, h // 16)))
    if nodata is not None:
        profile["nodata"] = nodata
    if photometric is not None:
        profile["photometric"] = photometric
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(bands_hwc.transpose(2, 0, 1))
    return path
