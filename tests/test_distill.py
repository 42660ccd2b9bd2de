"""Distillation end to end on tiny shards: student output, per-scale logs, teacher errors, resume."""

import json

import pytest
import torch
from conftest import distil, tiny_student, tiny_training_params

from stages.checkpoints import TrainingError, load_student, load_teacher
from stages.train_distill import main, train_student
from stages.training import Execution, embed_images, global_scores, load_labelled_split


def test_distill_writes_student_and_per_scale_logs(tmp_path, tiny_shards, teacher_dir):
    record = distil(tmp_path, tiny_shards, teacher_dir)
    student = load_student(tmp_path / "student")
    assert not student.training and student.embed_dim == 6
    assert record["metric"] == "metrics_train/miou" and record["step"] in (3, 6)
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())["distill"]
    for key in ("raw_p32", "raw_p48", "normalised_p32", "normalised_p48", "merged_geomean", "affinity"):
        assert key in metrics, key
    plots = tmp_path / "results/plots/metrics/distill"
    rows32 = (plots / "raw_p32.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows32] == [0, 2, 4]        # cycle: 32, 48, 32, ...


def test_val_max_tiles_selects_the_student_on_the_teachers_subset(tmp_path, tiny_shards, teacher_dir):
    """train.val_max_tiles also caps the student's selection: the kept student's score is its
    global mIoU on the same fixed subset the teacher was selected on."""
    _, model_params, loss, train = tiny_training_params(val_max_tiles=1)
    student, data, distill = tiny_student()
    record = train_student(tiny_shards, teacher_dir, tmp_path / "student", tmp_path / "ckpt", tmp_path / "results",
                           model_params, loss, student, data, distill, train, progress=False,
                           execution=Execution(device="cpu", threads=1))
    labelled = load_labelled_split(tiny_shards, max_tiles=1)
    teacher = load_teacher(teacher_dir)
    embs = embed_images(load_student(tmp_path / "student"), labelled.images, torch.device("cpu"))
    again = global_scores(embs, labelled, teacher.head.temperature, teacher.smooth_iters, seed=distill.seed)
    assert record["score"] == pytest.approx(again["miou"], abs=1e-6)


def test_distill_resume_equals_uninterrupted(tmp_path, tiny_shards, teacher_dir):
    distil(tmp_path / "full", tiny_shards, teacher_dir)
    assert distil(tmp_path / "cut", tiny_shards, teacher_dir, stop_after=5) == {"stopped_at": 5}
    distil(tmp_path / "cut", tiny_shards, teacher_dir)
    a = torch.load(tmp_path / "full/student/model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut/student/model.pt", weights_only=True)
    assert a["val"] == b["val"]
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    la = torch.load(tmp_path / "full/ckpt/last.pt", weights_only=True)
    lb = torch.load(tmp_path / "cut/ckpt/last.pt", weights_only=True)
    assert la["normaliser"] == lb["normaliser"]


def test_missing_or_mismatched_teacher_is_an_error(tmp_path, tiny_shards, teacher_dir):
    with pytest.raises(TrainingError, match="teacher checkpoint not found"):
        distil(tmp_path, tiny_shards, tmp_path / "no-teacher")
    _, model, _, _ = tiny_training_params()
    wider = type(model)(**{**model.__dict__, "width": 32})
    with pytest.raises(TrainingError, match="does not match the declared"):
        distil(tmp_path, tiny_shards, teacher_dir, model=wider)
    assert not (tmp_path / "student").exists()


def test_main_exit_code_on_missing_teacher(tmp_path, tiny_shards, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("ingest: {dataset: tiny}\n")
    code = main(["--params", str(params), "--shards", str(tiny_shards.parent), "--teacher", str(tmp_path / "none"),
                 "--out", str(tmp_path / "s"), "--checkpoints", str(tmp_path / "c"), "--results", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 2 and "teacher checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
