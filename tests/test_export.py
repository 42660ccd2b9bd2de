"""Export to the numpy artifact: the runtime reproduces the torch student (and teacher)."""

import json

import numpy as np
import pytest
import torch
from conftest import distil, tiny_student

import runtime
from stages.checkpoints import TrainingError, load_student, load_teacher
from stages.datasets import TileDataset
from stages.export import export_model, main
from stages.model import normalise_rgb, smooth_probs, upsample_to
from stages.training import selection_centres


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_shards, teacher_dir):
    tmp = tmp_path_factory.mktemp("student")
    distil(tmp, tiny_shards, teacher_dir, params=tiny_student(steps=4, val_every=4))
    return tmp / "student"


def torch_labels(encoder, rgb, centres, temperature, smooth_iters):
    x = normalise_rgb(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    with torch.no_grad():
        emb = encoder(x)
        probs = torch.softmax(torch.einsum("bdhw,kd->bkhw", emb, centres) / temperature, dim=1)
        probs = upsample_to(smooth_probs(probs, smooth_iters), *rgb.shape[:2])
    return emb[0].numpy(), probs[0].argmax(dim=0).numpy()


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_runtime_matches_torch(tmp_path, tiny_shards, teacher_dir, student_dir, source):
    out = export_model(source, teacher_dir, student_dir, tmp_path / "best")
    model = runtime.load_model(out)
    teacher = load_teacher(teacher_dir)
    encoder = load_student(student_dir) if source == "student" else teacher.encoder
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == source and meta["temperature"] == teacher.head.temperature
    assert meta["training_pixel_size_m"] == 0.6  # the train split's GSD in the shards summary, via the teacher
    assert meta["input_rescale"] == {"mode": "none", "limits": None}  # ingest's record, via shards and teacher
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_score", "val_step", "val_metric"} <= set(metrics)
    images = [TileDataset(tiny_shards, "val")[i]["image"] for i in range(2)]
    # sizes not divisible by the stride, image borders included
    crops = [images[0], np.ascontiguousarray(images[1][3:, 5:62])]
    matched, total = 0, 0
    for rgb in crops:
        emb_torch, _ = torch_labels(encoder, rgb, torch.eye(encoder.embed_dim)[:3], 1.0, 0)
        emb_np = model.embed(rgb)
        assert emb_np.shape == emb_torch.shape
        assert np.abs(emb_np - emb_torch).max() < 1e-4
        centres = selection_centres(torch.from_numpy(emb_torch.reshape(emb_torch.shape[0], -1).T.copy()), 4, seed=0)
        _, lab_torch = torch_labels(encoder, rgb, centres, meta["temperature"], meta["smooth_iters_default"])
        lab_np = model.predict_labels(rgb, 4, centres=centres.numpy())
        matched += int((lab_np == lab_torch).sum())
        total += lab_np.size
    assert matched / total >= 0.999


def test_export_refuses_student_of_another_teacher(tmp_path, tiny_shards, teacher_dir, student_dir):
    blob = torch.load(student_dir / "model.pt", weights_only=True)
    blob["teacher"]["fingerprint"] = "another"
    (tmp_path / "student").mkdir()
    torch.save(blob, tmp_path / "student" / "model.pt")
    with pytest.raises(TrainingError, match="another teacher"):
        export_model("student", teacher_dir, tmp_path / "student", tmp_path / "best")
    assert not (tmp_path / "best").exists()


def test_main_missing_student(tmp_path, teacher_dir, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("export: {source: student}\n")
    code = main(["--params", str(params), "--teacher", str(teacher_dir), "--student", str(tmp_path / "none"),
                 "--out", str(tmp_path / "best")])
    assert code == 2 and "student checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "best").exists()


def test_export_records_the_cue_and_evaluate_gives_it_to_the_teacher(tmp_path, teacher_dir, student_dir):
    from stages.evaluate import teacher_model
    from stages.params import ExportParams

    cue = ExportParams(cue_size=15, cue_scale=3.6).cue()
    assert ExportParams().cue() is None  # the default exports no cue
    out = export_model("student", teacher_dir, student_dir, tmp_path / "best", cue=cue)
    model = runtime.load_model(out)
    assert json.loads((out / "meta.json").read_text())["cue"] == {"kind": "dark_tophat", "size": 15, "scale": 3.6}
    assert model.cluster_dim == model.embed_dim + 1
    teacher = teacher_model(teacher_dir, cue=model.meta["cue"])
    assert teacher.cluster_dim == teacher.embed_dim + 1
    assert model.fit_temperature == model.temperature  # not given: the head's training temperature
    rgb = np.full((40, 36, 3), 90, np.uint8)
    assert model.embed_cells(rgb).shape == (10, 9, model.embed_dim + 1)


def test_export_records_fit_temperature_and_evaluate_gives_it_to_the_teacher(tmp_path, teacher_dir, student_dir):
    from stages.evaluate import teacher_model
    from stages.params import ExportParams

    t = ExportParams().fit_temperature
    out = export_model("student", teacher_dir, student_dir, tmp_path / "best", fit_temperature=t)
    model = runtime.load_model(out)
    assert json.loads((out / "meta.json").read_text())["fit_temperature"] == t == model.fit_temperature
    assert model.temperature != t
    assert teacher_model(teacher_dir, fit_temperature=model.meta["fit_temperature"]).fit_temperature == t
