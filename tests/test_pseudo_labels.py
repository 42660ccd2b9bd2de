"""Pseudo-labels of the teacher: the colour-texture legend, its targets, the loss term, resume."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_training_params, train_tiny_teacher
from test_train import logged_terms

from runtime.cluster import assign
from stages.baselines import handcrafted_features
from stages.pseudo_labels import PSEUDO_LABEL_CLUSTERS, PseudoLabelHead, PseudoLabels, cell_features
from stages.training import training_sources


def test_cell_features_are_block_means_of_each_windows_features():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    cells = cell_features(batch)
    assert cells.shape == (2, 4, 4, 4) and cells.dtype == np.float32
    f = handcrafted_features(batch[1]).reshape(16, 16, 4)
    assert np.allclose(cells[1, 2, 3], f[8:12, 12:16].mean(axis=(0, 1)), atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 4"):
        cell_features(batch[:, :14, :14])


def test_pseudo_labels_are_one_seeded_legend_over_the_training_windows(tiny_shards):
    _, _, _, train = tiny_training_params()
    sources = training_sources(tiny_shards)
    labels = PseudoLabels.from_sources(sources, train.patch_size, train.batch_size, seed=2)
    again = PseudoLabels.from_sources(sources, train.patch_size, train.batch_size, seed=2)
    other = PseudoLabels.from_sources(sources, train.patch_size, train.batch_size, seed=3)
    assert labels.centres.shape == (PSEUDO_LABEL_CLUSTERS, 4)
    assert np.array_equal(labels.centres, again.centres) and not np.array_equal(labels.centres, other.centres)
    batch = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    targets = labels.targets(batch)
    assert targets.shape == (3, 8, 8) and targets.dtype == torch.int64
    expected = assign(cell_features(batch).reshape(-1, 4), labels.centres).reshape(3, 8, 8)
    assert np.array_equal(targets.numpy(), expected)


def test_pseudo_label_head_gives_cosine_logits():
    head = PseudoLabelHead(embed_dim=8, k=5, seed=0)
    emb = torch.nn.functional.normalize(torch.randn(2, 8, 3, 3), dim=1)
    logits = head(emb)
    assert logits.shape == (2, 5, 3, 3)
    assert logits.abs().max() <= 1.0 / 0.1 + 1e-4  # |cos| <= 1 over the temperature


def test_the_pseudo_label_term_enters_the_total_and_resumes_exactly(tmp_path, tiny_shards):
    """loss.pseudo_labels > 0: the logged total holds the term at its weight, and a run killed and
    resumed ends where an uninterrupted one does (the head is in the checkpoint)."""
    aug, model, loss, train = tiny_training_params(steps=6)
    loss = dataclasses.replace(loss, pseudo_labels=0.5)
    params = (aug, model, loss, train)
    train_tiny_teacher(tmp_path / "full", tiny_shards, params)
    logs = logged_terms(tmp_path / "full" / "results")
    others = ("contrastive", "consistency", "entropy", "marginal_entropy", "smoothness", "pseudo_labels")
    for step in (0, 5):
        total = sum(getattr(loss, name) * logs[name][step] for name in others)
        assert abs(logs["total"][step] - total) < 1e-4
    assert logs["pseudo_labels"][0] > 0.5  # cross-entropy over 16 clusters starts near log 16
    assert train_tiny_teacher(tmp_path / "cut", tiny_shards, params, stop_after=3) == {"stopped_at": 3}
    train_tiny_teacher(tmp_path / "cut", tiny_shards, params)
    full = torch.load(tmp_path / "full/teacher/model.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut/teacher/model.pt", weights_only=True)
    assert full["val"] == cut["val"]
    assert all(torch.equal(v, cut["state_dict"][k]) for k, v in full["state_dict"].items())
    assert not any("pseudo" in k for k in full["state_dict"])  # the head is not part of the teacher
    # without the term, the same run differs
    train_tiny_teacher(tmp_path / "off", tiny_shards, tiny_training_params(steps=6))
    off = torch.load(tmp_path / "off/teacher/model.pt", weights_only=True)
    assert not all(torch.equal(v, off["state_dict"][k]) for k, v in full["state_dict"].items())


def test_heldout_losses_include_the_pseudo_label_term(tiny_shards):
    from stages.augment import make_views
    from stages.checkpoints import build_teacher, teacher_config
    from stages.train import heldout_losses, teacher_losses
    from stages.training import HeldOutBatches

    aug, model_params, loss, train = tiny_training_params()
    loss = dataclasses.replace(loss, pseudo_labels=0.5)
    sources = training_sources(tiny_shards)
    heldout = HeldOutBatches(sources, train.patch_size, train.batch_size, seed=1, count=2)
    labels = PseudoLabels.from_sources(sources, train.patch_size, train.batch_size, seed=2)
    targets = [labels.targets(b) for b in heldout.batches]
    torch.manual_seed(0)
    model = build_teacher(teacher_config(model_params)).eval()
    head = PseudoLabelHead(model_params.embed_dim, labels.k)
    means, _ = heldout_losses(model, heldout, aug, loss, torch.device("cpu"), (head, targets))
    plain, _ = heldout_losses(model, heldout, aug, loss, torch.device("cpu"))
    score = -means["total"]
    with torch.no_grad():
        terms = [teacher_losses(model, make_views(b, i, aug), loss, torch.Generator().manual_seed(i),
                                pseudo=(head, t)) for i, (b, t) in enumerate(zip(heldout.batches, targets))]
    assert score == pytest.approx(-sum(float(t["total"]) for t in terms) / 2, abs=1e-6)
    assert -plain["total"] - score == pytest.approx(0.5 * sum(float(t["pseudo_labels"]) for t in terms) / 2,
                                                    abs=1e-5)
