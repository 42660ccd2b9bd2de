"""Training objectives of the teacher and the student.

Every loss is mean-reduced (over samples and pixels or pairs, never summed) and lies on a
comparable O(1) scale, so the weights in params.yaml mean what they say:

teacher (stride-4 assignment maps p of shape (B, k, h, w), rows summing to one)
- `consistency`: symmetric KL divergence between two views' assignments at the same ground
  pixels; zero iff the aligned maps are identical;
- `pixel_entropy`: mean per-pixel entropy / log k in [0, 1]; low = confident assignments;
- `marginal_entropy`: 1 - H(mean assignment) / log k in [0, 1]; zero when clusters are used
  equally, one when everything falls in one cluster (the anti-collapse term);
- `edge_aware_tv`: total variation of assignments between 4-neighbours, weighted by
  exp(-|image difference| / sigma) so that label changes are cheap across image edges.

student (distillation from the frozen teacher)
- `cosine_distillation`: 1 - cos between (projected) student and teacher embeddings;
- `affinity_distillation`: squared error between the cosine-affinity matrices of student and
  teacher at the *same* sampled positions;
- `cluster_distillation`: KL(teacher assignments || student assignments) under the teacher's
  centres;
- `EmaNormaliser` and `geometric_mean`: each patch size's loss divided by its own running mean,
  merged across patch sizes by a geometric mean.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

EPS = 1e-8


def _check_probs(p: torch.Tensor, name: str = "probs") -> None:
    if p.ndim != 4:
        raise ValueError(f"{name}: expected (B, k, h, w), got shape {tuple(p.shape)}")


def consistency(p_a: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between aligned assignment maps (B, k, h, w), mean over pixels."""
    _check_probs(p_a, "p_a")
    if p_a.shape != p_b.shape:
        raise ValueError(f"views differ in shape: {tuple(p_a.shape)} vs {tuple(p_b.shape)}")
    log_a, log_b = p_a.clamp_min(EPS).log(), p_b.clamp_min(EPS).log()
    return 0.5 * ((p_a - p_b) * (log_a - log_b)).sum(dim=1).mean()


def pixel_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy normalised by log k, in [0, 1]."""
    _check_probs(p)
    h = -(p * p.clamp_min(EPS).log()).sum(dim=1)
    return h.mean() / math.log(p.shape[1])


def marginal_entropy(p: torch.Tensor) -> torch.Tensor:
    """1 - H(mean assignment over the batch) / log k, in [0, 1]: zero = clusters used equally."""
    _check_probs(p)
    marginal = p.mean(dim=(0, 2, 3))
    h = -(marginal * marginal.clamp_min(EPS).log()).sum()
    return 1.0 - h / math.log(p.shape[1])


def edge_weights(guide: torch.Tensor, sigma: float, stride: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge-aware weights between 4-neighbouring stride-`stride` cells.

    guide: RGB in [0, 1], (B, 3, H, W) with H, W multiples of `stride`. Each cell's colour is the
    mean of its stride x stride block; a neighbour pair's weight is exp(-d / sigma) with d the mean
    absolute colour difference. Returns (vertical (B, h-1, w), horizontal (B, h, w-1)).
    """
    g = F.avg_pool2d(guide, stride, stride)
    dv = (g[:, :, 1:, :] - g[:, :, :-1, :]).abs().mean(dim=1)
    dh = (g[:, :, :, 1:] - g[:, :, :, :-1]).abs().mean(dim=1)
    return torch.exp(-dv / sigma), torch.exp(-dh / sigma)


def edge_aware_tv(p: torch.Tensor, guide: torch.Tensor, sigma: float) -> torch.Tensor:
    """Weighted total variation of assignments (half L1 distance of neighbours, in [0, 1])."""
    _check_probs(p)
    wv, wh = edge_weights(guide, sigma, guide.shape[-1] // p.shape[-1])
    tv_v = 0.5 * (p[:, :, 1:, :] - p[:, :, :-1, :]).abs().sum(dim=1)
    tv_h = 0.5 * (p[:, :, :, 1:] - p[:, :, :, :-1]).abs().sum(dim=1)
    return 0.5 * ((wv * tv_v).mean() + (wh * tv_h).mean())


def cosine_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher) over cells; both (B, D, h, w) with the same D."""
    if student.shape != teacher.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)} (project the student to the teacher's width)")
    return (1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-12)).mean()


def sample_positions(batch: int, cells: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, min(n, cells)) flat cell indices, without replacement per image."""
    n = min(n, cells)
    return torch.stack([torch.randperm(cells, generator=generator)[:n] for _ in range(batch)])


def balanced_positions(clusters: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(B, min(n, cells)) flat cell indices drawn without replacement per image, each cell weighted
    by 1 / (number of cells of the batch in its cluster): every cluster of the current assignment
    gets about the same share of the samples, so rare land covers (roads: 9 % of Dubai's pixels)
    are anchors and negatives as often as the dominant one (land: 52 %).

    clusters: (B, cells) integer cluster ids (e.g. the argmax of the assignments, no gradient).
    """
    b, cells = clusters.shape
    flat = clusters.reshape(-1).cpu()
    counts = torch.bincount(flat).to(torch.float64)
    weights = (1.0 / counts[flat]).reshape(b, cells)
    return torch.multinomial(weights, min(n, cells), replacement=False, generator=generator)


def offset_positions(idx: torch.Tensor, side: int, max_offset: int, generator: torch.Generator) -> torch.Tensor:
    """Each flat cell index of idx (B, N) on a side x side grid moved by a random offset of at most
    `max_offset` cells along each axis (uniform in [-max_offset, max_offset]^2, clamped to the grid).
    max_offset 0 returns idx unchanged."""
    if max_offset < 0:
        raise ValueError(f"max_offset must be >= 0, got {max_offset}")
    if max_offset == 0:
        return idx
    shift = torch.randint(-max_offset, max_offset + 1, (2, *idx.shape), generator=generator)
    return shift_positions(idx, side, shift[0], shift[1])


def shift_positions(idx: torch.Tensor, side: int, d_row: torch.Tensor, d_col: torch.Tensor) -> torch.Tensor:
    """Flat cell indices idx (B, N) on a side x side grid moved by whole cells (d_row, d_col:
    integer tensors of idx's shape), clamped to the grid."""
    rows = (idx // side + d_row.to(idx.device)).clamp(0, side - 1)
    cols = (idx % side + d_col.to(idx.device)).clamp(0, side - 1)
    return rows * side + cols


@torch.no_grad()
def structure_directions(rgb01: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Direction along the locally dominant image structure (a road, an edge) per stride-4 cell.

    rgb01 (B, 3, S, S), S = 4 * side or a multiple of it, on the grid the cells are indexed on.
    The structure tensor of the grey image (products of pixel differences) is averaged over each
    cell and its 8 neighbours (a 12 x 12 px window at S = 4 * side). Returns `directions`
    (B, 2, side, side), a unit (d_row, d_col) vector across the tensor's dominant gradient, i.e.
    along the structure, and `coherence` (B, side, side) in [0, 1]: 1 for a single orientation
    (straight strips and edges), 0 for flat or isotropic texture, where the direction means nothing.
    """
    grey = rgb01.mean(1, keepdim=True)
    g_row = F.pad(grey[..., 1:, :] - grey[..., :-1, :], (0, 0, 0, 1))
    g_col = F.pad(grey[..., :, 1:] - grey[..., :, :-1], (0, 1, 0, 0))
    tensor = torch.cat([g_col * g_col, g_row * g_row, g_col * g_row], 1)
    tensor = F.adaptive_avg_pool2d(tensor, side)
    tensor = F.avg_pool2d(tensor, 3, stride=1, padding=1, count_include_pad=False)
    jxx, jyy, jxy = tensor.unbind(1)
    gradient_angle = 0.5 * torch.atan2(2 * jxy, jxx - jyy)  # angle of (d_col, d_row) of the gradient
    directions = torch.stack([torch.cos(gradient_angle), -torch.sin(gradient_angle)], 1)  # rotated 90 deg
    coherence = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-6)
    return directions, coherence.clamp(0.0, 1.0)


def structure_offset_positions(idx: torch.Tensor, side: int, max_offset: int, directions: torch.Tensor,
                               coherence: torch.Tensor, min_coherence: float,
                               generator: torch.Generator) -> torch.Tensor:
    """Each flat cell index of idx (B, N) moved 1..`max_offset` cells (uniform, random sign) along
    its cell's structure direction (`structure_directions`), rounded to the grid and clamped;
    cells whose coherence is below `min_coherence` stay where they are (no reliable direction).
    Positives then lie along roads and edges, not across them."""
    if max_offset < 1:
        raise ValueError(f"max_offset must be >= 1, got {max_offset}")
    d = gather_positions(directions, idx).cpu()  # (B, N, 2): d_row, d_col
    coh = gather_positions(coherence[:, None], idx)[..., 0].cpu()
    steps = torch.randint(1, max_offset + 1, idx.shape, generator=generator).float()
    sign = torch.randint(0, 2, idx.shape, generator=generator).float() * 2 - 1
    move = steps * sign * (coh >= min_coherence).float()
    return shift_positions(idx, side, torch.round(move * d[..., 0]).long(), torch.round(move * d[..., 1]).long())


def gather_positions(emb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) embeddings at flat positions idx (B, N) -> (B, N, D)."""
    b, d = emb.shape[:2]
    flat = emb.reshape(b, d, -1)
    return torch.gather(flat, 2, idx.unsqueeze(1).expand(b, d, idx.shape[1]).to(emb.device)).transpose(1, 2)


def affinity_distillation(student: torch.Tensor, teacher: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of cosine affinities at the same positions `idx` (B, N).

    student (B, Ds, h, w) and teacher (B, Dt, h, w) may differ in width: affinities are N x N.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must share "
                         "batch and spatial size")
    s = F.normalize(gather_positions(student, idx), dim=2, eps=1e-12)
    t = F.normalize(gather_positions(teacher, idx), dim=2, eps=1e-12)
    return (s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).pow(2).mean()


def cluster_distillation(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per pixel, mean over pixels; both (B, k, h, w)."""
    _check_probs(p_student, "p_student")
    if p_student.shape != p_teacher.shape:
        raise ValueError(f"assignment shapes differ: {tuple(p_student.shape)} vs {tuple(p_teacher.shape)}")
    kl = p_teacher * (p_teacher.clamp_min(EPS).log() - p_student.clamp_min(EPS).log())
    return kl.sum(dim=1).mean()


def geometric_mean(values: torch.Tensor) -> torch.Tensor:
    """exp(mean(log v)) of positive values (1-D tensor)."""
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    return torch.exp(values.clamp_min(EPS).log().mean())


class EmaNormaliser:
    """Per-key exponential moving average of a loss, used to normalise it to O(1).

    On the first value for a key the EMA is that value; afterwards
    ema <- decay * ema + (1 - decay) * value. `normalise(key, loss)` updates the EMA with the
    detached loss and returns loss / (ema + eps) (the gradient flows through `loss` only).
    The state is plain floats, saved in checkpoints so a resumed run continues identically.
    """

    def __init__(self, decay: float, eps: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.eps = decay, eps
        self.ema: dict[str, float] = {}
        self.last: dict[str, float] = {}  # latest normalised value per key

    def update(self, key: str, value: float) -> float:
        prev = self.ema.get(key)
        self.ema[key] = value if prev is None else self.decay * prev + (1.0 - self.decay) * value
        return self.ema[key]

    def normalise(self, key: str, loss: torch.Tensor) -> torch.Tensor:
        ema = self.update(key, float(loss.detach()))
        normalised = loss / (ema + self.eps)
        self.last[key] = float(normalised.detach())
        return normalised

    def merged(self, key: str, normalised: torch.Tensor) -> torch.Tensor:
        """Geometric mean over every key seen so far of its latest normalised loss.

        `normalised` (this step's live value for `key`) keeps its gradient; the other keys enter
        as constants. With one patch size per step this is the step's share of the geometric-mean
        objective: d(merged)/d(loss_key) = merged / (n * loss_key).
        """
        values = [normalised if k == key else normalised.new_tensor(v) for k, v in sorted(self.last.items())]
        return geometric_mean(torch.stack(values))

    def state_dict(self) -> dict:
        return {"ema": dict(self.ema), "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.ema = {str(k): float(v) for k, v in state["ema"].items()}
        self.last = {str(k): float(v) for k, v in state["last"].items()}


def dense_contrastive(e_a: torch.Tensor, e_b: torch.Tensor, idx: torch.Tensor, temperature: float,
                      same_image_negatives: bool = True, idx_b: Optional[torch.Tensor] = None,
                      max_negative_cos: float = 1.0) -> torch.Tensor:
    """Symmetric InfoNCE between aligned cells of two views, divided by log(#candidates).

    e_a, e_b: unit embeddings (B, D, h, w) already mapped to the same ground grid; idx (B, N) flat
    cells sampled per image. Cell i of view a must pick cell i of view b among all B * N sampled
    cells of view b (and vice versa). Near 0 for views that are perfectly matched and
    discriminative, about 1 for chance; the assignment losses alone are satisfied by colour-only
    clusters, this term makes the embedding tell apart cells that look alike in colour.

    With `same_image_negatives=False` the other cells of a cell's own image are masked out of its
    candidates (its positive stays): neighbours in one image are often the same land cover, and
    pushing them apart rewards features that separate instances rather than classes. The
    candidates are then the positive plus the (B - 1) * N cells of the other images.

    `idx_b` (B, N), default idx: where view b's cells are taken; e.g. `offset_positions(idx, ...)`
    makes each positive a *nearby* cell rather than the same one (Tile2Vec's prior: neighbouring
    ground is usually the same land cover), rewarding features that are constant over a region.

    `max_negative_cos` < 1 drops every negative whose cosine to the anchor exceeds it (measured
    without gradient): those are most likely the same land cover (false negatives), and pushing
    them away is what spreads one class over the sphere. The positive always stays; the loss is
    still divided by log of the full candidate count, so its scale does not depend on the masking.
    """
    idx_b = idx if idx_b is None else idx_b
    if idx_b.shape != idx.shape:
        raise ValueError(f"idx_b {tuple(idx_b.shape)} must have the shape of idx {tuple(idx.shape)}")
    a = gather_positions(e_a, idx).reshape(-1, e_a.shape[1])
    b = gather_positions(e_b, idx_b).reshape(-1, e_b.shape[1])
    cos = a @ b.T
    logits = cos / temperature
    target = torch.arange(len(a), device=a.device)
    candidates = len(a)
    if not same_image_negatives:
        n = idx.shape[1]
        image = target // n
        masked = (image[:, None] == image[None, :]) & (target[:, None] != target[None, :])
        logits = logits.masked_fill(masked, float("-inf"))
        candidates = len(a) - n + 1
    if max_negative_cos < 1.0:
        similar = (cos.detach() > max_negative_cos) & (target[:, None] != target[None, :])
        logits = logits.masked_fill(similar, float("-inf"))
    if candidates < 2:
        raise ValueError("the dense contrastive term needs at least two candidates per cell "
                         "(other-image negatives need a batch of at least two images)")
    ce = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    return ce / math.log(candidates)


def block_mask(batch: int, side: int, block: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, side, side) bool mask of whole `block` x `block`-cell squares on the grid of blocks
    (side // block per axis; the remainder at the bottom and right is never masked), round(ratio *
    blocks) of them per image, at least one, drawn without replacement."""
    per_axis = side // block
    if per_axis < 1:
        raise ValueError(f"a mask block of {block} cells does not fit a grid of side {side}")
    blocks = per_axis * per_axis
    n = max(1, round(ratio * blocks))
    mask = torch.zeros(batch, per_axis * per_axis, dtype=torch.bool)
    for i in range(batch):
        mask[i, torch.randperm(blocks, generator=generator)[:n]] = True
    mask = mask.reshape(batch, per_axis, per_axis).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return F.pad(mask, (0, side - per_axis * block, 0, side - per_axis * block))


def masked_prediction(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cos) in [0, 2] between unit embeddings `pred` of a masked input and `target`
    (B, D, h, w; the unmasked input's embeddings, no gradient) over the masked cells (B, h, w).
    Cells inside a masked block see only the context around it, so matching their unmasked
    embedding asks the network to infer a cover from its surroundings."""
    if not mask.any():
        raise ValueError("masked_prediction needs at least one masked cell")
    cos = (pred * target.detach()).sum(1)
    return (1.0 - cos)[mask.to(cos.device)].mean()


@torch.no_grad()
def sinkhorn_targets(probs: torch.Tensor, sharpen: float = 2.0, iters: int = 3) -> torch.Tensor:
    """Balanced soft cluster codes for assignment maps (B, k, h, w) (Sinkhorn-Knopp, as in SwAV).

    Starting from probs ** sharpen, rows (cells) and columns (clusters) are alternately normalised
    so that every cluster receives an equal share of the batch's cells: targets that cannot
    collapse onto a few clusters. Returns (B, k, h, w) codes summing to one per cell.
    """
    b, k, h, w = probs.shape
    q = probs.permute(1, 0, 2, 3).reshape(k, -1).double().clamp_min(1e-30) ** sharpen
    q = q / q.sum()
    n = q.shape[1]
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    q = (q * n).float()
    return q.reshape(k, b, h, w).permute(1, 0, 2, 3).contiguous()


def swapped_prediction(p_a: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """Each view predicts the other's balanced codes at the same ground pixels (cross-entropy / log k).

    p_a, p_b: aligned assignment maps (B, k, h, w). The codes (`sinkhorn_targets`) carry no gradient.
    """
    _check_probs(p_a, "p_a")
    return _swapped_cross_entropy(p_a, p_b, sinkhorn_targets(p_a), sinkhorn_targets(p_b))


def _swapped_cross_entropy(p_a: torch.Tensor, p_b: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor
                           ) -> torch.Tensor:
    """Mean of CE(q_b, p_a) and CE(q_a, p_b) per pixel over (B, k, h, w) maps, divided by log k."""
    ce = -(q_b * p_a.clamp_min(EPS).log()).sum(dim=1).mean() - (q_a * p_b.clamp_min(EPS).log()).sum(dim=1).mean()
    return 0.5 * ce / math.log(p_a.shape[1])


def self_distillation(p_a: torch.Tensor, p_b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor,
                      sharpen: float = 2.0) -> torch.Tensor:
    """Each view's assignments predict the *other* view's assignments under a slowly moving target
    network (DINO-style self-distillation), cross-entropy / log k.

    p_a, p_b: the online network's aligned maps (B, k, h, w); t_a, t_b: the target network's for
    the same views (no gradient), sharpened as t ** sharpen renormalised so that the online
    network is pulled towards more confident assignments than the target's.
    """
    _check_probs(p_a, "p_a")
    if not (p_a.shape == p_b.shape == t_a.shape == t_b.shape):
        raise ValueError(f"assignment shapes differ: {tuple(p_a.shape)}, {tuple(p_b.shape)}, "
                         f"{tuple(t_a.shape)}, {tuple(t_b.shape)}")
    q_a, q_b = (t.detach().clamp_min(EPS) ** sharpen for t in (t_a, t_b))
    return _swapped_cross_entropy(p_a, p_b, q_a / q_a.sum(dim=1, keepdim=True), q_b / q_b.sum(dim=1, keepdim=True))
