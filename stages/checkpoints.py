"""The files the training stages write and read: the teacher's and the student's `model.pt`
(weights, architecture, validation record and provenance) and the resumable state in
model/checkpoints/<stage>/last.pt. `export` and `evaluate` load the networks through here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.destination import atomic_file, atomic_folder
from stages.model import Encoder, MonolithicSegmenter
from stages.params import ModelParams, StudentParams

TEACHER_FORMAT = "landseg-teacher"


CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """Bad input to a training stage: missing data, checkpoint or teacher, or a mismatch."""


def atomic_torch_save(obj: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename (never a half-written file).

    Serialised through memory: torch.save names the zip archive inside after the file it writes,
    and the temporary name would make identical checkpoints differ byte for byte.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_file(path, overwrite=True, what="checkpoint") as tmp:
        tmp.write_bytes(buf.getvalue())


def write_output_dir(dst: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Write each file with its writer into a temporary directory beside `dst`, then swap it in."""
    with atomic_folder(dst, what="model folder") as tmp:
        for name, write in files.items():
            write(tmp / name)


def load_checkpoint(path: Path, fingerprint: str, total_steps: int) -> dict | None:
    """The resumable state at `path` if it was written under the same fingerprint by a run that
    did not finish, else None.

    A finished run's checkpoint is not resumed: DVC reruns a stage only when something changed
    (its code, say) and deletes the stage's logs first, so "resuming" at the last step would
    produce no logs and train nothing under the new code.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so, never resume from it
        raise TrainingError(f"{path}: cannot read checkpoint ({e}); delete it to start over") from None
    if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != fingerprint:
        tqdm.write(f"{path}: written under other params or data; starting over")
        return None
    if int(state.get("step", 0)) >= total_steps:
        tqdm.write(f"{path}: holds a finished run of {total_steps} steps; starting over")
        return None
    return state


def run_fingerprint(*groups, data_hash: str) -> str:
    """Identity of a run: the params that shape its results and the data."""
    blobs = [dataclasses.asdict(g) for g in groups]
    blob = json.dumps([blobs, str(data_hash)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def teacher_config(model_params: ModelParams) -> dict:
    """The architecture stored with a teacher checkpoint: every `model` knob."""
    return dataclasses.asdict(model_params)


def build_teacher(config: dict) -> MonolithicSegmenter:
    return MonolithicSegmenter(config["width"], config["depth"], config["embed_dim"], config["max_k"],
                               config["temperature"], config["cluster_iters"], config["smooth_iters"],
                               config["refine_head"], config["seed"])


def _read_model_file(path: str | Path, fmt: str, what: str, stage: str, fields) -> tuple[Path, dict]:
    """(path, contents) of a `model.pt` (or its directory) of format `fmt`, its config holding every
    field of the `fields` dataclass; TrainingError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise TrainingError(f"{path}: {what} checkpoint not found (run the {stage} stage first)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path}: cannot read {what} checkpoint ({e})") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise TrainingError(f"{path}: not a {what} checkpoint (format {found!r}, expected {fmt!r})")
    missing = sorted({f.name for f in dataclasses.fields(fields)} - set(blob.get("config") or {}))
    if missing:
        raise TrainingError(f"{path}: {what} checkpoint lacks architecture keys {missing} (written by an "
                            f"older version; rerun the {stage} stage)")
    return path, blob


def _with_weights(model: torch.nn.Module, blob: dict, path: Path, what: str):
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise TrainingError(f"{path}: weights do not match the {what} architecture {blob['config']}: {e}") from None
    return model.eval()


def _info(blob: dict) -> dict:
    return {k: v for k, v in blob.items() if k != "state_dict"}


def read_teacher(path: str | Path, expect: dict | None = None) -> tuple[MonolithicSegmenter, dict]:
    """The trained teacher from `model/teacher/model.pt` (or its directory), in eval mode, and
    what is stored with it: config, validation record, provenance (no weights), from one read.

    `expect`: optional architecture (as `teacher_config`) the file must match. Raises TrainingError
    when the file is missing, not a teacher checkpoint, or does not match.
    """
    path, blob = _read_model_file(path, TEACHER_FORMAT, "teacher", "train", ModelParams)
    config = blob["config"]
    if expect is not None:
        diff = {k: (config.get(k), v) for k, v in expect.items() if config.get(k) != v}
        if diff:
            raise TrainingError(f"{path}: teacher architecture does not match the declared one "
                                f"(key: (file, declared)): {diff}")
    return _with_weights(build_teacher(config), blob, path, "teacher"), _info(blob)


def load_teacher(path: str | Path, expect: dict | None = None) -> MonolithicSegmenter:
    """The teacher of `read_teacher`."""
    return read_teacher(path, expect)[0]


def teacher_info(path: str | Path) -> dict:
    """Config, validation record and provenance stored with a teacher checkpoint (no weights)."""
    return read_teacher(path)[1]


STUDENT_FORMAT = "landseg-student"


def student_config(student: StudentParams) -> dict:
    """The architecture stored with a student checkpoint: every `student` knob."""
    return dataclasses.asdict(student)


def read_student(path: str | Path) -> tuple[Encoder, dict]:
    """The distilled student from `model/student/model.pt` (or its directory), in eval mode, and
    its config, validation record and teacher settings, from one read."""
    path, blob = _read_model_file(path, STUDENT_FORMAT, "student", "train_distill", StudentParams)
    c = blob["config"]
    model = Encoder(c["width"], c["depth"], c["embed_dim"], c["norm"], c["dropout"])
    return _with_weights(model, blob, path, "student"), _info(blob)


def load_student(path: str | Path) -> Encoder:
    """The student of `read_student`."""
    return read_student(path)[0]


def student_info(path: str | Path) -> dict:
    """Config, validation record and teacher settings stored with a student checkpoint."""
    return read_student(path)[1]
