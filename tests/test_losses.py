"""Losses on known cases: zero where they must be, positive where they must not, known numbers."""

import math

import pytest
import torch

from stages.augment import GeometricTransform, apply_each, invert_each
from stages.losses import (
    EmaNormaliser,
    affinity_distillation,
    cluster_distillation,
    consistency,
    cosine_distillation,
    dense_contrastive,
    edge_aware_tv,
    geometric_mean,
    marginal_entropy,
    pixel_entropy,
    sample_positions,
)


def _probs(b=2, k=4, h=6, w=6, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(b, k, h, w, generator=g), dim=1)


def test_consistency_zero_for_identical_aligned_views_positive_for_misaligned():
    p = _probs()
    ts = [GeometricTransform(1, True), GeometricTransform(3, False)]
    view_a = apply_each(p, ts)                       # network output on a transformed view
    aligned = invert_each(view_a, ts)                # mapped back to the source grid
    assert consistency(aligned, p).item() == pytest.approx(0.0, abs=1e-7)
    assert consistency(view_a, p).item() > 0.1        # compared without inverting: misaligned


def test_entropy_terms_known_values():
    k = 4
    uniform = torch.full((1, k, 3, 3), 1.0 / k)
    one_hot = torch.zeros(1, k, 3, 3)
    one_hot[:, 2] = 1
    assert pixel_entropy(uniform).item() == pytest.approx(1.0)
    assert pixel_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert marginal_entropy(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert marginal_entropy(one_hot).item() == pytest.approx(1.0, abs=1e-6)   # collapse costs most
    # two clusters used half/half out of 4: marginal entropy log 2 / log 4 = 0.5
    half = torch.zeros(1, k, 2, 2)
    half[:, 0, 0] = 1
    half[:, 1, 1] = 1
    assert marginal_entropy(half).item() == pytest.approx(0.5, abs=1e-6)


def test_edge_aware_tv_cheap_across_edges():
    p = torch.zeros(1, 2, 2, 2)
    p[:, 0, :, 0] = 1                                # left column cluster 0, right column cluster 1
    p[:, 1, :, 1] = 1
    flat = torch.full((1, 3, 8, 8), 0.5)
    edge = flat.clone()
    edge[:, :, :, 4:] = 1.0                          # an image edge exactly where the label changes
    tv_flat = edge_aware_tv(p, flat, sigma=0.1).item()
    tv_edge = edge_aware_tv(p, edge, sigma=0.1).item()
    assert tv_flat == pytest.approx(0.5)              # horizontal pairs all differ (weight 1), vertical none
    assert tv_edge == pytest.approx(0.5 * math.exp(-0.5 / 0.1))
    assert edge_aware_tv(torch.full((1, 2, 2, 2), 0.5), edge, 0.1).item() == 0.0


def test_distillation_losses_zero_for_identical_features():
    g = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(2, 8, 5, 5, generator=g), dim=1)
    idx = sample_positions(2, 25, 10, g)
    assert idx.shape == (2, 10) and all(len(set(r.tolist())) == 10 for r in idx)
    assert affinity_distillation(f, f, idx).item() == pytest.approx(0.0, abs=1e-10)
    assert cosine_distillation(f, f).item() == pytest.approx(0.0, abs=1e-6)
    p = _probs()
    assert cluster_distillation(p, p).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.nn.functional.normalize(torch.randn(2, 8, 5, 5, generator=g), dim=1)
    assert affinity_distillation(other, f, idx).item() > 0.01
    assert cluster_distillation(_probs(seed=1), p).item() > 0.1


def test_affinity_distillation_same_positions_any_width():
    """Student and teacher of different widths: affinity compares the same sampled cells."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(1, 16, 4, 4, generator=g)
    # a student that is an orthogonal re-embedding of the teacher (different width) has the same affinities
    q, _ = torch.linalg.qr(torch.randn(24, 16, generator=g))
    s = torch.einsum("ed,bdhw->behw", q, t)
    idx = sample_positions(1, 16, 16, g)
    assert affinity_distillation(s, t, idx).item() == pytest.approx(0.0, abs=1e-9)
    # shifting the student's positions (a misaligned sampler) makes it positive
    assert affinity_distillation(torch.roll(s, 1, dims=3), t, idx).item() > 1e-3


def test_ema_normalisation_and_geometric_mean_known_numbers():
    norm = EmaNormaliser(decay=0.5, eps=0.0)
    n1 = norm.normalise("64", torch.tensor(2.0))          # ema = 2 -> 1
    assert n1.item() == pytest.approx(1.0)
    n2 = norm.normalise("64", torch.tensor(4.0))          # ema = 0.5*2 + 0.5*4 = 3 -> 4/3
    assert norm.ema["64"] == pytest.approx(3.0) and n2.item() == pytest.approx(4.0 / 3.0)
    n3 = norm.normalise("128", torch.tensor(10.0))        # first value of another scale -> 1
    assert n3.item() == pytest.approx(1.0)
    assert geometric_mean(torch.tensor([1.0, 4.0])).item() == pytest.approx(2.0)
    assert geometric_mean(torch.tensor([2.0, 8.0, 4.0])).item() == pytest.approx(4.0)
    loss = torch.tensor(12.0, requires_grad=True)
    n = norm.normalise("128", loss)                       # ema = 0.5*10 + 0.5*12 = 11 -> 12/11
    merged = norm.merged("128", n)                        # sqrt(4/3 * 12/11)
    assert merged.item() == pytest.approx(math.sqrt(4 / 3 * 12 / 11))
    merged.backward()                                     # gradient flows to the live scale only
    assert loss.grad.item() == pytest.approx(merged.item() / (2 * 12.0))
    clone = EmaNormaliser(0.5, 0.0)
    clone.load_state_dict(norm.state_dict())
    assert clone.ema == norm.ema and clone.last == norm.last
    with pytest.raises(ValueError):
        EmaNormaliser(decay=1.0, eps=0.0)


def test_dense_contrastive_scale():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    b, d, side, n = 4, 16, 6, 8
    idx = sample_positions(b, side * side, n, g)
    distinct = F.normalize(torch.randn(b, d, side, side, generator=g), dim=1)
    # matched, well-separated cells at a low temperature: near zero; unrelated views: about chance (1)
    assert dense_contrastive(distinct, distinct, idx, 0.02).item() < 0.05
    other = F.normalize(torch.randn(b, d, side, side, generator=g), dim=1)
    assert 0.8 < dense_contrastive(distinct, other, idx, 1.0).item() < 1.3
    # every cell of an image has the same embedding: same-image cells are negatives, so the
    # positive cannot be told from its neighbours (what drives cells of one cover apart)
    per_image = F.normalize(torch.randn(b, d, generator=g), dim=1)[:, :, None, None].expand(b, d, side, side)
    assert dense_contrastive(per_image, per_image, idx, 0.05).item() > 0.5
    with pytest.raises(ValueError, match="at least two"):
        dense_contrastive(per_image[:1], per_image[:1], idx[:1, :1], 0.05)


