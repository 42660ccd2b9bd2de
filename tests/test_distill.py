"""Distillation end to end on tiny shards: student output, per-scale logs, teacher errors, resume."""

import json

import pytest
import torch
from test_train import run as run_teacher
from test_train import tiny_dataset, tiny_params  # noqa: F401  (session fixture)

from stages.checkpoints import TrainingError, load_student, load_teacher
from stages.params import DataParams, DistillParams, StudentParams
from stages.train_distill import main, train_student
from stages.training import Execution, embed_images, global_scores, load_labelled_split


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_dataset):  # noqa: F811
    tmp = tmp_path_factory.mktemp("teacher")
    run_teacher(tmp, tiny_dataset, tiny_params(steps=4, val_every=4))
    return tmp / "teacher"


def tiny_student(steps=6, **distill):
    d = dict(steps=steps, batch_size=2, val_every=3, checkpoint_every=2, affinity_samples=16)
    d.update(distill)
    return StudentParams(width=8, depth=1, embed_dim=6), DataParams(patch_sizes=[32, 48]), DistillParams(**d)


def distil(tmp, dataset, teacher_dir, params=None, model=None, **kw):
    _, model_params, loss, train = tiny_params()
    student, data, distill = params or tiny_student()
    kw.setdefault("execution", Execution(device="cpu", threads=1))
    return train_student(dataset, teacher_dir, tmp / "student", tmp / "ckpt", tmp / "results",
                         model or model_params, loss, student, data, distill, train, progress=False, **kw)


def test_distill_writes_student_and_per_scale_logs(tmp_path, tiny_dataset, teacher_dir):  # noqa: F811
    record = distil(tmp_path, tiny_dataset, teacher_dir)
    student = load_student(tmp_path / "student")
    assert not student.training and student.embed_dim == 6
    assert record["metric"] == "metrics_train/miou" and record["step"] in (3, 6)
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())["distill"]
    for key in ("raw_p32", "raw_p48", "normalised_p32", "normalised_p48", "merged_geomean", "affinity"):
        assert key in metrics, key
    plots = tmp_path / "results/plots/metrics/distill"
    rows32 = (plots / "raw_p32.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows32] == [0, 2, 4]        # cycle: 32, 48, 32, ...


def test_val_max_tiles_selects_the_student_on_the_teachers_subset(tmp_path, tiny_dataset, teacher_dir):  # noqa: F811
    """train.val_max_tiles also caps the student's selection: the kept student's score is its
    global mIoU on the same fixed subset the teacher was selected on."""
    _, model_params, loss, train = tiny_params(val_max_tiles=1)
    student, data, distill = tiny_student()
    record = train_student(tiny_dataset, teacher_dir, tmp_path / "student", tmp_path / "ckpt", tmp_path / "results",
                           model_params, loss, student, data, distill, train, progress=False,
                           execution=Execution(device="cpu", threads=1))
    labelled = load_labelled_split(tiny_dataset, max_tiles=1)
    teacher = load_teacher(teacher_dir)
    embs = embed_images(load_student(tmp_path / "student"), labelled.images, torch.device("cpu"))
    again = global_scores(embs, labelled, teacher.head.temperature, teacher.smooth_iters, seed=distill.seed)
    assert record["score"] == pytest.approx(again["miou"], abs=1e-6)


def test_distill_resume_equals_uninterrupted(tmp_path, tiny_dataset, teacher_dir):  # noqa: F811
    distil(tmp_path / "full", tiny_dataset, teacher_dir)
    assert distil(tmp_path / "cut", tiny_dataset, teacher_dir, stop_after=5) == {"stopped_at": 5}
    distil(tmp_path / "cut", tiny_dataset, teacher_dir)
    a = torch.load(tmp_path / "full/student/model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut/student/model.pt", weights_only=True)
    assert a["val"] == b["val"]
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    la = torch.load(tmp_path / "full/ckpt/last.pt", weights_only=True)
    lb = torch.load(tmp_path / "cut/ckpt/last.pt", weights_only=True)
    assert la["normaliser"] == lb["normaliser"]


def test_missing_or_mismatched_teacher_is_an_error(tmp_path, tiny_dataset, teacher_dir):  # noqa: F811
    with pytest.raises(TrainingError, match="teacher checkpoint not found"):
        distil(tmp_path, tiny_dataset, tmp_path / "no-teacher")
    _, model, _, _ = tiny_params()
    wider = type(model)(**{**model.__dict__, "width": 32})
    with pytest.raises(TrainingError, match="does not match the declared"):
        distil(tmp_path, tiny_dataset, teacher_dir, model=wider)
    assert not (tmp_path / "student").exists()


def test_main_exit_code_on_missing_teacher(tmp_path, tiny_dataset, capsys):  # noqa: F811
    params = tmp_path / "params.yaml"
    params.write_text("ingest: {dataset: tiny}\n")
    code = main(["--params", str(params), "--shards", str(tiny_dataset.parent), "--teacher", str(tmp_path / "none"),
                 "--out", str(tmp_path / "s"), "--checkpoints", str(tmp_path / "c"), "--results", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 2 and "teacher checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
