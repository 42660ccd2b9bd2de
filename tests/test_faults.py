"""Bad input and faults against every command, as a table: one line per case.

Each case runs one command (`python -m runtime segment|fit-centres|info` or a pipeline stage) in
a fresh copy of a small world (a random-weight model, rasters good and bad, tiny ingested and
sharded data, params files) and checks its exit status, words of its message, that no traceback
was printed, what must not exist afterwards and what must be left unchanged. Signal and kill
cases run the command in a subprocess (further down).

Adding a case is one line in CASES: Case(id, command line, exit status, words, absent=...,
unchanged=..., setup=...). Paths are relative to the world folder; an `absent` pattern starting
with '**/' is searched in the whole test folder, above the world too (for paths that escape it).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from conftest import tiny_raw
from rasterio.transform import from_origin
from runtime_fixtures import random_encoder, synthetic_rgb, write_encoder_artifact, write_raster

from stages.checkpoints import TEACHER_FORMAT, build_teacher, teacher_config
from stages.params import ModelParams

REPO = Path(__file__).resolve().parents[1]
WORLD = Path("deep", "er", "world")  # the world's place in each case's folder: '..' steps land in it


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # first word: segment, fit-centres, info or a stage name; the rest its arguments
    code: int
    words: tuple[str, ...] = ()  # each must appear in stderr
    absent: tuple[str, ...] = ()  # glob patterns that must match nothing afterwards
    unchanged: tuple[str, ...] = ()  # files whose bytes (or kind, for a FIFO) must stay as they were
    setup: Callable[[Path], object] | None = None  # prepares the world; may return a clean-up callable


# -- setups ------------------------------------------------------------------------------------

def edit_yaml(path: str, **changes) -> Callable[[Path], None]:
    """Set dotted keys of a YAML file (`train.lr=...`)."""
    def setup(w: Path) -> None:
        p = w / path
        raw = yaml.safe_load(p.read_text()) or {}
        for key, value in changes.items():
            node = raw
            *parents, leaf = key.split("__")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = value
        p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return setup


def write_text(path: str, text: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / path).parent.mkdir(parents=True, exist_ok=True)
        (w / path).write_text(text)
    return setup


def edit_first_json_line(path: str, **changes) -> Callable[[Path], None]:
    """Change keys of the first record of a .jsonl file (a manifest or a shard index)."""
    def setup(w: Path) -> None:
        p = next(w.glob(path))
        lines = p.read_text().splitlines()
        record = json.loads(lines[0])
        record.update(changes)
        p.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    return setup


def fifo(path: str) -> Callable[[Path], None]:
    return lambda w: os.mkfifo(w / path)


def char_device(path: str) -> Callable[[Path], None]:
    """A character device like /dev/null (made in the world, so that a writer that replaced it would
    replace only the copy)."""
    def setup(w: Path) -> None:
        try:
            os.mknod(w / path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError as e:
            pytest.skip(f"cannot make a device node here: {e}")
    return setup


def link(path: str, target: str) -> Callable[[Path], None]:
    return lambda w: os.symlink(w / target, w / path)


def truncate(path: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        data = (w / path).read_bytes()
        (w / path).write_bytes(data[: len(data) // 2])
    return setup


def both(*setups) -> Callable[[Path], None]:
    def setup(w: Path):
        cleanups = [s(w) for s in setups]
        return lambda: [c() for c in cleanups if callable(c)]
    return setup


def read_only_mount(path: str) -> Callable[[Path], Callable[[], None]]:
    """A read-only tmpfs at `path` (needs root, as CI runs; skipped where mounting is not allowed)."""
    def setup(w: Path):
        target = w / path
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a read-only file system here: {done.stderr.decode().strip()}")
        return lambda: subprocess.run(["umount", str(target)], check=True)
    return setup


SEG = "segment in.tif out.tif --k 4 --model model/best --quiet"
FIT = "fit-centres in.tif in2.tif --k 4 --model model/best --out shared.npy --quiet"
PWNED = ("**/PWNED*",)

CASES = [
    # -- segment: the raster -------------------------------------------------------------------
    Case("segment-good-input", SEG, 0, absent=(".out.tif.*",)),
    Case("segment-missing-input", SEG.replace("in.tif", "nope.tif", 1), 2, ("nope.tif", "GDAL cannot read"), ("out.tif",)),
    Case("segment-not-a-raster", SEG.replace("in.tif", "garbage.tif", 1), 2, ("garbage.tif", "GDAL cannot read"), ("out.tif", ".out.tif.*")),
    Case("segment-truncated-raster", SEG.replace("in.tif", "trunc.tif", 1), 2, ("trunc.tif", "IReadBlock failed"), ("out.tif", ".out.tif.*")),
    Case("segment-one-band", SEG.replace("in.tif", "gray.tif", 1), 2, ("has 1 band(s)", "at least 3 bands"), ("out.tif",)),
    Case("segment-four-bands-unsaid", SEG.replace("in.tif", "rgbn.tif", 1), 2, ("has 4 bands", "--bands 1,2,3"), ("out.tif",)),
    Case("segment-band-out-of-range", SEG.replace("in.tif", "rgbn.tif", 1) + " --bands 1,2,5", 2, ("[5] out of range", "bands 1..4"), ("out.tif",)),
    Case("segment-two-bands-given", SEG + " --bands 1,2", 2, ("three band numbers",), ("out.tif",)),
    Case("segment-bands-not-numbers", SEG + " --bands r,g,b", 2, ("expected band numbers like 1,2,3",), ("out.tif",)),
    Case("segment-complex-raster", SEG.replace("in.tif", "complex.tif", 1), 2, ("complex", "not RGB imagery"), ("out.tif",)),
    Case("segment-16bit-rescale-none", SEG.replace("in.tif", "u16.tif", 1) + " --rescale none", 2, ("uint16", "needs 8-bit"), ("out.tif",)),
    Case("segment-rescale-bad-limits", SEG + " --rescale 1,2,3", 2, ("LOW,HIGH or six numbers",), ("out.tif",)),
    Case("segment-rescale-nan-limits", SEG + " --rescale nan,nan", 2, ("low < high",), ("out.tif",)),
    Case("segment-constant-16bit", SEG.replace("in.tif", "const16.tif", 1), 2, ("band 1", "constant", "2 % and 98 % percentiles"), ("out.tif",)),
    Case("segment-all-nodata", SEG.replace("in.tif", "nodata.tif", 1), 2, ("too few valid",), ("out.tif", ".out.tif.*")),
    Case("segment-17x-coarser-auto", SEG.replace("in.tif", "coarse.tif", 1), 2, ("17.0x coarser", "289x the pixels", "--pixel-size native"), ("out.tif",)),
    Case("segment-17x-coarser-native", SEG.replace("in.tif", "coarse.tif", 1) + " --pixel-size native", 0),
    Case("segment-pixel-size-nan", SEG + " --pixel-size nan", 2, ("auto, native or a positive number",), ("out.tif",)),
    Case("segment-pixel-size-negative", SEG + " --pixel-size -1", 2, ("auto, native or a positive number",), ("out.tif",)),
    Case("segment-raster-size-with-crs", SEG + " --raster-pixel-size 0.5", 2, ("has a CRS",), ("out.tif",)),
    # -- segment: the model and the settings ---------------------------------------------------
    Case("segment-k-too-small", SEG.replace("--k 4", "--k 1"), 2, ("k must be an integer in 2..8",), ("out.tif",)),
    Case("segment-k-too-large", SEG.replace("--k 4", "--k 99"), 2, ("k must be an integer in 2..8",), ("out.tif",)),
    Case("segment-k-missing", SEG.replace("--k 4", ""), 2, ("the following arguments are required: --k",), ("out.tif",)),
    Case("segment-model-missing", SEG.replace("--model model/best", "--model nomodel"), 2, ("nomodel", "artifact directory not found"), ("out.tif",)),
    Case("segment-model-truncated", SEG, 2, ("model.npz", "truncated"), ("out.tif",), setup=truncate("model/best/model.npz")),
    Case("segment-meta-corrupt", SEG, 2, ("meta.json", "not readable JSON"), ("out.tif",), setup=write_text("model/best/meta.json", "{oops")),
    Case("segment-tile-not-multiple-of-4", SEG + " --tile 30", 2, ("multiple of 4",), ("out.tif",)),
    Case("segment-tile-too-small", SEG + " --tile 8", 2, ("tile must be an integer >= 16",), ("out.tif",)),
    Case("segment-samples-below-k", SEG + " --samples 2", 2, ("samples must be an integer >= 4",), ("out.tif",)),
    Case("segment-smooth-negative", SEG + " --smooth-iters -1", 2, ("smooth_iters must be an integer >= 0",), ("out.tif",)),
    Case("segment-artifact-centres-absent", SEG + " --centres artifact", 2, ("no precomputed centres", "it has none"), ("out.tif",)),
    Case("segment-centres-file-missing", SEG + " --centres none.npy", 2, ("none.npy", "cannot read centres"), ("out.tif",)),
    Case("segment-centres-wrong-shape", SEG + " --centres bad_centres.npy", 2, ("centres must have shape",), ("out.tif",)),
    Case("segment-centres-not-npy", SEG + " --centres garbage.tif", 2, ("garbage.tif: not a .npy file",), ("out.tif",)),
    # -- segment: the destination ----------------------------------------------------------------
    Case("segment-output-exists", SEG, 2, ("out.tif", "exists", "--overwrite"), unchanged=("out.tif",),
         setup=write_text("out.tif", "keep me")),
    Case("segment-output-exists-overwrite", SEG + " --overwrite", 0, setup=write_text("out.tif", "replace me")),
    Case("segment-output-is-a-folder", SEG.replace("out.tif", "folder"), 2, ("is a directory",), setup=lambda w: (w / "folder").mkdir()),
    Case("segment-output-folder-missing", SEG.replace("out.tif", "no/such/out.tif"), 2, ("no/such", "does not exist"), ("no",)),
    Case("segment-output-is-the-input", SEG.replace("out.tif", "in.tif") + " --overwrite", 2, ("is the input",), unchanged=("in.tif",)),
    Case("segment-output-links-to-input", SEG.replace("out.tif", "alias.tif") + " --overwrite", 2, ("is the input",),
         unchanged=("in.tif",), setup=link("alias.tif", "in.tif")),
    Case("segment-output-is-a-fifo", SEG.replace("out.tif", "pipe") + " --overwrite", 2, ("not a regular file",),
         unchanged=("pipe",), setup=fifo("pipe")),
    Case("segment-output-is-a-device", SEG.replace("out.tif", "null") + " --overwrite", 2, ("null", "not a regular file"),
         unchanged=("null",), setup=char_device("null")),
    Case("segment-output-read-only-fs", SEG.replace("out.tif", "ro/out.tif"), 2, ("ro/out.tif", "Read-only file system"),
         setup=read_only_mount("ro")),
    Case("segment-output-name-is-dots", SEG.replace("out.tif", ".."), 2, ("must be a file path",)),
    # -- segment --save-centres --------------------------------------------------------------------
    Case("save-centres-is-the-input", SEG + " --save-centres in.tif", 2, ("in.tif", "is the input"), ("out.tif",), unchanged=("in.tif",)),
    Case("save-centres-is-the-input-overwrite", SEG + " --save-centres in.tif --overwrite", 2, ("is the input",), ("out.tif",),
         unchanged=("in.tif",)),
    Case("save-centres-exists", SEG + " --save-centres c.npy", 2, ("c.npy", "exists"), ("out.tif",), unchanged=("c.npy",),
         setup=write_text("c.npy", "keep me")),
    Case("save-centres-folder-missing", SEG + " --save-centres no/c.npy", 2, ("does not exist",), ("out.tif", "no")),
    Case("save-centres-is-out", SEG + " --save-centres out.tif", 2, ("names OUT",), ("out.tif",)),
    Case("save-centres-is-the-model", SEG + " --save-centres model/best/model.npz --overwrite", 2, ("is the input",), ("out.tif",),
         unchanged=("model/best/model.npz",)),
    Case("save-centres-is-a-fifo", SEG + " --save-centres pipe --overwrite", 2, ("not a regular file",), ("out.tif",),
         unchanged=("pipe",), setup=fifo("pipe")),
    Case("save-centres-good", SEG + " --save-centres c.npy", 0, absent=(".c.npy.*",)),
    # -- fit-centres and info ----------------------------------------------------------------------
    Case("fit-good", FIT, 0, absent=(".shared.npy.*",)),
    Case("fit-out-exists", FIT, 2, ("shared.npy", "exists"), unchanged=("shared.npy",), setup=write_text("shared.npy", "keep")),
    Case("fit-out-is-an-input", FIT.replace("shared.npy", "in2.tif") + " --overwrite", 2, ("is the input",), unchanged=("in2.tif",)),
    Case("fit-out-is-a-fifo", FIT.replace("shared.npy", "pipe") + " --overwrite", 2, ("not a regular file",), unchanged=("pipe",),
         setup=fifo("pipe")),
    Case("fit-one-input-missing", FIT.replace("in2.tif", "gone.tif"), 2, ("gone.tif", "GDAL cannot read"), ("shared.npy",)),
    Case("fit-no-inputs", "fit-centres --k 4 --model model/best --out shared.npy", 2, ("required: IN",), ("shared.npy",)),
    Case("fit-k-out-of-range", FIT.replace("--k 4", "--k 0"), 2, ("k must be an integer in 2..8",), ("shared.npy",)),
    Case("info-model-missing", "info --model nomodel", 2, ("artifact directory not found",)),
    # -- params.yaml -------------------------------------------------------------------------------
    Case("params-duplicate-key", "ingest", 2, ("params.yaml", "line 5", "'lr' appears twice"), ("data/.raw.*",),
         setup=write_text("params.yaml", "ingest:\n  seed: 0\ntrain:\n  lr: 0.001\n  lr: 0.1\n")),
    Case("params-nan", "train", 2, ("loss.consistency", "finite number", "nan"), ("model/.teacher.*",), ("model/teacher/model.pt",),
         setup=edit_yaml("params.yaml", loss__consistency=float("nan"))),
    Case("params-infinity", "train", 2, ("train.lr", "finite number", "inf"), ("model/.teacher.*",), ("model/teacher/model.pt",),
         setup=edit_yaml("params.yaml", train__lr=float("inf"))),
    Case("params-nan-in-a-list", "ingest", 2, ("ingest.rescale_limits[1]", "finite number"),
         setup=edit_yaml("params.yaml", ingest__rescale="fixed", ingest__rescale_limits=[0, float("nan")])),
    Case("params-unknown-key", "train", 2, ("unknown key(s) train.lr_max",), setup=edit_yaml("params.yaml", train__lr_max=1.0)),
    Case("params-mistyped", "train", 2, ("train.lr", "expected a number", "1e-3"), setup=edit_yaml("params.yaml", train__lr="1e-3")),
    Case("params-out-of-range", "train", 2, ("train.steps", "expected a value in"), setup=edit_yaml("params.yaml", train__steps=0)),
    Case("params-missing-file", "ingest --params none.yaml", 2, ("none.yaml", "params file not found")),
    Case("params-not-yaml", "ingest", 2, ("not valid YAML",), setup=write_text("params.yaml", "ingest: [\n")),
    # -- ingest and build_shards -------------------------------------------------------------------
    Case("ingest-local-folder-missing", "ingest --out data/new", 2, ("ingest.local.path",), ("data/new", "data/.new.*"),
         setup=edit_yaml("params.yaml", ingest__provider="local", ingest__local__path="nowhere")),
    Case("ingest-local-raster-corrupt", "ingest --out data/new", 2, ("garbage.tif", "GDAL cannot open"), ("data/new", "data/.new.*"),
         setup=both(edit_yaml("params.yaml", ingest__provider="local", ingest__local__path="corrupt"),
                    lambda w: (w / "corrupt").mkdir() or shutil.copy(w / "garbage.tif", w / "corrupt"))),
    Case("ingest-out-is-a-file", "ingest --out in.tif", 2, ("in.tif", "not a directory"), unchanged=("in.tif",)),
    Case("shards-item-id-escapes", "build_shards", 2, ("item_id", "not a plain file name"), PWNED + ("data/shards/.synthetic.*",),
         setup=edit_first_json_line("data/raw/manifest.jsonl", item_id="../../../../../../PWNED")),
    Case("shards-item-id-with-slash", "build_shards", 2, ("item_id", "'a/b'"), setup=edit_first_json_line("data/raw/manifest.jsonl", item_id="a/b")),
    Case("shards-image-outside", "build_shards", 2, ("image", "outside the ingest folder"), ("data/shards/.synthetic.*",),
         setup=edit_first_json_line("data/raw/manifest.jsonl", image="../../in.tif")),
    Case("shards-image-absolute", "build_shards", 2, ("image", "is absolute"), setup=edit_first_json_line("data/raw/manifest.jsonl", image="/etc/passwd")),
    Case("shards-manifest-missing", "build_shards --raw data/none", 2, ("manifest.jsonl", "run the ingest stage first")),
    Case("shards-manifest-not-json", "build_shards", 2, ("not valid JSON",), setup=write_text("data/raw/manifest.jsonl", "{oops\n")),
    Case("shards-out-is-a-file", "build_shards --out in.tif", 2, ("in.tif",), unchanged=("in.tif",)),
    # -- training, export, evaluate ------------------------------------------------------------------
    Case("train-no-shards", "train --shards nowhere", 2, ("shard summary not found",), ("model/.teacher.*",), ("model/teacher/model.pt",)),
    Case("train-checkpoint-truncated", "train", 2, ("last.pt", "cannot read checkpoint"), ("model/.teacher.*",), ("model/teacher/model.pt",),
         setup=write_text("model/checkpoints/teacher/last.pt", "PK\x03\x04 half a zip")),
    Case("distill-teacher-missing", "train_distill --teacher none", 2, ("teacher checkpoint not found",), ("model/student",)),
    Case("export-teacher-truncated", "export", 2, ("model.pt", "cannot read teacher checkpoint"), ("model/.best.*",), ("model/best/model.npz",),
         setup=both(truncate("model/teacher/model.pt"), edit_yaml("params.yaml", export__source="teacher"))),
    Case("export-student-missing", "export", 2, ("student",), ("model/.best.*",), ("model/best/model.npz",), setup=edit_yaml("params.yaml", export__source="student")),
    Case("evaluate-item-id-escapes", "evaluate", 2, ("item_id", "not a plain file name"), PWNED + ("results/evaluate/metrics.json",),
         setup=edit_first_json_line("data/shards/synthetic/val/shard-00000/index.jsonl", item_id="../../../../../../PWNED")),
    Case("evaluate-item-id-with-slash", "evaluate", 2, ("item_id", "'a/b'"), ("results/evaluate/metrics.json",),
         setup=edit_first_json_line("data/shards/synthetic/val/shard-00000/index.jsonl", item_id="a/b")),
    Case("evaluate-index-path-outside", "evaluate", 2, ("outside the dataset root",), ("results/evaluate/metrics.json",),
         setup=edit_first_json_line("data/shards/synthetic/val/shard-00000/index.jsonl", input="../../../../../in.tif")),
    Case("evaluate-out-is-a-file", "evaluate --out in.tif", 2, ("in.tif", "not a directory"), unchanged=("in.tif",)),
]


# -- the world -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_dataset):
    """Everything the cases read, built once; each case works on a copy."""
    w = tmp_path_factory.mktemp("faults-template")
    write_encoder_artifact(w / "model" / "best", random_encoder(width=8, depth=1, embed_dim=4), training_pixel_size_m=0.6)
    write_raster(w / "in.tif", synthetic_rgb(64, 80, seed=1))
    write_raster(w / "in2.tif", synthetic_rgb(48, 48, seed=2))
    write_raster(w / "rgbn.tif", np.dstack([synthetic_rgb(32, 32), np.zeros((32, 32, 1), np.uint8)]), photometric="minisblack")
    write_raster(w / "gray.tif", synthetic_rgb(32, 32)[..., :1])
    write_raster(w / "u16.tif", synthetic_rgb(32, 32).astype(np.uint16) * 200)
    write_raster(w / "const16.tif", np.full((32, 32, 3), 1000, np.uint16))
    write_raster(w / "nodata.tif", np.zeros((32, 32, 3), np.uint8), nodata=0)
    write_raster(w / "coarse.tif", synthetic_rgb(32, 32), pixel=10.2)
    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": 3, "dtype": "complex64", "crs": "EPSG:32611",
               "transform": from_origin(500000.0, 4000000.0, 0.6, 0.6)}
    with rasterio.open(w / "complex.tif", "w", **profile) as ds:
        ds.write(np.ones((3, 32, 32), np.complex64))
    write_raster(w / "big.tif", synthetic_rgb(512, 512, seed=3))
    (w / "trunc.tif").write_bytes((w / "big.tif").read_bytes()[:200_000])
    (w / "garbage.tif").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    np.save(w / "bad_centres.npy", np.ones((4, 5), np.float32))
    # the pipeline's world: tiny ingested and sharded data, a teacher, params
    shutil.copytree(tiny_dataset.parent.parent / "raw", w / "data" / "raw")
    shutil.copytree(tiny_dataset, w / "data" / "shards" / "synthetic")
    config = teacher_config(ModelParams(width=8, depth=1, embed_dim=4))
    (w / "model" / "teacher").mkdir()
    torch.save({"format": TEACHER_FORMAT, "config": config, "state_dict": build_teacher(config).state_dict(),
                "val": {"metric": "none", "score": 0.0, "step": 0}, "fingerprint": "test"},
               w / "model" / "teacher" / "model.pt")
    raw = tiny_raw(**{"train.steps": 4, "train.batch_size": 2, "train.patch_size": 32, "train.val_every": 2,
                      "train.checkpoint_every": 2,
                      "model.width": 8, "model.depth": 1, "model.embed_dim": 4})
    (w / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return w


def run_in_process(command: str, cwd: Path, capsys) -> tuple[int, str]:
    """Exit status and stderr of one command run in this process, from `cwd`."""
    from runtime.cli import main as runtime_main
    from stages import build_shards, evaluate, export, ingest, train, train_distill

    stages = {"ingest": ingest, "build_shards": build_shards, "train": train, "train_distill": train_distill,
              "export": export, "evaluate": evaluate}
    words = shlex.split(command)
    capsys.readouterr()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        if words[0] in stages:
            code = stages[words[0]].main(words[1:] + (["--no-progress"] if words[0].startswith("train") else []))
        else:
            code = runtime_main(words)
    except SystemExit as e:  # argparse
        code = e.code
    finally:
        os.chdir(old)
    return code, capsys.readouterr().err


def _digest(path: Path):
    if path.is_fifo():
        return "fifo"
    if path.is_char_device():
        return "char device"
    return path.read_bytes()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_table(case: Case, template, tmp_path, capsys):
    w = tmp_path / WORLD
    shutil.copytree(template, w, symlinks=True)
    cleanup = case.setup(w) if case.setup else None
    try:
        keep = {p: _digest(w / p) for p in case.unchanged}
        code, err = run_in_process(case.command, w, capsys)
        assert code == case.code, f"exit {code}, expected {case.code}; stderr:\n{err}"
        assert "Traceback" not in err, err
        for word in case.words:
            assert word in err, f"{word!r} not in stderr:\n{err}"
        if case.code == 2 and "usage:" not in err:  # one line (argparse prints its usage first)
            assert err.startswith("error: ") and err.count("\n") == 1, err
        for pattern in case.absent:
            found = list(tmp_path.glob(pattern) if pattern.startswith("**/") else w.glob(pattern))
            assert not found, f"{pattern}: {found} exist afterwards"
        for p, before in keep.items():
            assert _digest(w / p) == before, f"{p} changed"
    finally:
        if callable(cleanup):
            cleanup()


def test_the_table_holds_every_kind_of_case():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


# -- leftovers of dead processes ------------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("command,folder,name", [
    (SEG, ".", "out.tif"),
    ("ingest --out data/raw", "data", "raw"),
    ("build_shards", "data/shards", "synthetic"),
])
def test_a_later_run_removes_what_dead_processes_left_and_nothing_else(command, folder, name, template, tmp_path, capsys):
    w = tmp_path / WORLD
    shutil.copytree(template, w, symlinks=True)
    d = w / folder
    dead, alive = dead_pid(), os.getppid()
    stale = [d / f".{name}.partial-{dead}", d / f".{name}.old-{dead}", d / f".{name}.partial-{dead}.aux.xml"]
    kept = [d / f".{name}.partial-{alive}", d / f".{name}.backup", d / f".{name}.partial-x{dead}", d / f".other.partial-{dead}"]
    for p in stale[:1] + kept[:1]:
        p.mkdir()
        (p / "junk").write_text("x")
    for p in stale[1:] + kept[1:]:
        p.write_text("x")
    code, err = run_in_process(command, w, capsys)
    assert code == 0, err
    assert not [p for p in stale if os.path.lexists(p)]
    assert all(os.path.lexists(p) for p in kept)


# -- signals and kills: the command in a subprocess ------------------------------------------------

SIGNAL_CASES = [
    # id, command, signal, exit status, words, started when this exists, absent afterwards
    ("segment-sigterm", "segment big.tif out.tif --k 4 --model model/best --tile 16", signal.SIGTERM, 143,
     ("terminated (SIGTERM)", "nothing written to out.tif"), ".out.tif.partial-*", ("out.tif", ".out.tif.*")),
    ("segment-sigint", "segment big.tif out.tif --k 4 --model model/best --tile 16", signal.SIGINT, 130,
     ("interrupted (SIGINT)",), ".out.tif.partial-*", ("out.tif", ".out.tif.*")),
    ("ingest-sigterm", "ingest --out data/new", signal.SIGTERM, 143, ("ingest: terminated (SIGTERM)", "left as it was"),
     "data/.new.partial-*", ("data/new", "data/.new.*")),
    ("train-sigint", "train", signal.SIGINT, 130, ("train: interrupted (SIGINT)", "rerun to resume"),
     "model/checkpoints/teacher/last.pt", ("model/teacher.*", "model/.teacher.*")),
]


def spawn(command: str, cwd: Path) -> subprocess.Popen:
    words = shlex.split(command)
    module = ["-m", "runtime"] if words[0] in ("segment", "fit-centres", "info") else ["-m", f"stages.{words[0]}"]
    args = words if module[1] == "runtime" else words[1:] + (["--no-progress"] if words[0].startswith("train") else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *module, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(w: Path, pattern: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once `pattern` exists under `w` (the command is at work)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ended before the signal: {proc.communicate()}")
        if list(w.glob(pattern)):
            return
        time.sleep(0.02)
    raise AssertionError(f"{pattern} never appeared")


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c[0] for c in SIGNAL_CASES])
def test_signals_end_commands_cleanly(case, template, tmp_path):
    _, command, sig, code, words, started, absent = case
    w = tmp_path / WORLD
    shutil.copytree(template, w, symlinks=True)
    raw = yaml.safe_load((w / "params.yaml").read_text())
    raw["ingest"]["synthetic"].update(num_scenes=6, scene_size=1024)  # long enough to be interrupted
    raw["train"].update(steps=100000, checkpoint_every=2)
    (w / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = spawn(command, w)
    try:
        wait_for(w, started, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, f"stdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, err
    for pattern in absent:
        assert not list(w.glob(pattern)), f"{pattern} left behind"


def test_kill_9_during_training_then_resume_gives_identical_weights(template, tmp_path):
    """A run killed with SIGKILL (no clean-up at all) resumes from its last checkpoint, and its
    teacher equals that of a run never interrupted, weight for weight."""
    worlds = {}
    for name in ("whole", "killed"):
        w = tmp_path / name
        shutil.copytree(template, w, symlinks=True)
        shutil.rmtree(w / "model" / "teacher")
        raw = yaml.safe_load((w / "params.yaml").read_text())
        raw["train"].update(steps=200, checkpoint_every=2, val_every=100)
        (w / "params.yaml").write_text(yaml.safe_dump(raw))
        worlds[name] = w
    proc = spawn("train", worlds["killed"])
    wait_for(worlds["killed"], "model/checkpoints/teacher/last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (worlds["killed"] / "model" / "teacher").exists()
    logs = {}
    for name in ("killed", "whole"):
        proc = spawn("train", worlds[name])
        logs[name] = proc.communicate(timeout=300)
        assert proc.returncode == 0, logs[name][1]
    assert "resuming teacher training from" in logs["killed"][0], logs["killed"]
    whole = torch.load(worlds["whole"] / "model/teacher/model.pt", weights_only=True)
    killed = torch.load(worlds["killed"] / "model/teacher/model.pt", weights_only=True)
    assert whole["val"] == killed["val"]
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, killed["state_dict"][k]), k


@pytest.mark.parametrize("stage", ["train", "train_distill"])
def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_checkpoint(stage, template, tmp_path,
                                                                                 capsys, monkeypatch):
    """A loss term that turns NaN at step 3 (checkpoints every 2 steps): the stage exits 2 naming the
    step and the term, the step-2 checkpoint stays, and no model is written."""
    import stages.losses as losses

    w = tmp_path / WORLD
    shutil.copytree(template, w, symlinks=True)
    raw = yaml.safe_load((w / "params.yaml").read_text())
    raw["train"].update(steps=6, checkpoint_every=2, val_every=3)
    raw.setdefault("distill", {}).update(steps=6, checkpoint_every=2, val_every=3, batch_size=2)
    raw.setdefault("data", {}).update(patch_sizes=[32, 48])
    (w / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    name, term = ("consistency", "consistency") if stage == "train" else ("cosine_distillation", "feature")
    original = getattr(losses, name) if hasattr(losses, name) else None
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if calls["n"] >= 3 else value

    if original is None:
        pytest.fail(f"stages.losses has no {name}")
    monkeypatch.setattr(losses, name, poisoned)
    code, err = run_in_process(stage, w, capsys)
    assert code == 2, err
    assert f"{stage}: loss not finite at step 3" in err and f"{term} = nan" in err, err
    assert "Traceback" not in err
    ckpt = w / "model" / "checkpoints" / ("teacher" if stage == "train" else "student") / "last.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    out = w / "model" / ("teacher" if stage == "train" else "student")
    if stage == "train":
        assert _digest(out / "model.pt") == _digest(template / "model" / "teacher" / "model.pt")
    else:
        assert not out.exists()


def test_resume_after_a_kill_that_cut_dvclive_files_short(tmp_path, tiny_shards):
    """A kill -9 while DVCLive writes leaves metrics.json empty or a plot row cut short; the resumed
    run still ends exactly where an uninterrupted one does."""
    from conftest import tiny_training_params, train_tiny_teacher

    params = tiny_training_params(steps=6)

    def run(root, **kw):
        return train_tiny_teacher(root, tiny_shards, params, **kw)

    run(tmp_path / "whole")
    assert run(tmp_path / "cut", stop_after=3) == {"stopped_at": 3}
    (tmp_path / "cut" / "results" / "metrics.json").write_text("")
    with open(tmp_path / "cut" / "results" / "plots" / "metrics" / "train" / "total.tsv", "a") as f:
        f.write("3\t0.9")  # a row cut short
    run(tmp_path / "cut")
    whole = torch.load(tmp_path / "whole" / "teacher" / "model.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "teacher" / "model.pt", weights_only=True)
    assert all(torch.equal(v, cut["state_dict"][k]) for k, v in whole["state_dict"].items())
    rows = (tmp_path / "cut" / "results" / "plots" / "metrics" / "train" / "total.tsv").read_text().splitlines()
    assert rows == (tmp_path / "whole" / "results" / "plots" / "metrics" / "train" / "total.tsv").read_text().splitlines()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_whose_exception_a_library_swallowed_still_stops_before_the_output(sig, code, tmp_path, capsys):
    """The handler raises at whatever line Python is at; a bare `except:` there (an optional import
    in a library, say) can swallow it. The next safe point raises again: nothing is renamed into place."""
    from runtime.command import run_command
    from runtime.destination import atomic_file

    def body() -> int:
        with atomic_file(tmp_path / "out.bin", overwrite=False) as tmp:
            try:
                os.kill(os.getpid(), sig)
                time.sleep(0.5)  # the handler runs here...
            except BaseException:  # noqa: BLE001  ...and a careless library swallows its exception
                pass
            tmp.write_bytes(b"finished anyway")
        return 0

    assert run_command("demo", body, interrupted="nothing written") == code
    assert "nothing written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_an_exited_process_not_yet_reaped_counts_as_dead():
    """A killed worker stays a zombie until its parent reaps it; its temporaries are stale all the same."""
    from runtime.destination import process_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline:  # exited, not reaped: Popen waits only when asked
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    try:
        assert not process_alive(child.pid)
        assert process_alive(os.getpid())
    finally:
        child.wait()
