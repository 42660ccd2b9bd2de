"""Pseudo-labels for the teacher: one legend of colour-texture clusters over the whole training set.

The teacher's other terms act within a batch: two views of the same windows must agree, cells must
tell each other apart, clusters are the batch's soft k-means. Nothing ties a cover in one image to
the same cover in another, which is what one legend for a whole set of images needs. The hand-
crafted features of the k-means baseline (`stages.baselines.handcrafted_features`: blurred CIE Lab
and the local standard deviation of lightness) do carry that across images, if coarsely. So
before training they are clustered once, over windows drawn from every training tile, into
`PSEUDO_LABEL_CLUSTERS` clusters; every stride-4 cell of every training window gets the cluster
of its mean features, and the teacher's embedding must predict it through learned prototypes
(cross-entropy, weight `loss.pseudo_labels`). More clusters than covers, so that the network is
told which cells look alike across images without being told where the covers' borders are.

Units: windows and cells are in pixels of the training tiles; a cell is the 4 x 4 pixel block the
network's stride-4 output covers (the window sides are multiples of 4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.cluster import assign, kmeans
from stages.baselines import handcrafted_features

# 16 against 32 clusters, weights 0.3 and 1 (docs/experiments.md, "Pseudo-labels from the
# hand-crafted clusters")
PSEUDO_LABEL_CLUSTERS = 16
FIT_BATCHES = 64  # training batches whose cells the clusters are fitted on (64 x 8 windows)
FIT_SAMPLES = 100_000  # cells sampled from them for k-means
FIT_ITERS = 50
PROTOTYPE_TEMPERATURE = 0.1  # the cosine logits' temperature, that of the teacher's own head


def cell_features(batch_uint8: np.ndarray) -> np.ndarray:
    """uint8 windows (B, S, S, 3), S a multiple of 4 -> float32 (B, S/4, S/4, 4): the hand-crafted
    features of each window (computed on the window alone) averaged over every 4 x 4 cell."""
    if batch_uint8.ndim != 4 or batch_uint8.shape[1] != batch_uint8.shape[2] or batch_uint8.shape[1] % 4:
        raise ValueError(f"expected square uint8 windows (B, S, S, 3) with S a multiple of 4, got "
                         f"{batch_uint8.shape}")
    b, s = batch_uint8.shape[:2]
    f = np.stack([handcrafted_features(x).reshape(s, s, 4) for x in batch_uint8])
    return f.reshape(b, s // 4, 4, s // 4, 4, 4).mean(axis=(2, 4), dtype=np.float32)


class PseudoLabels:
    """The set's colour-texture legend: `k` k-means centres of `cell_features`, fitted on
    `FIT_BATCHES` batches of the training windows (`windows`, a `RandomWindowBatches` of its own
    seed); `targets(batch)` gives the cluster of every cell of a batch. Deterministic in the seed."""

    def __init__(self, windows, seed: int, k: int = PSEUDO_LABEL_CLUSTERS):
        rows = np.concatenate([cell_features(windows.batch(i)[0]).reshape(-1, 4) for i in range(FIT_BATCHES)])
        if len(rows) < k:
            raise ValueError(f"pseudo-labels: {len(rows)} training cells cannot make {k} clusters")
        pick = np.random.default_rng(seed).choice(len(rows), min(FIT_SAMPLES, len(rows)), replace=False)
        self.centres = kmeans(rows[pick], k, seed=seed, iters=FIT_ITERS)
        self.k = k

    @classmethod
    def from_sources(cls, sources: list[Path], patch_size: int, batch_size: int, seed: int) -> PseudoLabels:
        from stages.datasets import RandomWindowBatches

        return cls(RandomWindowBatches(sources, [patch_size], batch_size, seed, "cycle", True), seed)

    def targets(self, batch_uint8: np.ndarray) -> torch.Tensor:
        """int64 (B, S/4, S/4): the cluster of every cell, on the windows' own (source) grid."""
        f = cell_features(batch_uint8)
        return torch.from_numpy(assign(f.reshape(-1, 4), self.centres).reshape(f.shape[:3]).astype(np.int64))


class PseudoLabelHead(nn.Module):
    """`k` learned unit prototypes; logits are cosines with the unit embeddings over
    `PROTOTYPE_TEMPERATURE`. Trained beside the teacher, not part of it (never exported)."""

    def __init__(self, embed_dim: int, k: int = PSEUDO_LABEL_CLUSTERS, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.prototypes = nn.Parameter(torch.randn(k, embed_dim, generator=g))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """unit embeddings (B, D, h, w) -> logits (B, k, h, w)."""
        return torch.einsum("kd,bdhw->bkhw", F.normalize(self.prototypes, dim=1), emb) / PROTOTYPE_TEMPERATURE
