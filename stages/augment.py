"""Two-view augmentation for the teacher's consistency objective.

Each sample of a batch is seen twice. A view is a *geometric* transform from the dihedral group of
the square (0..3 quarter-turns, optional flip), applied to the RGB patch and to every map aligned
with it, plus *photometric* jitter (brightness, contrast, saturation, Gaussian noise) applied to the
RGB only. The geometric transform of every view is returned so that the network's outputs can be
mapped back to the original pixel grid (`GeometricTransform.invert`) before two views are compared:
the consistency loss then compares the same ground pixels.

Coordinate conventions: arrays are (..., H, W) with row index first (image convention, row 0 at
the top, as in a north-up GeoTIFF window); all transforms act on the last two axes and need a square
patch. On the stride-4 output grid the same transform is exact when the patch side is a multiple of
4 (cell i covers pixels 4i..4i+3, and a flip or rotation maps that block onto another whole block).

Randomness: every draw comes from a generator seeded by (aug.seed, step), so a training step sees
new transforms and jitter every time, the stream is reproducible, and a resumed run replays exactly
the draws an uninterrupted run would have made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.model import INPUT_MEAN, INPUT_SCALE, INPUT_STD


@dataclass(frozen=True)
class GeometricTransform:
    """An element of the square's dihedral group acting on the last two axes (H, W).

    `apply`: optional horizontal flip (reverse columns) first, then `rot90` counter-clockwise
    quarter-turns (torch.rot90 on dims (-2, -1)). `invert` undoes it exactly.
    """

    rot90: int = 0
    flip: bool = False

    def __post_init__(self):
        if self.rot90 not in (0, 1, 2, 3):
            raise ValueError(f"rot90 must be 0..3 quarter-turns, got {self.rot90}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2] and self.rot90 % 2:
            raise ValueError(f"rotations need square maps, got {tuple(x.shape[-2:])}")
        if self.flip:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, self.rot90, dims=(-2, -1)) if self.rot90 else x

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        if self.rot90:
            x = torch.rot90(x, -self.rot90, dims=(-2, -1))
        return torch.flip(x, dims=(-1,)) if self.flip else x

    def map_pixel(self, row: int, col: int, size: int) -> tuple[int, int]:
        """Where pixel (row, col) of a size x size map lands after `apply` (for tests and docs)."""
        if self.flip:
            col = size - 1 - col
        for _ in range(self.rot90):  # one counter-clockwise quarter-turn
            row, col = size - 1 - col, row
        return row, col


def apply_each(x: torch.Tensor, transforms: list[GeometricTransform]) -> torch.Tensor:
    """Apply transform i to sample i of a batch (B, ..., H, W)."""
    return torch.stack([t.apply(xi) for t, xi in zip(transforms, x)])


def invert_each(x: torch.Tensor, transforms: list[GeometricTransform]) -> torch.Tensor:
    """Undo transform i on sample i of a batch (B, ..., H, W)."""
    return torch.stack([t.invert(xi) for t, xi in zip(transforms, x)])


def step_generator(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """Independent, reproducible generator for one (seed, step, stream) triple."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, stream]))


def draw_transforms(rng: np.random.Generator, n: int, rotate90: bool, flip: bool
                    ) -> list[GeometricTransform]:
    rots = rng.integers(0, 4, n) if rotate90 else np.zeros(n, dtype=int)
    flips = rng.integers(0, 2, n) if flip else np.zeros(n, dtype=int)
    return [GeometricTransform(int(r), bool(f)) for r, f in zip(rots, flips)]


def photometric_jitter(rgb01: torch.Tensor, rng: np.random.Generator, brightness: float,
                       contrast: float, saturation: float, channel_gain: float = 0.0,
                       gamma: float = 0.0) -> torch.Tensor:
    """Per-sample photometric jitter of RGB in [0, 1], (B, 3, H, W): what differs between sensors,
    dates and atmospheres rather than between land covers.

    A gamma curve x ** exp(u), u ~ U(-gamma, gamma); per-channel gains (white balance) and then
    brightness, contrast and saturation factors, each drawn uniformly from [1 - x, 1 + x]; the
    result is clipped to [0, 1].
    """
    b = rgb01.shape[0]

    def factors(amount: float, channels: int = 1) -> torch.Tensor:
        f = rng.uniform(1 - amount, 1 + amount, (b, channels)).astype(np.float32)
        return torch.from_numpy(f).view(b, channels, 1, 1)

    exponent = torch.from_numpy(np.exp(rng.uniform(-gamma, gamma, b)).astype(np.float32)).view(b, 1, 1, 1)
    x = rgb01.clamp_min(0.0) ** exponent
    x = x * factors(channel_gain, 3) * factors(brightness)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors(contrast) + mean
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - grey) * factors(saturation) + grey
    return x.clamp(0.0, 1.0)


def to_rgb01(batch_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) patches -> float32 (B, 3, S, S) in [0, 1]."""
    if batch_uint8.dtype != np.uint8 or batch_uint8.ndim != 4 or batch_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, S, S, 3) patches, got {batch_uint8.dtype} {batch_uint8.shape}")
    return torch.from_numpy(np.ascontiguousarray(batch_uint8)).permute(0, 3, 1, 2).float() / INPUT_SCALE


def normalise01(rgb01: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> the network's input normalisation (see stages.model)."""
    mean = torch.tensor(INPUT_MEAN, device=rgb01.device).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD, device=rgb01.device).view(1, 3, 1, 1)
    return (rgb01 - mean) / std


@dataclass
class View:
    """One augmented view of a batch.

    input: normalised network input (B, 3, S, S), transformed and jittered;
    guide: jittered RGB in [0, 1] before noise (B, 3, S, S), transformed like `input`: the image
           whose gradients weight the edge-aware smoothness;
    transforms: the geometric transform of each sample (invert to return to the source grid).
    """

    input: torch.Tensor
    guide: torch.Tensor
    transforms: list[GeometricTransform]

    def rows(self, rows: slice) -> View:
        """The samples `rows` of this view (a rank's slice of the global batch)."""
        return View(self.input[rows], self.guide[rows], self.transforms[rows])


def make_views(batch_uint8: np.ndarray, step: int, aug, num_views: int = 2) -> list[View]:
    """`num_views` independently augmented views of a batch, reproducible from (aug.seed, step).

    `aug` is a `stages.params.AugParams`. Patch sides must be multiples of the network stride (4)
    so the transforms act exactly on the stride-4 output grid.
    """
    size = batch_uint8.shape[1]
    if batch_uint8.shape[1] != batch_uint8.shape[2] or size % 4:
        raise ValueError(f"patches must be square with a side divisible by 4, got {batch_uint8.shape[1:3]}")
    rgb01 = to_rgb01(batch_uint8)
    rng = step_generator(aug.seed, step)
    views = []
    for _ in range(num_views):
        transforms = draw_transforms(rng, len(rgb01), aug.rotate90, aug.flip)
        guide = photometric_jitter(apply_each(rgb01, transforms), rng, aug.brightness, aug.contrast,
                                   aug.saturation, aug.channel_gain, aug.gamma)
        x = normalise01(guide)
        if aug.noise_std > 0:
            noise = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(aug.noise_std)
            x = x + torch.from_numpy(noise)
        views.append(View(x, guide, transforms))
    return views
