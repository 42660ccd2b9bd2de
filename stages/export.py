"""Stage `export`: the student (or the teacher, by `export.source`) -> model/best, the numpy artifact.

The encoder is turned into the runtime's explicit layer list with batch norm folded into the conv
weights (`Encoder.export_layers`), the clustering settings (temperature, soft k-means iterations,
smoothing, max_k) come from the teacher checkpoint that defined the clusters, and everything goes
through `runtime.artifact.write_artifact`, which validates the artifact exactly as the runtime's
loader does and writes it to a temporary directory that is renamed into place. `metrics.json` holds
the source model's validation score and the step it was reached at.

    python -m stages.export [--params params.yaml] [--teacher model/teacher] [--student model/student]
                            [--out model/best]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from runtime.artifact import build_meta, write_artifact
from runtime.command import run_command
from stages.checkpoints import TrainingError, read_student, read_teacher
from stages.model import INPUT_MEAN, INPUT_SCALE, INPUT_STD
from stages.params import ParamsError, load_params


def git_commit() -> str:
    """HEAD of the repository the stage runs in, with '+dirty' for uncommitted changes; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def training_pixel_size(t_info: dict, teacher_dir: Path) -> float | None:
    """The training tiles' ground sample distance (metres) recorded by `train`; None = unknown."""
    if "training_pixel_size_m" not in t_info:
        raise TrainingError(f"{teacher_dir}: the teacher checkpoint does not record the training pixel size "
                            "(written by an older train stage: rerun train)")
    return t_info["training_pixel_size_m"]


def training_input_rescale(t_info: dict, teacher_dir: Path) -> dict:
    """How the training data became 8-bit (`ingest.rescale`), from the teacher checkpoint."""
    if "input_rescale" not in t_info:
        raise TrainingError(f"{teacher_dir}: the teacher checkpoint does not record how its training data "
                            "were rescaled (written by an older train stage: rerun it)")
    return t_info["input_rescale"]


def export_model(source: str, teacher_dir: Path, student_dir: Path, out_dir: Path,
                 cue: dict | None = None, fit_temperature: float | None = None,
                 smooth_colour_sigma: float = 0.0, smooth_colour_floor: float = 0.0,
                 label_colour_sigma: float = 0.0) -> Path:
    """Write model/best from the chosen checkpoint; returns the artifact directory. `cue`: the
    texture cue appended before clustering (`ExportParams.cue`, runtime.cue), or None;
    `fit_temperature`: the soft k-means temperature when the runtime fits centres (None = the
    head's training temperature); `smooth_colour_sigma`, `smooth_colour_floor`: colour-guided smoothing of
    the cluster map (sigma 0 = plain smoothing); `label_colour_sigma`: colour-guided labels (0 = plain
    bilinear labels)."""
    teacher, t_info = read_teacher(teacher_dir)
    cfg = t_info["config"]
    if source == "student":
        encoder, info = read_student(student_dir)
        if info["teacher"]["fingerprint"] != t_info["fingerprint"]:
            raise TrainingError(f"{student_dir}: the student was distilled from another teacher than "
                                f"{teacher_dir} (rerun train_distill)")
    elif source == "teacher":
        encoder, info = teacher.encoder, t_info
    else:
        raise TrainingError(f"export.source must be 'student' or 'teacher', got {source!r}")
    layers, arrays = encoder.export_layers()
    meta = build_meta(embed_dim=encoder.embed_dim, max_k=cfg["max_k"], temperature=cfg["temperature"],
                      cluster_iters_default=cfg["cluster_iters"], smooth_iters_default=cfg["smooth_iters"],
                      input_mean=INPUT_MEAN, input_std=INPUT_STD, input_scale=INPUT_SCALE,
                      supports_learned_refine=encoder.refine is not None,
                      receptive_field=encoder.receptive_field, git_commit=git_commit(),
                      params_hash=info["fingerprint"], source=source,
                      training_pixel_size_m=training_pixel_size(t_info, teacher_dir),
                      input_rescale=training_input_rescale(t_info, teacher_dir), cue=cue,
                      fit_temperature=fit_temperature, smooth_colour_sigma=float(smooth_colour_sigma),
                      smooth_colour_floor=float(smooth_colour_floor),
                      label_colour_sigma=float(label_colour_sigma))
    val = info["val"]
    metrics = {"source": source, "val_metric": val["metric"], "val_score": val["score"], "val_step": val["step"],
               "teacher_val_score": t_info["val"]["score"]}
    return write_artifact(out_dir, layers=layers, arrays=arrays, meta=meta, metrics=metrics, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export the trained model to the numpy artifact (DVC stage `export`).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--teacher", default="model/teacher")
    ap.add_argument("--student", default="model/student")
    ap.add_argument("--out", default="model/best")
    args = ap.parse_args(argv)

    def run() -> int:
        p = load_params(args.params)
        dst = export_model(p.export.source, Path(args.teacher), Path(args.student), Path(args.out),
                           cue=p.export.cue(), fit_temperature=p.export.fit_temperature,
                           smooth_colour_sigma=p.export.smooth_colour_sigma,
                           smooth_colour_floor=p.export.smooth_colour_floor,
                           label_colour_sigma=p.export.label_colour_sigma)
        print(f"exported {p.export.source} to {dst}")
        return 0

    return run_command("export", run, errors=(ParamsError, TrainingError), interrupted=f"{args.out} left as it was")

if __name__ == "__main__":
    sys.exit(main())
