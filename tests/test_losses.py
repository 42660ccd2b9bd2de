"""Losses on known cases: zero where they must be, positive where they must not, known numbers."""

import math

import numpy as np
import pytest
import torch

from stages import losses
from stages.augment import GeometricTransform, apply_each, invert_each
from stages.losses import (balanced_positions, offset_positions, EmaNormaliser, affinity_distillation, cluster_distillation, consistency,
                           cosine_distillation, dense_contrastive, edge_aware_tv, self_distillation, geometric_mean, marginal_entropy,
                           pixel_entropy, sample_positions)


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


def test_sinkhorn_targets_are_balanced_and_swapped_prediction_prefers_agreement():
    from stages.losses import sinkhorn_targets, swapped_prediction

    skewed = torch.softmax(torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)) +
                           torch.tensor([3.0, 0, 0, 0]).view(1, 4, 1, 1), dim=1)
    q = sinkhorn_targets(skewed, iters=20)
    assert torch.allclose(q.sum(dim=1), torch.ones(2, 6, 6), atol=1e-4)
    assert torch.allclose(q.mean(dim=(0, 2, 3)), torch.full((4,), 0.25), atol=1e-3)   # equal cluster shares
    p = _probs(sharp=6.0)
    agree = swapped_prediction(p, p).item()
    disagree = swapped_prediction(p, _probs(seed=3, sharp=6.0)).item()
    assert agree < disagree


def test_dense_contrastive_scale_and_same_image_negatives():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    b, d, side, n = 4, 16, 6, 8
    idx = sample_positions(b, side * side, n, g)
    distinct = F.normalize(torch.randn(b, d, side, side, generator=g), dim=1)
    # matched, well-separated cells at a low temperature: near zero; unrelated views: about chance (1)
    assert dense_contrastive(distinct, distinct, idx, 0.02).item() < 0.05
    other = F.normalize(torch.randn(b, d, side, side, generator=g), dim=1)
    assert 0.8 < dense_contrastive(distinct, other, idx, 1.0).item() < 1.3
    # every cell of an image has the same embedding (one land cover per image): with same-image
    # negatives the positive cannot be told from its neighbours; without them it is easy
    per_image = F.normalize(torch.randn(b, d, generator=g), dim=1)[:, :, None, None].expand(b, d, side, side)
    with_same = dense_contrastive(per_image, per_image, idx, 0.05).item()
    without_same = dense_contrastive(per_image, per_image, idx, 0.05, same_image_negatives=False).item()
    assert with_same > 0.5 and without_same < 0.05
    # a single image has no other-image negatives: an error, not a silent zero
    with pytest.raises(ValueError, match="at least two"):
        dense_contrastive(per_image[:1], per_image[:1], idx[:1, :1], 0.05, same_image_negatives=False)


def test_offset_positives_stay_on_the_grid_within_reach():
    g = torch.Generator().manual_seed(0)
    side = 6
    idx = sample_positions(3, side * side, side * side, g)        # every cell of 3 images
    assert torch.equal(offset_positions(idx, side, 0, g), idx)      # 0: the same cell, no draw
    moved = offset_positions(idx, side, 2, g)
    assert moved.shape == idx.shape and moved.min() >= 0 and moved.max() < side * side
    dr, dc = (moved // side - idx // side).abs(), (moved % side - idx % side).abs()
    assert dr.max() <= 2 and dc.max() <= 2 and (moved != idx).float().mean() > 0.5
    with pytest.raises(ValueError, match="max_offset"):
        offset_positions(idx, side, -1, g)


def test_offset_positives_reward_features_constant_over_a_region():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    b, d, side, n = 4, 16, 8, 16
    idx = sample_positions(b, side * side, n, g)
    idx_b = offset_positions(idx, side, 2, g)
    # two regions per image (left / right half), each one embedding: matched if the offset stays
    # in the region; per-cell random embeddings cannot match a neighbouring cell
    regions = F.normalize(torch.randn(b, 2, d, generator=g), dim=2)
    half = (torch.arange(side) >= side // 2).long()
    regional = regions[:, half].permute(0, 2, 1)[:, :, None, :].expand(b, d, side, side).contiguous()
    per_cell = F.normalize(torch.randn(b, d, side, side, generator=g), dim=1)
    assert dense_contrastive(regional, regional, idx, 0.05, idx_b=idx_b).item() < \
        dense_contrastive(per_cell, per_cell, idx, 0.05, idx_b=idx_b).item()
    with pytest.raises(ValueError, match="shape of idx"):
        dense_contrastive(per_cell, per_cell, idx, 0.05, idx_b=idx_b[:, :3])


def test_false_negative_masking_drops_only_similar_negatives():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    b, d, side, n = 4, 16, 6, 8
    idx = sample_positions(b, side * side, n, g)
    # one embedding per image: every same-image cell is a perfect false negative
    per_image = F.normalize(torch.randn(b, d, generator=g), dim=1)[:, :, None, None].expand(b, d, side, side)
    kept = dense_contrastive(per_image, per_image, idx, 0.05).item()
    masked = dense_contrastive(per_image, per_image, idx, 0.05, max_negative_cos=0.99).item()
    assert kept > 0.5 and masked < 0.05
    # distinct cells: nothing is that similar, so masking changes nothing
    distinct = F.normalize(torch.randn(b, d, side, side, generator=g), dim=1)
    assert dense_contrastive(distinct, distinct, idx, 0.2, max_negative_cos=0.99).item() == \
        pytest.approx(dense_contrastive(distinct, distinct, idx, 0.2).item())
    # the positive is never masked, even when it is the most similar candidate
    assert torch.isfinite(dense_contrastive(distinct, distinct, idx, 0.2, max_negative_cos=-1.0))


def test_self_distillation_rewards_agreeing_with_the_sharpened_target():
    t = _probs(seed=1, sharp=1.0)
    sharpened = t ** 2 / (t ** 2).sum(dim=1, keepdim=True)    # the optimum: the target at half temperature
    over = torch.softmax(6.0 * t.clamp_min(1e-8).log(), dim=1)
    other = _probs(seed=2, sharp=1.0)
    best = self_distillation(sharpened, sharpened, t, t).item()
    for worse in (t, over, other):                             # the target itself, too sharp, unrelated
        assert best < self_distillation(worse, worse, t, t).item()
    # the target carries no gradient; the online maps do
    p = t.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    self_distillation(p, p, tt, tt).backward()
    assert tt.grad is None and p.grad is not None
    with pytest.raises(ValueError, match="shapes differ"):
        self_distillation(t, t, t[:, :2], t)


def test_balanced_positions_sample_rare_clusters_as_often_as_common_ones():
    g = torch.Generator().manual_seed(0)
    clusters = torch.zeros(4, 256, dtype=torch.long)
    clusters[:, :16] = 1  # a rare cluster: 1 / 16 of the cells
    idx = balanced_positions(clusters, 32, g)
    assert idx.shape == (4, 32) and all(len(set(row.tolist())) == 32 for row in idx)  # no repeats
    rare = (torch.gather(clusters, 1, idx) == 1).float().mean()
    assert 0.35 < rare < 0.65  # about half, against 1 / 16 for uniform sampling


def _stripes(side_px: int, along: str) -> torch.Tensor:
    """Grey stripes 4 px wide: 'rows' = constant along rows (vertical stripes), 'diagonal' = lines of
    constant row + col."""
    r, c = np.mgrid[:side_px, :side_px]
    v = {"rows": (c // 4) % 2, "cols": (r // 4) % 2, "diagonal": ((r + c) // 4) % 2}[along]
    return torch.tensor(v, dtype=torch.float32).expand(2, 3, side_px, side_px).clone()


def test_structure_directions_follow_stripes():
    cases = {"rows": (1.0, 0.0), "cols": (0.0, 1.0), "diagonal": (2 ** -0.5, -(2 ** -0.5))}
    for along, (d_row, d_col) in cases.items():
        directions, coherence = losses.structure_directions(_stripes(64, along), 16)
        inner = (slice(None), slice(2, -2), slice(2, -2))
        # a direction and its opposite are the same orientation: compare |cos|
        cos = (directions[:, 0] * d_row + directions[:, 1] * d_col)[inner].abs()
        assert cos.min() > 0.99, along
        assert coherence[inner].min() > 0.99, along
    _, flat = losses.structure_directions(torch.full((1, 3, 64, 64), 0.5), 16)
    assert flat.max() == 0.0


def test_structure_offsets_move_along_the_structure_only():
    g = torch.Generator().manual_seed(0)
    side = 16
    idx = losses.sample_positions(2, side * side, 64, g)
    directions, coherence = losses.structure_directions(_stripes(64, "rows"), side)
    moved = losses.structure_offset_positions(idx, side, 3, directions, coherence, 0.5, g)
    assert torch.equal(moved % side, idx % side)  # same column: moved along the stripe
    shift = (moved // side - idx // side).abs()
    assert shift.max() <= 3 and (shift > 0).float().mean() > 0.8  # clamping at the border may zero a few
    # no clear orientation: every positive stays the same cell
    flat_dirs, flat_coh = losses.structure_directions(torch.full((2, 3, 64, 64), 0.5), side)
    assert torch.equal(losses.structure_offset_positions(idx, side, 3, flat_dirs, flat_coh, 0.5, g), idx)
    with pytest.raises(ValueError, match="max_offset"):
        losses.structure_offset_positions(idx, side, 0, directions, coherence, 0.5, g)


def test_block_mask_blanks_whole_blocks_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    mask = losses.block_mask(3, 18, 4, 0.3, g)  # 4 x 4 blocks of 4 cells; rows/cols 16-17 never masked
    assert mask.shape == (3, 18, 18) and mask.dtype == torch.bool
    assert not mask[:, 16:].any() and not mask[:, :, 16:].any()
    blocks = mask[:, :16, :16].reshape(3, 4, 4, 4, 4)
    per_block = blocks.sum((2, 4))
    assert set(per_block.unique().tolist()) <= {0, 16}  # a block is blanked whole or not at all
    assert ((per_block == 16).sum((1, 2)) == round(0.3 * 16)).all()
    with pytest.raises(ValueError, match="does not fit"):
        losses.block_mask(1, 3, 4, 0.3, g)


def test_masked_prediction_scores_only_masked_cells():
    e = torch.nn.functional.normalize(torch.randn(2, 8, 6, 6), dim=1)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, :2, :2] = True
    other = e.clone()
    other[:, :, 3:, 3:] = -other[:, :, 3:, 3:]  # differs only outside the mask
    assert losses.masked_prediction(other, e, mask).abs() < 1e-6
    assert abs(float(losses.masked_prediction(-e, e, mask)) - 2.0) < 1e-5
    with pytest.raises(ValueError, match="at least one"):
        losses.masked_prediction(e, e, torch.zeros_like(mask))
