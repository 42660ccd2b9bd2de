"""The networks: shapes, batch-norm folding in export_layers, post-processing conventions."""

import pytest
import torch
import torch.nn.functional as F

from stages.model import Encoder, MonolithicSegmenter, output_size, smooth_probs, soft_kmeans, upsample_to


def run_layers(layers, arrays, x):
    """Execute an exported layer list with torch ops (reference for the folded weights)."""
    for op in layers:
        if op["op"] == "conv":
            w, b = torch.from_numpy(arrays[f"{op['name']}.weight"]), torch.from_numpy(arrays[f"{op['name']}.bias"])
            x = F.conv2d(x, w, b, op["stride"], op["padding"], op["dilation"])
            x = F.relu(x) if op["act"] == "relu" else x
        elif op["op"] == "residual":
            x = F.relu(x + run_layers(op["layers"], arrays, x))
        elif op["op"] == "l2norm":
            x = F.normalize(x, dim=1, eps=1e-12)
    return x


def _trained_looking(enc: Encoder) -> Encoder:
    """Give batch norms non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(0)
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return enc.eval()


@pytest.mark.parametrize("norm,refine", [("batch", False), ("batch", True), ("none", False)])
def test_export_layers_fold_batchnorm_exactly(norm, refine):
    enc = _trained_looking(Encoder(16, 2, 8, norm=norm, refine=refine))
    x = torch.randn(2, 3, 37, 50)
    layers, arrays = enc.export_layers()
    with torch.no_grad():
        ref = enc(x)
        got = run_layers(layers, arrays, x)
    assert got.shape == (2, 8, output_size(37), output_size(50)) == (2, 8, 10, 13)
    assert torch.allclose(got, ref, atol=1e-5)
    assert all(a.dtype.name == "float32" for a in arrays.values())


@pytest.mark.parametrize("depth,expected", [(1, 23), (2, 39), (3, 55)])
def test_receptive_field_matches_gradient_support(depth, expected):
    # stem: 7 px; each residual block adds two 3x3 convs at stride 4: 2 * 2 * 4 px
    enc = Encoder(8, depth, 4).eval()
    assert enc.receptive_field == expected
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0)).requires_grad_()
    enc.features(x)[0, :, 20, 20].sum().backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero().squeeze()
    assert rows.max() - rows.min() + 1 <= enc.receptive_field
    assert rows.max() - rows.min() + 1 > enc.receptive_field - 4  # the bound is tight (up to the stride)


def test_smooth_probs_stay_normalised_and_upsample_crops():
    p = torch.softmax(torch.randn(1, 5, 7, 9), dim=1)
    s = smooth_probs(p, 3)
    assert torch.allclose(s.sum(dim=1), torch.ones(1, 7, 9), atol=1e-6)
    up = upsample_to(s, 26, 35)
    assert up.shape == (1, 5, 26, 35)


def test_head_uses_prototypes_in_training_and_refines_in_eval():
    m = MonolithicSegmenter(16, 1, 8, 4, 0.1, 3, seed=0)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    out = m(x)
    assert torch.allclose(out["centres"], F.normalize(m.head.prototypes, dim=1))
    assert torch.allclose(out["probs"].sum(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    m.eval()
    emb = m.encoder(x)
    flat = emb.permute(0, 2, 3, 1).reshape(-1, 8)
    _, refined = soft_kmeans(flat, m.head.prototypes, 0.1, 3)
    assert torch.allclose(m(x)["centres"], refined)
    assert m.predict_labels(x, k=3).max() < 3


def test_seeded_construction_is_deterministic():
    a, b = MonolithicSegmenter(16, 1, 8, 4, 0.1, 1, seed=5), MonolithicSegmenter(16, 1, 8, 4, 0.1, 1, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
