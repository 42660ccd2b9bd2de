"""The networks: a teacher (`MonolithicSegmenter`) and a distilled student (`Encoder`).

Both are stride-4 CNN encoders built from one small vocabulary: conv (+ folded batch norm) +
ReLU, residual blocks, a 1x1 embedding conv and L2 normalisation. `Encoder.export_layers()`
describes an encoder as the explicit layer list that the numpy runtime executes (`runtime/`), with
batch norm folded into the convolution weights, so the artifact needs no torch to run.

Conventions shared with the runtime (and tested for numeric parity there):
- input: float32 (B, 3, H, W), normalised as (rgb / input_scale - input_mean) / input_std;
- every conv pads with zeros by kernel // 2, so a stride-2 conv maps H to ceil(H / 2)
  and the encoder maps H x W to ceil(H / 4) x ceil(W / 4) (cell (i, j) covers input pixels
  4i..4i+3, 4j..4j+3);
- `upsample_to` resizes stride-4 maps to full resolution with a *fixed* scale factor of 4
  (bilinear, half-pixel centres) and crops to H x W. A fixed scale keeps results
  translation-equivariant for offsets that are multiples of 4, which seamless tiling relies on;
- `smooth_probs` is a 3x3 mean over valid neighbours only (no zero padding), renormalised so each
  pixel's probabilities still sum to one at borders.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

STRIDE = 4
# ImageNet statistics are a neutral default for aerial RGB; they are stored in the artifact.
INPUT_SCALE = 255.0
INPUT_MEAN = (0.485, 0.456, 0.406)
INPUT_STD = (0.229, 0.224, 0.225)


def normalise_rgb(rgb_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) or float in 0..255 -> normalised float32 network input."""
    x = rgb_uint8.float() / INPUT_SCALE
    mean = torch.tensor(INPUT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ConvNormAct(nn.Module):
    """Conv2d with 'same'-style zero padding, optional batch norm, optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, norm: str = "batch",
                 act: str = "relu"):
        super().__init__()
        assert norm in ("batch", "none") and act in ("relu", "none")
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=(norm == "none"))
        self.norm = nn.BatchNorm2d(cout) if norm == "batch" else nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.relu(x) if self.act == "relu" else x


class ResidualBlock(nn.Module):
    """relu(x + conv_bn(drop(conv_bn_relu(x))))."""

    def __init__(self, width: int, norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        self.conv1 = ConvNormAct(width, width, 3, 1, norm, "relu")
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = ConvNormAct(width, width, 3, 1, norm, "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.drop(self.conv1(x))))


class Encoder(nn.Module):
    """Normalised RGB (B, 3, H, W) -> unit-length embeddings (B, D, ceil(H/4), ceil(W/4)).

    stem: two stride-2 3x3 convs (3 -> width/2 -> width); `depth` residual blocks at stride 4
    (each widens the receptive field by 16 input pixels); optional refinement (a residual block on
    the embeddings); 1x1 head to `embed_dim`; L2 norm.
    """

    def __init__(self, width: int, depth: int, embed_dim: int, norm: str = "batch",
                 dropout: float = 0.0, refine: bool = False):
        super().__init__()
        self.width, self.depth, self.embed_dim, self.norm = width, depth, embed_dim, norm
        half = max(width // 2, 8)
        self.stem = nn.Sequential(ConvNormAct(3, half, 3, 2, norm, "relu"),
                                  ConvNormAct(half, width, 3, 2, norm, "relu"))
        self.blocks = nn.Sequential(*[ResidualBlock(width, norm, dropout) for _ in range(depth)])
        self.head = nn.Conv2d(width, embed_dim, 1)
        # Learned refinement: a residual block over the embedding, before normalisation.
        self.refine = ResidualBlock(embed_dim, norm, 0.0) if refine else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised embeddings (B, D, h, w)."""
        x = self.head(self.blocks(self.stem(x)))
        return self.refine(x) if self.refine is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=1, eps=1e-12)

    @property
    def receptive_field(self) -> int:
        """Receptive field in input pixels of one output cell (used as the runtime's tile halo)."""
        rf, jump = 1, 1
        for _kernel, stride, dilation in self._conv_geometry():
            rf += dilation * (_kernel - 1) * jump
            jump *= stride
        return rf

    def _conv_geometry(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                yield m.kernel_size[0], m.stride[0], m.dilation[0]

    def export_layers(self) -> tuple[list[dict], dict[str, np.ndarray]]:
        """The runtime's layer list and float32 arrays, with batch norm folded into the convs.

        Ops: {"op": "conv", "name", "in", "out", "kernel", "stride", "dilation", "padding", "act"}
        with arrays `<name>.weight` (out, in, k, k) and `<name>.bias` (out,);
        {"op": "residual", "layers": [...], "act"} computing act(x + layers(x));
        {"op": "l2norm"} normalising channels to unit length (eps 1e-12).
        """
        arrays: dict[str, np.ndarray] = {}

        def conv(m: ConvNormAct | nn.Conv2d, name: str) -> dict:
            if isinstance(m, ConvNormAct):
                w, b = fold_batchnorm(m.conv, m.norm if isinstance(m.norm, nn.BatchNorm2d) else None)
                c, act = m.conv, m.act
            else:
                w, b = fold_batchnorm(m, None)
                c, act = m, "none"
            arrays[f"{name}.weight"], arrays[f"{name}.bias"] = w, b
            return {"op": "conv", "name": name, "in": c.in_channels, "out": c.out_channels,
                    "kernel": c.kernel_size[0], "stride": c.stride[0], "dilation": c.dilation[0],
                    "padding": c.padding[0], "act": act}

        def residual(block: ResidualBlock, name: str) -> dict:
            return {"op": "residual", "name": name, "act": "relu",
                    "layers": [conv(block.conv1, f"{name}.conv1"), conv(block.conv2, f"{name}.conv2")]}

        layers = [conv(m, f"stem.{i}") for i, m in enumerate(self.stem)]
        layers += [residual(b, f"blocks.{i}") for i, b in enumerate(self.blocks)]
        layers.append(conv(self.head, "head"))
        if self.refine is not None:
            layers.append(residual(self.refine, "refine"))
        layers.append({"op": "l2norm"})
        return layers, arrays


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[np.ndarray, np.ndarray]:
    """Conv (+ eval-mode batch norm) -> equivalent float32 (weight, bias) of a single conv."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale.view(-1, 1, 1, 1)
        b = (b - bn.running_mean.double()) * scale + bn.bias.double()
    return w.float().cpu().numpy(), b.float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Clustering head and the post-processing shared with the runtime
# --------------------------------------------------------------------------------------------


def soft_kmeans(emb: torch.Tensor, centres: torch.Tensor, temperature: float, iters: int,
                total: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical soft k-means on unit embeddings.

    emb: (N, D) unit rows; centres: (k, D) initial centres. Each iteration replaces the centres by
    the normalised probability-weighted mean. `total` sums the weighted rows over the processes
    of a distributed run (`stages.distributed.Ranks.sum`), so the centres are the global batch's.
    Returns (probs (N, k), centres (k, D)).
    """
    c = F.normalize(centres, dim=1)
    for _ in range(iters):
        p = torch.softmax(emb @ c.T / temperature, dim=1)
        sums = p.T @ emb
        c = F.normalize(sums if total is None else total(sums), dim=1, eps=1e-12)
    return torch.softmax(emb @ c.T / temperature, dim=1), c


class SoftKMeansHead(nn.Module):
    """`max_k` learnable prototypes (seeded), refined per batch by soft k-means iterations."""

    def __init__(self, embed_dim: int, max_k: int, temperature: float, iters: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(max_k, embed_dim, generator=g), dim=1))
        self.temperature, self.iters = temperature, iters

    def forward(self, emb: torch.Tensor, k: int | None = None,
                total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (B, D, h, w) unit -> probs (B, k, h, w) and the centres used (k, D).

        In training mode the (normalised) prototypes are the centres. Refining them on the batch
        while training has a collapsed fixed point: at a temperature above the spread of the
        embeddings soft k-means pulls every centre to the batch mean, all assignments turn
        uniform and the consistency loss is trivially zero. In eval mode the prototypes seed
        `iters` soft k-means iterations on the given embeddings (`total`: see `soft_kmeans`).
        """
        b, d, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(-1, d)
        protos = self.prototypes if k is None else self.prototypes[:k]
        probs, centres = soft_kmeans(flat, protos, self.temperature, 0 if self.training else self.iters, total)
        return probs.view(b, h, w, -1).permute(0, 3, 1, 2), centres


def smooth_probs(probs: torch.Tensor, iters: int) -> torch.Tensor:
    """3x3 mean over valid neighbours (no padding bias at borders), renormalised. (B, k, h, w)."""
    for _ in range(iters):
        probs = F.avg_pool2d(probs, 3, 1, 1, count_include_pad=False)
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return probs


def upsample_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Stride-4 map (B, C, h, w) -> (B, C, height, width), bilinear with a fixed scale of 4."""
    up = F.interpolate(x, scale_factor=STRIDE, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)
    return up[:, :, :height, :width]


class MonolithicSegmenter(nn.Module):
    """Teacher: encoder + soft k-means head. forward -> dict of embeddings and stride-4 probs."""

    def __init__(self, width: int, depth: int, embed_dim: int, max_k: int, temperature: float,
                 cluster_iters: int, smooth_iters: int = 0, refine_head: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = Encoder(width, depth, embed_dim, "batch", 0.0, refine_head)
        self.head = SoftKMeansHead(embed_dim, max_k, temperature, cluster_iters, seed)
        self.smooth_iters = smooth_iters

    @classmethod
    def from_params(cls, model) -> MonolithicSegmenter:
        """Build from a `stages.params.ModelParams`."""
        return cls(model.width, model.depth, model.embed_dim, model.max_k, model.temperature,
                   model.cluster_iters, model.smooth_iters, model.refine_head, model.seed)

    def forward(self, x: torch.Tensor, k: int | None = None) -> dict[str, torch.Tensor]:
        emb = self.encoder(x)
        probs, centres = self.head(emb, k)
        return {"embeddings": emb, "probs": probs, "centres": centres}

    @torch.no_grad()
    def predict_labels(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Full-resolution labels (B, H, W) from normalised input, with smoothing."""
        probs = smooth_probs(self.forward(x, k)["probs"], self.smooth_iters)
        return upsample_to(probs, x.shape[2], x.shape[3]).argmax(dim=1)


def student_from_params(student) -> Encoder:
    """Build the student from a `stages.params.StudentParams`."""
    return Encoder(student.width, student.depth, student.embed_dim, student.norm, student.dropout)


def count_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def output_size(size: int) -> int:
    """Stride-4 output length for an input length in pixels."""
    return math.ceil(math.ceil(size / 2) / 2)
