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
  exp(-|image difference| / sigma) so that label changes are cheap across image edges;
- `dense_contrastive`: InfoNCE on embeddings, a cell of one view must pick the same ground cell
  of the other view among the batch's sampled cells;

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

import torch
import torch.nn.functional as F

from stages.distributed import ONE_PROCESS, Ranks

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


def marginal_entropy(p: torch.Tensor, ranks: Ranks = ONE_PROCESS) -> torch.Tensor:
    """1 - H(mean assignment over the batch) / log k, in [0, 1]: zero = clusters used equally.

    With several ranks the mean is over the global batch (every rank's equal slice)."""
    _check_probs(p)
    marginal = ranks.mean(p.mean(dim=(0, 2, 3)))
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
                      ranks: Ranks = ONE_PROCESS) -> torch.Tensor:
    """Symmetric InfoNCE between aligned cells of two views, divided by log(#candidates).

    e_a, e_b: unit embeddings (B, D, h, w) already mapped to the same ground grid; idx (B, N) flat
    cells sampled per image. Cell i of view a must pick cell i of view b among all B * N sampled
    cells of view b (and vice versa). Near 0 for views that are perfectly matched and
    discriminative, about 1 for chance; the assignment losses alone are satisfied by colour-only
    clusters, this term makes the embedding tell apart cells that look alike in colour.

    With several ranks the candidates are the sampled cells of the global batch: each rank scores
    its own cells against every rank's, and the mean over ranks is the one-process value.
    """
    a = gather_positions(e_a, idx).reshape(-1, e_a.shape[1])
    b = gather_positions(e_b, idx).reshape(-1, e_b.shape[1])
    if len(a) * ranks.world_size < 2:
        raise ValueError("the dense contrastive term needs at least two sampled cells per batch")
    if not ranks.distributed:
        logits = a @ b.T / temperature
        target = torch.arange(len(a), device=a.device)
        ce = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return ce / math.log(len(a))
    a_all, b_all = ranks.gather(torch.cat([a, b], dim=1)).split(a.shape[1], dim=1)
    target = torch.arange(ranks.rank * len(a), (ranks.rank + 1) * len(a), device=a.device)
    ce = 0.5 * (F.cross_entropy(a @ b_all.T / temperature, target)
                + F.cross_entropy(b @ a_all.T / temperature, target))
    return ranks.mean(ce) / math.log(len(a_all))
