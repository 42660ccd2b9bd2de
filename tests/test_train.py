"""Teacher training end to end on tiny shards: outputs, logs, no collapse, resume == uninterrupted."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, tiny_training_params, train_tiny_teacher

from stages.checkpoints import TrainingError, load_teacher
from stages.params import TrainParams
from stages.train import main
from stages.training import Execution, embed_images, global_scores, load_labelled_split, selection_centres


def test_train_writes_teacher_logs_and_selects_best(tmp_path, tiny_shards):
    record = train_tiny_teacher(tmp_path, tiny_shards, tiny_training_params())
    teacher = load_teacher(tmp_path / "teacher")
    assert not teacher.training and teacher.head.prototypes.shape == (4, 8)
    assert record["metric"] == "metrics_train/miou" and record["step"] in (3, 6)
    assert 0.0 <= record["score"] <= 1.0
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["step"] == 6 and "consistency" in metrics["train"] and "miou" in metrics["val"]
    assert metrics["best/score"] == pytest.approx(record["score"])
    steps = (tmp_path / "results/plots/metrics/train/total.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in steps] == list(range(6))
    assert (tmp_path / "ckpt" / "last.pt").exists()


def test_val_max_tiles_selects_on_the_fixed_subset(tmp_path, tiny_shards, capsys):
    """train.val_max_tiles: selection scores only the stable subset (the kept teacher's score is
    recomputed on those tiles alone), and the log says so."""
    labelled = load_labelled_split(tiny_shards, max_tiles=1)
    full = load_labelled_split(tiny_shards)
    assert len(labelled.images) == 1 and labelled.split_tiles == len(full.images) == 4
    assert "model selection on 1 of the 4 metrics_train tiles" in capsys.readouterr().out
    record = train_tiny_teacher(tmp_path, tiny_shards, tiny_training_params(val_max_tiles=1))
    teacher = load_teacher(tmp_path / "teacher")
    embs = embed_images(teacher.encoder, labelled.images, torch.device("cpu"))
    again = global_scores(embs, labelled, teacher.head.temperature, teacher.smooth_iters, seed=0)
    assert record["score"] == pytest.approx(again["miou"], abs=1e-6)


def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_shards):
    params = tiny_training_params(steps=6)
    train_tiny_teacher(tmp_path / "full", tiny_shards, params)
    # "kill" after step 3: the last checkpoint is at step 2, step 3's work is lost
    assert train_tiny_teacher(tmp_path / "cut", tiny_shards, params, stop_after=3) == {"stopped_at": 3}
    assert not (tmp_path / "cut" / "teacher").exists()
    train_tiny_teacher(tmp_path / "cut", tiny_shards, params)
    full = torch.load(tmp_path / "full/teacher/model.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut/teacher/model.pt", weights_only=True)
    assert full["val"] == cut["val"]
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k
    last_full = torch.load(tmp_path / "full/ckpt/last.pt", weights_only=True)["model"]
    last_cut = torch.load(tmp_path / "cut/ckpt/last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, last_cut[k]) for k, v in last_full.items())
    # a second identical run writes byte-identical files (DVC hashes them; temporary names must
    # not leak into them)
    train_tiny_teacher(tmp_path / "again", tiny_shards, params)
    for name in ("ckpt/last.pt", "teacher/model.pt"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    # the resumed run's curves hold every step exactly once
    rows = (tmp_path / "cut/results/plots/metrics/train/total.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(6))
    assert rows == (tmp_path / "full/results/plots/metrics/train/total.tsv").read_text().splitlines()[1:]


def test_execution_settings_change_speed_only(tmp_path, tiny_shards):
    """Prefetching, the device name and the thread count are execution settings, not params. The
    first two leave the teacher the same bytes; torch's CPU kernels split their sums by thread, so
    another thread count moves the float rounding only: the same selected step and weights within
    1e-4 after 4 steps."""
    params = tiny_training_params(steps=4)
    runs = {"inline": Execution(device="cpu", threads=1), "prefetch": Execution(device="cpu", threads=1, prefetch=True),
            "auto": Execution(device="auto", threads=1), "two-threads": Execution(device="cpu", threads=2)}
    records = {name: train_tiny_teacher(tmp_path / name, tiny_shards, params, execution=e) for name, e in runs.items()}
    blobs = {name: (tmp_path / name / "teacher" / "model.pt").read_bytes() for name in runs}
    assert blobs["prefetch"] == blobs["inline"] == blobs["auto"]
    assert records["two-threads"]["step"] == records["inline"]["step"]
    one = torch.load(tmp_path / "inline" / "teacher" / "model.pt", weights_only=False)["state_dict"]
    two = torch.load(tmp_path / "two-threads" / "teacher" / "model.pt", weights_only=False)["state_dict"]
    for key, value in one.items():
        if value.is_floating_point():
            torch.testing.assert_close(two[key], value, atol=1e-4, rtol=0)


def test_execution_settings_come_from_the_environment_and_are_checked(monkeypatch):
    monkeypatch.setenv("LANDSEG_THREADS", "3")
    monkeypatch.setenv("LANDSEG_PREFETCH", "1")
    monkeypatch.setenv("LANDSEG_DEVICE", "cpu")
    assert Execution.from_env() == Execution(device="cpu", threads=3, prefetch=True)
    assert Execution.from_env(threads=1, prefetch=False) == Execution(device="cpu", threads=1)  # flags win
    for var, value, words in (("LANDSEG_THREADS", "two", "LANDSEG_THREADS must be an integer"),
                              ("LANDSEG_PREFETCH", "yes", "LANDSEG_PREFETCH must be 0 or 1"),
                              ("LANDSEG_DEVICE", "tpu", "device must be auto, cpu or cuda")):
        monkeypatch.setenv(var, value)
        with pytest.raises(TrainingError, match=words):
            Execution.from_env()
        monkeypatch.delenv(var)
    for key in ("device", "threads", "prefetch"):  # not DVC params: changing them reruns nothing
        assert key not in yaml.safe_load((REPO / "params.yaml").read_text())["train"]


def test_finished_checkpoint_is_not_resumed(tmp_path, tiny_shards, capsys):
    """DVC reruns a finished stage when its code changes, deleting its logs first: the run must
    train again and log every step, not 'resume' at the last step with nothing to log."""
    import shutil

    params = tiny_training_params(steps=4)
    train_tiny_teacher(tmp_path, tiny_shards, params)
    first = (tmp_path / "teacher/model.pt").read_bytes()
    shutil.rmtree(tmp_path / "results")
    shutil.rmtree(tmp_path / "teacher")
    train_tiny_teacher(tmp_path, tiny_shards, params)
    assert "holds a finished run" in capsys.readouterr().out  # tqdm.write prints to stdout
    rows = (tmp_path / "results/plots/metrics/train/total.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(4))
    assert (tmp_path / "teacher/model.pt").read_bytes() == first


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, tiny_shards, capsys):
    train_tiny_teacher(tmp_path, tiny_shards, tiny_training_params(steps=2))
    aug, model, loss, train = tiny_training_params(steps=2)
    train_tiny_teacher(tmp_path, tiny_shards, (aug, model, loss, TrainParams(**{**train.__dict__, "lr": 0.001})))
    out = capsys.readouterr()
    assert "starting over" in out.out + out.err


def test_no_cluster_collapse(tmp_path, tiny_shards):
    """After a short training at least half of the max_k clusters hold >= 2 % of validation pixels."""
    aug, model, loss, train = tiny_training_params(steps=12, val_every=12, checkpoint_every=12)
    train_tiny_teacher(tmp_path, tiny_shards, (aug, model, loss, train))
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["val"]["clusters_ge_2pct"] >= model.max_k // 2
    assert metrics["train"]["clusters_ge_2pct"] >= model.max_k // 2


def test_teacher_errors(tmp_path, tiny_shards):
    with pytest.raises(TrainingError, match="not found"):
        load_teacher(tmp_path / "missing")
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(TrainingError, match="not a teacher checkpoint"):
        load_teacher(bad)
    train_tiny_teacher(tmp_path, tiny_shards, tiny_training_params(steps=1, val_every=1))
    with pytest.raises(TrainingError, match="does not match"):
        load_teacher(tmp_path / "teacher", expect={"width": 999})
    blob = torch.load(tmp_path / "teacher" / "model.pt", weights_only=True)
    del blob["config"]["refine_head"]  # as written before the knob existed
    torch.save(blob, tmp_path / "old.pt")
    with pytest.raises(TrainingError, match=r"lacks architecture keys \['refine_head'\]"):
        load_teacher(tmp_path / "old.pt")
    aug, model, loss, train = tiny_training_params()
    with pytest.raises(TrainingError, match="multiple of 4"):
        train_tiny_teacher(tmp_path / "x", tiny_shards, (aug, model, loss, TrainParams(patch_size=30)))


def test_main_reports_missing_shards(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train: {steps: 1}\n")
    code = main(["--params", str(params), "--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t"),
                 "--checkpoints", str(tmp_path / "c"), "--results", str(tmp_path / "r"), "--no-progress"])
    assert code == 2
    assert "summary.json" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_selection_centres_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 5, generator=g), dim=1)
    x = torch.nn.functional.normalize(centres.repeat_interleave(50, 0) + 0.05 * torch.randn(150, 5, generator=g), dim=1)
    found = selection_centres(x, 3, seed=0)
    assert torch.allclose((found @ centres.T).max(dim=0).values, torch.ones(3), atol=0.01)


def test_contrastive_weight_schedule():
    from stages.train import contrastive_weight_at

    assert [contrastive_weight_at(s, 2.0, 0) for s in (0, 5, 10_000)] == [2.0, 2.0, 2.0]
    assert contrastive_weight_at(0, 2.0, 10) == 2.0
    assert abs(contrastive_weight_at(5, 2.0, 10) - 1.0) < 1e-12
    assert [contrastive_weight_at(s, 2.0, 10) for s in (10, 11, 500)] == [0.0, 0.0, 0.0]
    decaying = [contrastive_weight_at(s, 1.0, 10) for s in range(11)]
    assert all(a > b for a, b in zip(decaying, decaying[1:]))


def logged_terms(results: Path) -> dict[str, list[float]]:
    import csv

    logs = {}
    for f in (results / "plots/metrics/train").glob("*.tsv"):
        rows = list(csv.DictReader(f.open(), delimiter="\t"))
        logs[f.stem] = [float(r[f.stem]) for r in rows]
    return logs


def test_resolved_decay_steps():
    from stages.train import AUTO_DECAY_WITHOUT_LABELS, resolved_decay_steps

    assert [resolved_decay_steps(-1, True), resolved_decay_steps(-1, False)] == [0, AUTO_DECAY_WITHOUT_LABELS]
    assert [resolved_decay_steps(n, labelled) for n in (0, 7) for labelled in (True, False)] == [0, 0, 7, 7]


def test_without_labelled_tiles_the_contrastive_term_fades_by_default(tmp_path, tiny_shards, monkeypatch, capsys):
    """loss.contrastive_decay_steps = -1: a run selected by held-out loss fades the contrastive
    term out (over AUTO_DECAY_WITHOUT_LABELS steps, 2 here), a run with labelled tiles keeps it."""
    import shutil

    import stages.train as train_module

    monkeypatch.setattr(train_module, "AUTO_DECAY_WITHOUT_LABELS", 2)
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(tiny_shards / "train", unlabelled / "train")
    summary = json.loads((tiny_shards / "summary.json").read_text())
    summary["counts"] = {"train": summary["counts"]["train"], "metrics_train": 0, "val": 0}
    (unlabelled / "summary.json").write_text(json.dumps(summary))
    aug, model, loss, train = tiny_training_params(steps=3, val_every=3)
    assert loss.contrastive_decay_steps == -1  # the default
    others = ("consistency", "entropy", "marginal_entropy", "smoothness", "pseudo_labels")
    for name, root, weight_at_2 in (("unlabelled", unlabelled, 0.0), ("labelled", tiny_shards, loss.contrastive)):
        best = train_tiny_teacher(tmp_path / name, root, (aug, model, loss, train))
        logs = logged_terms(tmp_path / name / "results")
        total = weight_at_2 * logs["contrastive"][2] + sum(getattr(loss, t) * logs[t][2] for t in others)
        assert abs(logs["total"][2] - total) < 1e-4, name
        assert best["metric"] == ("heldout/neg_loss" if name == "unlabelled" else "metrics_train/miou")


def test_heldout_losses_are_the_mean_terms_over_fixed_batches(tiny_shards):
    """Without labelled tiles a run selects by minus the mean loss over HELDOUT_BATCHES fixed
    batches of held-out windows, each with its own fixed views: the same set twice, distinct
    batches; every term is averaged the same way."""
    from stages.augment import make_views
    from stages.checkpoints import build_teacher, teacher_config
    from stages.train import heldout_losses, teacher_losses
    from stages.training import HeldOutBatches, training_sources

    aug, model_params, loss, train = tiny_training_params()
    sources = training_sources(tiny_shards)
    heldout = HeldOutBatches(sources, train.patch_size, train.batch_size, seed=1, count=3)
    again = HeldOutBatches(sources, train.patch_size, train.batch_size, seed=1, count=3)
    assert len(heldout.batches) == 3 and heldout.batches[0].shape == (2, 32, 32, 3)
    assert all((a == b).all() for a, b in zip(heldout.batches, again.batches))
    assert not (heldout.batches[0] == heldout.batches[1]).all()
    torch.manual_seed(0)
    model = build_teacher(teacher_config(model_params)).eval()
    means, usage = heldout_losses(model, heldout, aug, loss, torch.device("cpu"))
    with torch.no_grad():
        terms = [teacher_losses(model, make_views(b, i, aug), loss, torch.Generator().manual_seed(i))
                 for i, b in enumerate(heldout.batches)]
    totals = [float(t["total"]) for t in terms]
    assert means["total"] == pytest.approx(sum(totals) / 3, abs=1e-6)
    assert set(means) == {name for name in terms[0] if not name.startswith("_")}
    for name in means:
        assert means[name] == pytest.approx(sum(float(t[name]) for t in terms) / 3, abs=1e-6), name
    assert len(set(totals)) == 3 and usage.shape == (4,) and usage.sum() == pytest.approx(1.0)


def test_contrastive_decay_drops_the_term_from_the_total(tmp_path, tiny_shards):
    """With loss.contrastive_decay_steps = 2 the logged total holds the contrastive term at full
    weight at step 0 and not at all from step 2 on (the other terms at their weights)."""
    import dataclasses as dc

    aug, model, loss, train = tiny_training_params(steps=3, val_every=3)
    loss = dc.replace(loss, contrastive_decay_steps=2)
    train_tiny_teacher(tmp_path, tiny_shards, (aug, model, loss, train))
    logs = logged_terms(tmp_path / "results")
    others = ("consistency", "entropy", "marginal_entropy", "smoothness", "pseudo_labels")

    def total_at(step: int, contrastive_weight: float) -> float:
        return (contrastive_weight * logs["contrastive"][step]
                + sum(getattr(loss, name) * logs[name][step] for name in others))

    assert logs["contrastive"][2] > 0.1
    assert abs(logs["total"][0] - total_at(0, loss.contrastive)) < 1e-4
    assert abs(logs["total"][2] - total_at(2, 0.0)) < 1e-4
    assert abs(logs["total"][2] - total_at(2, loss.contrastive)) > 1e-2
