"""Two-view augmentation: transforms invert exactly, views are reproducible per (seed, step)."""

import numpy as np
import pytest
import torch

from stages.augment import GeometricTransform, apply_each, draw_transforms, invert_each, make_views, step_generator
from stages.params import AugParams

ALL = [GeometricTransform(r, f) for r in range(4) for f in (False, True)]


@pytest.mark.parametrize("t", ALL, ids=lambda t: f"rot{t.rot90}-flip{int(t.flip)}")
def test_pixel_maps_back_to_itself(t):
    size = 8
    x = torch.arange(size * size, dtype=torch.float32).view(1, size, size)
    y = t.apply(x)
    assert torch.equal(t.invert(y), x)
    # map_pixel says where each pixel went; check it against the transformed array
    for r, c in [(0, 0), (1, 5), (7, 2), (3, 3)]:
        r2, c2 = t.map_pixel(r, c, size)
        assert y[0, r2, c2] == x[0, r, c]


def test_transforms_are_distinct_group_elements():
    x = torch.rand(1, 6, 6)
    outs = [t.apply(x) for t in ALL]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.equal(outs[i], outs[j])


def test_transform_commutes_with_stride4_pooling():
    """On patches with sides divisible by 4, transforming then pooling == pooling then transforming."""
    x = torch.rand(3, 2, 16, 16)
    ts = draw_transforms(step_generator(0, 0), 3, True, True)
    pooled_after = torch.nn.functional.avg_pool2d(apply_each(x, ts), 4)
    pooled_before = apply_each(torch.nn.functional.avg_pool2d(x, 4), ts)
    assert torch.allclose(pooled_after, pooled_before)
    assert torch.equal(invert_each(apply_each(x, ts), ts), x)


def _batch(seed=0, b=4, s=16):
    return np.random.default_rng(seed).integers(0, 256, (b, s, s, 3), dtype=np.uint8)


def test_views_reproducible_and_new_each_step():
    aug = AugParams()
    a = make_views(_batch(), step=3, aug=aug)
    b = make_views(_batch(), step=3, aug=aug)
    c = make_views(_batch(), step=4, aug=aug)
    assert torch.equal(a[0].input, b[0].input) and torch.equal(a[1].input, b[1].input)
    assert a[0].transforms == b[0].transforms
    assert not torch.equal(a[0].input, c[0].input)


def test_guide_inverts_to_the_jittered_source_geometry():
    """Without photometric jitter or noise, each view's inverted guide is the source image."""
    aug = AugParams(brightness=0.0, contrast=0.0, saturation=0.0, noise_std=0.0, channel_gain=0.0, gamma=0.0)
    batch = _batch()
    src = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    for v in make_views(batch, step=0, aug=aug):
        assert torch.allclose(invert_each(v.guide, v.transforms), src, atol=1e-6)


def test_photometric_jitter_on_rgb_only_changes_values_not_geometry():
    aug = AugParams(rotate90=False, flip=False, brightness=0.5, contrast=0.5, saturation=0.5, noise_std=0.0)
    batch = _batch(b=2)
    v = make_views(batch, step=0, aug=aug)[0]
    assert all(t == GeometricTransform(0, False) for t in v.transforms)
    src = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    assert not torch.allclose(v.guide, src)
    assert v.guide.min() >= 0 and v.guide.max() <= 1


def test_rejects_patches_not_divisible_by_stride():
    with pytest.raises(ValueError, match="divisible by 4"):
        make_views(_batch(s=18), step=0, aug=AugParams())
