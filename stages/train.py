"""Stage `train`: the teacher (`MonolithicSegmenter`) learns land-cover clusters without labels.

Objective (stages.losses, weights in params.yaml `loss`): two augmented views of every patch
(stages.augment) go through the network in one batch and share one set of soft k-means centres;
their assignment maps are mapped back to the source pixel grid and must agree (consistency), be
confident (pixel entropy), use every cluster (marginal entropy) and change mostly across image edges
(edge-aware TV).

Model selection: every `train.val_every` steps the encoder is scored by Hungarian-matched mIoU on
the labelled `metrics_train` split under the global protocol (one set of k-means centres for the
whole split, k = number of classes), and the best weights are kept. Without labelled tiles the score
is minus the training loss on a fixed held-out batch from tiles excluded from training.

Resumable: the full state (weights, optimiser, best weights, step) is written every
`train.checkpoint_every` steps to model/checkpoints/teacher/last.pt (DVC-persisted). Data windows and
augmentations are pure functions of (seed, step) and the learning rate of the step, so a run killed
and restarted ends exactly where an uninterrupted run ends. A checkpoint written under other params
or data is not resumed (the run says so and starts over).

Outputs: model/teacher/model.pt (best weights + architecture, `load_teacher`), DVCLive metrics and
per-step plots in results/train/.

    python -m stages.train [--params params.yaml] [--shards data/shards] [--out model/teacher] ...

This module also holds the pieces shared with `train_distill`: validation scoring, checkpoint I/O,
the learning-rate schedule and DVCLive set-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.command import check_signals, run_command
from runtime.destination import atomic_file, atomic_folder
from stages import losses
from stages.augment import invert_each, make_views
from stages.distributed import (
    ONE_PROCESS,
    DistributedError,
    NoLive,
    Ranks,
    close_ranks,
    init_ranks,
    local_threads,
    relaunch_under_torchrun,
    sync_batchnorm,
    usage_over_ranks,
    wrap_ddp,
)
from stages.metrics import confusion, hungarian_scores
from stages.model import MonolithicSegmenter, normalise_rgb, smooth_probs, upsample_to
from stages.params import ModelParams, ParamsError, load_params

TEACHER_FORMAT = "landseg-teacher"
CHECKPOINT_VERSION = 1
USAGE_THRESHOLD = 0.02  # a cluster "holds" pixels when it has at least 2 % of them


class TrainingError(RuntimeError):
    """Bad input to a training stage: missing data, checkpoint or teacher, or a mismatch."""


# --------------------------------------------------------------------------------------------
# Run set-up shared by the training stages
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a training stage runs, which changes its speed and never its results (tested): not DVC
    params, so changing them reruns nothing. Set by environment variables (`from_env`), which
    `dvc repro` passes through, or by the stages' --device/--threads/--prefetch/--nproc flags.

    device: "auto" (CUDA when torch sees it), "cpu" or "cuda" (LANDSEG_DEVICE); threads: torch's CPU
    threads, 0 = the cores shared by this machine's training processes (LANDSEG_THREADS); prefetch:
    prepare the next batch in a background thread (LANDSEG_PREFETCH=1), which pays off with a core
    to spare or a GPU; on 2 cores with torch on both it cost 25 % throughput
    (benchmarks/train_bench.py); processes: train data-parallel on this many local processes, the
    stage relaunching itself under torchrun (LANDSEG_NPROC, see stages.distributed)."""

    device: str = "auto"
    threads: int = 0
    prefetch: bool = False
    processes: int = 1

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainingError(f"device must be auto, cpu or cuda (LANDSEG_DEVICE, --device), got {self.device!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 0 <= self.threads <= 256:
            raise TrainingError(f"threads must be an integer in 0..256, 0 = all cores (LANDSEG_THREADS, "
                                f"--threads), got {self.threads!r}")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or not 1 <= self.processes <= 256:
            raise TrainingError(f"processes must be an integer in 1..256 (LANDSEG_NPROC, --nproc), "
                                f"got {self.processes!r}")

    @classmethod
    def from_env(cls, device: str | None = None, threads: int | None = None,
                 prefetch: bool | None = None, processes: int | None = None) -> Execution:
        """The settings from LANDSEG_DEVICE, LANDSEG_THREADS, LANDSEG_PREFETCH and LANDSEG_NPROC,
        each overridden by the argument when it is not None; TrainingError naming the variable when
        one is malformed."""
        env = os.environ

        def integer(name: str, value: int | None, default: str, meaning: str) -> int:
            if value is not None:
                return value
            raw = env.get(name, default)
            try:
                return int(raw)
            except ValueError:
                raise TrainingError(f"{name} must be an integer ({meaning}), got {raw!r}") from None

        threads = integer("LANDSEG_THREADS", threads, "0", "0 = all cores")
        processes = integer("LANDSEG_NPROC", processes, "1", "training processes on this machine")
        if prefetch is None:
            raw = env.get("LANDSEG_PREFETCH", "0")
            if raw not in ("0", "1"):
                raise TrainingError(f"LANDSEG_PREFETCH must be 0 or 1, got {raw!r}")
            prefetch = raw == "1"
        return cls(device if device is not None else env.get("LANDSEG_DEVICE", "auto"), threads, prefetch,
                   processes)

    def apply(self) -> tuple[torch.device, Ranks]:
        """Sets torch's thread count and joins the distributed job when torchrun started one;
        returns the device to train on and this process's ranks."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TrainingError("device is 'cuda' (LANDSEG_DEVICE or --device) but torch sees no CUDA device")
        name = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        device, ranks = init_ranks(torch.device(name))
        torch.set_num_threads(local_threads(self.threads, ranks))
        return device, ranks


DEFAULT_EXECUTION = Execution()


def set_threads(threads: int) -> None:
    """torch's CPU threads; 0 = all cores."""
    torch.set_num_threads(threads if threads > 0 else (os.cpu_count() or 1))


def add_execution_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                    help="torch device (default: $LANDSEG_DEVICE, else auto: CUDA when torch sees it)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads, 0 = the cores shared by this machine's training processes "
                         "(default: $LANDSEG_THREADS, else 0)")
    ap.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                    help="prepare the next batch in a background thread (default: on when $LANDSEG_PREFETCH=1)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="data-parallel processes on this machine, started through torchrun; the model "
                         "does not depend on it (default: $LANDSEG_NPROC, else 1)")


def lr_at(step: int, total: int, base_lr: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 5 % of `base_lr`."""
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def contrastive_weight_at(step: int, weight: float, decay_steps: int) -> float:
    """`loss.contrastive` at a 0-based step: constant when `decay_steps` is 0, else a half-cosine from
    `weight` at step 0 to 0 at `decay_steps`, and 0 after it."""
    if decay_steps <= 0:
        return weight
    t = min(step / decay_steps, 1.0)
    return weight * 0.5 * (1.0 + math.cos(math.pi * t))


def read_summary(dataset_root: Path) -> dict:
    path = dataset_root / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path}: shard summary not found (run the build_shards stage first)") from None
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: not valid JSON: {e}") from None
    for key in ("num_classes", "counts", "pixel_size_m", "input_rescale"):
        if key not in summary:
            raise TrainingError(f"{path}: missing key {key!r} (written by an older build_shards: rerun it)")
    return summary


def training_sources(dataset_root: Path) -> list[Path]:
    from stages.datasets import split_sources

    sources = list(split_sources(dataset_root, "train"))
    if not sources:
        raise TrainingError(f"{dataset_root}: the 'train' split has no tiles to train on")
    return sources


class Prefetcher:
    """Prepares step i + 1's batch in a background thread while step i trains.

    `make(step)` must be a pure function of the step (as `RandomWindowBatches.batch` and
    `make_views` are), so prefetching changes nothing but the time spent waiting for data, which
    `wait_s` accumulates (time the training loop was blocked on the next batch). With
    `background=False` each batch is made when asked for (all of its time counts as waiting).
    """

    def __init__(self, make: Callable[[int], object], start: int, stop: int, depth: int = 2,
                 background: bool = True):
        import queue
        import threading

        self._make, self._background = make, background
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.wait_s = 0.0
        if not background:
            return

        def work():
            for step in range(start, stop):
                if self._stop.is_set():
                    return
                try:
                    item = (step, make(step), None)
                except BaseException as e:  # re-raised in the training loop, never swallowed
                    item = (step, None, e)
                self._queue.put(item)
                if item[2] is not None:
                    return

        self._thread = threading.Thread(target=work, daemon=True, name="prefetch")
        self._thread.start()

    def get(self, step: int):
        t0 = time.perf_counter()
        if not self._background:
            item = self._make(step)
            self.wait_s += time.perf_counter() - t0
            return item
        got, item, error = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if error is not None:
            raise error
        assert got == step, f"prefetcher out of order: wanted step {step}, got {got}"
        return item

    def close(self) -> None:
        if not self._background:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except Exception:
                self._thread.join(0.01)


# --------------------------------------------------------------------------------------------
# Validation: Hungarian-matched mIoU under the global protocol
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LabelledSet:
    """Labelled validation tiles: uint8 RGB (H, W, 3) images and uint8 (H, W) labels (0 = ignore)."""

    images: list[np.ndarray]
    labels: list[np.ndarray]
    num_classes: int
    split: str
    split_tiles: int = 0  # tiles in the split; more than len(images) when `max_tiles` capped it


def load_labelled_split(dataset_root: Path, split: str = "metrics_train",
                        max_tiles: int = 0) -> LabelledSet | None:
    """The split's labelled tiles, or None when the dataset has none (then use a held-out batch).

    max_tiles > 0 keeps a fixed subset of that many tiles (`stages.datasets.stable_subset`).
    """
    summary = read_summary(dataset_root)
    if int(summary["counts"].get(split, 0)) == 0 or not summary.get("num_classes"):
        return None
    from stages.datasets import TileDataset

    ds = TileDataset(dataset_root, split, require_labels=True, max_tiles=max_tiles)
    images, labels = [], []
    for i in range(len(ds)):
        item = ds[i]
        images.append(item["image"])
        labels.append(item["label"])
    if not images:
        return None
    if len(images) < ds.split_tiles:
        print(f"model selection on {len(images)} of the {ds.split_tiles} {split} tiles (max_tiles={max_tiles})")
    return LabelledSet(images, labels, int(summary["num_classes"]), split, ds.split_tiles)


@torch.no_grad()
def embed_images(encoder: torch.nn.Module, images: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Unit embeddings (D, ceil(H/4), ceil(W/4)) of each uint8 (H, W, 3) image, on the CPU."""
    out = []
    for img in images:
        x = normalise_rgb(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].to(device))
        out.append(encoder(x)[0].float().cpu())
    return out


def spherical_kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 30, restarts: int = 1) -> torch.Tensor:
    """k unit centres of unit rows x (N, D): k-means++ seeding on cosine distance, then Lloyd.

    With `restarts` > 1 the run with the highest total cosine similarity wins (less dependence of
    the validation score on one seeding).
    """
    if x.shape[0] < k:
        raise TrainingError(f"cannot fit {k} centres to {x.shape[0]} embeddings")
    if restarts > 1:
        runs = [spherical_kmeans(x, k, seed * 7919 + r, iters) for r in range(restarts)]
        return max(runs, key=lambda c: float((x @ c.T).max(dim=1).values.sum()))
    g = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(x.shape[0], (1,), generator=g)].squeeze(0)]
    dist = (1.0 - x @ centres[0]).clamp_min(0)
    for _ in range(1, k):
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1.0 / len(dist))
        centres.append(x[torch.multinomial(probs, 1, generator=g)].squeeze(0))
        dist = torch.minimum(dist, (1.0 - x @ centres[-1]).clamp_min(0))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        c = torch.where(empty[:, None], c, F.normalize(sums, dim=1, eps=1e-12))
    return c


def sample_embeddings(embs: list[torch.Tensor], per_image: int, seed: int) -> torch.Tensor:
    """Up to `per_image` random cells of each (D, h, w) map, stacked (N, D)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for e in embs:
        flat = e.reshape(e.shape[0], -1).T
        rows.append(flat[torch.randperm(len(flat), generator=g)[:per_image]])
    return torch.cat(rows)


@torch.no_grad()
def global_scores(embs: list[torch.Tensor], labelled: LabelledSet, temperature: float,
                  smooth_iters: int, seed: int = 0, samples_per_image: int = 1024) -> dict:
    """Hungarian mIoU with one set of k-means centres (k = classes) for the whole split.

    Labels follow the runtime's path: softmax(cos / T) assignments at stride 4, `smooth_iters` 3x3
    smoothing, fixed-scale bilinear upsampling, argmax.
    """
    k = labelled.num_classes
    centres = spherical_kmeans(sample_embeddings(embs, samples_per_image, seed), k, seed, restarts=4)
    conf = np.zeros((k, k), dtype=np.int64)
    counts = np.zeros(k, dtype=np.int64)
    for e, label in zip(embs, labelled.labels):
        probs = torch.softmax(torch.einsum("dhw,kd->khw", e, centres) / temperature, dim=0)[None]
        probs = upsample_to(smooth_probs(probs, smooth_iters), *label.shape)
        pred = probs[0].argmax(dim=0).numpy()
        conf += confusion(pred, label, k, k)
        counts += np.bincount(pred.ravel(), minlength=k)
    scores = hungarian_scores(conf)
    usage = counts / counts.sum()
    return {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
            "min_cluster_share": float(usage.min())}


def cluster_usage(probs: torch.Tensor) -> np.ndarray:
    """Share of cells whose argmax is each cluster; probs (..., k, h, w) or (N, k)."""
    k = probs.shape[-3] if probs.ndim >= 3 else probs.shape[-1]
    arg = probs.argmax(dim=-3 if probs.ndim >= 3 else -1).reshape(-1)
    return np.bincount(arg.cpu().numpy(), minlength=k) / arg.numel()


# --------------------------------------------------------------------------------------------
# Checkpoints and outputs
# --------------------------------------------------------------------------------------------


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


def check_finite(terms: dict[str, torch.Tensor], step: int, stage: str, checkpoint: Path) -> None:
    """TrainingError naming the step and the loss terms that are NaN or infinite (before the
    optimiser step, so that no weight is touched and the last checkpoint stays the last good one)."""
    bad = {name: float(v.detach()) for name, v in terms.items()
           if not name.startswith("_") and not bool(torch.isfinite(v.detach()).all())}
    if bad:
        where = f"{checkpoint} (the last good state) is kept" if checkpoint.exists() else "no checkpoint written"
        raise TrainingError(f"{stage}: loss not finite at step {step}: "
                            + ", ".join(f"{name} = {value}" for name, value in bad.items())
                            + f"; training stopped, {where}. Lower the learning rate or the loss weights, "
                            "or check the training tiles")


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


# --------------------------------------------------------------------------------------------
# DVCLive
# --------------------------------------------------------------------------------------------


def open_live(results_dir: Path, resume_step: int):
    """DVCLive logger writing results_dir/metrics.json and results_dir/plots/metrics/*.tsv.

    Never rewrites dvc.yaml (the stage declares its metrics and plots) and never saves experiments
    itself (`dvc exp run` does). When resuming from a checkpoint taken after `resume_step` steps,
    plot rows logged after that checkpoint (by the interrupted run) are dropped first, so the curves
    hold each step exactly once.
    """
    from dvclive import Live

    if resume_step > 0:
        for tsv in (results_dir / "plots" / "metrics").rglob("*.tsv"):
            lines = tsv.read_text().splitlines()
            header, rows = lines[:1], lines[1:]
            names = header[0].split("\t") if header else []
            step_col = names.index("step") if "step" in names else -1
            # a run killed mid-write (kill -9, power cut) may leave a last row cut short: dropped too
            kept = [r for r in rows if step_col >= 0 and len(r.split("\t")) == len(names)
                    and r.split("\t")[step_col].isdigit() and int(r.split("\t")[step_col]) < resume_step]
            tsv.write_text("\n".join(header + kept) + "\n")
        summary = results_dir / "metrics.json"
        try:
            json.loads(summary.read_text())
        except FileNotFoundError:
            pass
        except (ValueError, OSError):  # cut short by a kill while DVCLive wrote it: rewritten at the end
            summary.unlink()
    live = Live(str(results_dir), resume=resume_step > 0, dvcyaml=None, save_dvc_exp=False,
                report=None)
    live.step = resume_step
    return live


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------


def teacher_config(model_params: ModelParams) -> dict:
    """The architecture stored with a teacher checkpoint: every `model` knob."""
    return dataclasses.asdict(model_params)


def build_teacher(config: dict) -> MonolithicSegmenter:
    return MonolithicSegmenter(config["width"], config["depth"], config["embed_dim"], config["max_k"],
                               config["temperature"], config["cluster_iters"], config["smooth_iters"],
                               config["refine_head"], config["seed"])


def load_teacher(path: str | Path, expect: dict | None = None) -> MonolithicSegmenter:
    """The trained teacher from `model/teacher/model.pt` (or its directory), in eval mode.

    `expect`: optional architecture (as `teacher_config`) the file must match. Raises TrainingError
    when the file is missing, not a teacher checkpoint, or does not match.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise TrainingError(f"{path}: teacher checkpoint not found (run the train stage first)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path}: cannot read teacher checkpoint ({e})") from None
    if not isinstance(blob, dict) or blob.get("format") != TEACHER_FORMAT:
        raise TrainingError(f"{path}: not a teacher checkpoint (format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r}, "
                            f"expected {TEACHER_FORMAT!r})")
    config = blob.get("config")
    missing = sorted({f.name for f in dataclasses.fields(ModelParams)} - set(config or {}))
    if missing:
        raise TrainingError(f"{path}: teacher checkpoint lacks architecture keys {missing} (written by an "
                            "older version; rerun the train stage)")
    if expect is not None:
        diff = {k: (config.get(k), v) for k, v in expect.items() if config.get(k) != v}
        if diff:
            raise TrainingError(f"{path}: teacher architecture does not match the declared one "
                                f"(key: (file, declared)): {diff}")
    model = build_teacher(config)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise TrainingError(f"{path}: weights do not match the teacher architecture {config}: {e}") from None
    return model.eval()


def teacher_info(path: str | Path) -> dict:
    """Config, validation record and provenance stored with a teacher checkpoint (no weights)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    load_teacher(path)  # validates
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in blob.items() if k != "state_dict"}


def teacher_losses(model: MonolithicSegmenter, views, loss_params, generator: torch.Generator,
                   contrastive_weight: float | None = None,
                   ranks: Ranks = ONE_PROCESS) -> dict[str, torch.Tensor]:
    """All teacher loss terms for a list of two views; both views share one set of centres.

    `generator` draws the cells of the dense contrastive term. `contrastive_weight` replaces
    `loss.contrastive` in the total (the scheduled weight, `contrastive_weight_at`). With several
    `ranks` the views are this rank's slice of the global batch and every term is the global
    batch's value.
    """
    b = views[0].input.shape[0]
    out = model(torch.cat([v.input for v in views]))  # one forward: the views share batch statistics
    probs = out["probs"]
    probs_v, emb_v = probs.split(b), out["embeddings"].split(b)
    side = probs.shape[-1]
    # back to the source grid, so that both views are compared at the same ground cells
    aligned = [invert_each(p, v.transforms) for p, v in zip(probs_v, views)]
    emb_aligned = [invert_each(e, v.transforms) for e, v in zip(emb_v, views)]
    global_b = b * ranks.world_size  # the cells are drawn for the global batch, whatever the ranks
    idx = losses.sample_positions(global_b, side * side, loss_params.contrastive_samples,
                                  generator)[ranks.slice(global_b)]
    terms = {
        "contrastive": losses.dense_contrastive(emb_aligned[0], emb_aligned[1], idx,
                                                loss_params.contrastive_temperature, ranks),
        "consistency": losses.consistency(aligned[0], aligned[1]),
    }
    # over the whole two-view batch
    terms["entropy"] = losses.pixel_entropy(probs)
    terms["marginal_entropy"] = losses.marginal_entropy(probs, ranks)
    terms["smoothness"] = losses.edge_aware_tv(probs, torch.cat([v.guide for v in views]), loss_params.edge_sigma)
    # the means over this rank's samples become the global batch's (the other two already are)
    terms.update(ranks.mean_each({k: v for k, v in terms.items() if k not in ("contrastive", "marginal_entropy")}))
    weights = {name: getattr(loss_params, name) for name in terms}
    if contrastive_weight is not None:
        weights["contrastive"] = contrastive_weight
    terms["total"] = sum(weights[name] * value for name, value in terms.items())
    terms["_probs"] = probs
    return terms


class HeldOutBatch:
    """Fallback model-selection set when no labelled tiles exist: a fixed batch, fixed views."""

    def __init__(self, sources: list[Path], patch_size: int, batch_size: int, seed: int):
        from stages.datasets import RandomWindowBatches

        self.batch, _ = RandomWindowBatches(sources, [patch_size], batch_size, seed,
                                            "cycle", True).batch(0)


def train_teacher(dataset_root: Path, out_dir: Path, checkpoint_dir: Path, results_dir: Path,
                  aug, model_params, loss_params, train_params, *, execution: Execution = DEFAULT_EXECUTION,
                  stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the teacher; returns the best validation record (on rank 0; {} on the other ranks of
    a distributed run, stages.distributed). See the module docstring.

    stop_after: stop (as if killed) once this many steps are done, without writing `out_dir`
    (used by the resume test).
    """
    if train_params.patch_size % 4:
        raise TrainingError(f"train.patch_size must be a multiple of 4 (the network stride), got "
                            f"{train_params.patch_size}")
    device, ranks = execution.apply()
    try:
        return _train_teacher(dataset_root, out_dir, checkpoint_dir, results_dir, aug, model_params,
                              loss_params, train_params, execution, device, ranks, stop_after,
                              progress and ranks.is_main)
    finally:
        close_ranks(ranks)


def _train_teacher(dataset_root, out_dir, checkpoint_dir, results_dir, aug, model_params, loss_params,
                   train_params, execution, device, ranks, stop_after, progress) -> dict:
    from stages.datasets import RandomWindowBatches

    rows = ranks.slice(train_params.batch_size, "train.batch_size")
    summary = read_summary(dataset_root)
    sources = training_sources(dataset_root)
    # rank 0 alone validates; every rank needs to know which selection it is (it decides the sources)
    labelled = load_labelled_split(dataset_root, max_tiles=train_params.val_max_tiles) if ranks.is_main else None
    has_labels = ranks.broadcast(labelled is not None)
    heldout = None
    if not has_labels:
        if len(sources) < 2:
            raise TrainingError(f"{dataset_root}: no labelled metrics_train tiles and fewer than 2 train "
                                "tiles: nothing to hold out for model selection")
        n_held = max(1, len(sources) // 10)
        if ranks.is_main:
            heldout = HeldOutBatch(sources[-n_held:], train_params.patch_size, train_params.batch_size,
                                   train_params.seed + 1)
        sources = sources[:-n_held]
    batches = RandomWindowBatches(sources, [train_params.patch_size], train_params.batch_size,
                                  train_params.seed, "cycle", True)

    config = teacher_config(model_params)
    model = build_teacher(config)
    if ranks.distributed:
        model = sync_batchnorm(model)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=train_params.lr, weight_decay=train_params.weight_decay)
    fingerprint = run_fingerprint(aug, model_params, loss_params, train_params,
                                  data_hash=summary.get("params_hash", ""))
    ckpt_path = checkpoint_dir / "last.pt"
    # read on rank 0 and broadcast: the ranks need not share a disk
    state = ranks.broadcast(load_checkpoint(ckpt_path, fingerprint, train_params.steps) if ranks.is_main else None)
    start, best = 0, {"score": -math.inf, "step": -1, "metric": None, "state_dict": None}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best = int(state["step"]), state["best"]
        if ranks.is_main:
            tqdm.write(f"resuming teacher training from {ckpt_path} at step {start}")
    trained_model = wrap_ddp(model, ranks, device)

    def validate() -> dict:
        model.eval()
        with torch.no_grad():
            if labelled is not None:
                embs = embed_images(model.encoder, labelled.images, device)
                scores = global_scores(embs, labelled, model.head.temperature, model.smooth_iters,
                                       seed=train_params.seed)
                probs, _ = model.head(torch.cat([e.reshape(e.shape[0], -1) for e in embs], 1).T[:, :, None, None].to(device))
                usage = cluster_usage(probs[:, :, 0, 0])
                record = {"metric": f"{labelled.split}/miou", "score": scores["miou"], **scores}
            else:
                views = make_views(heldout.batch, 0, aug)
                views = [dataclasses.replace(v, input=v.input.to(device), guide=v.guide.to(device)) for v in views]
                terms = teacher_losses(model, views, loss_params, torch.Generator().manual_seed(0))
                usage = cluster_usage(terms["_probs"])
                record = {"metric": "heldout/neg_loss", "score": -float(terms["total"])}
        model.train()
        record["clusters_ge_2pct"] = int((usage >= USAGE_THRESHOLD).sum())
        record["usage"] = usage
        return record

    live = open_live(results_dir, start) if ranks.is_main else NoLive()
    model.train()
    bar = tqdm(range(start, train_params.steps), initial=start, total=train_params.steps,
               desc="train teacher", disable=not progress, dynamic_ncols=True)
    # every rank draws the global batch and its augmentations, and keeps its rows
    prefetch = Prefetcher(lambda i: [v.rows(rows) for v in make_views(batches.batch(i)[0], i, aug)],
                          start, train_params.steps, background=execution.prefetch)
    t_start = time.perf_counter()
    try:
        for step in bar:
            check_signals()
            views = prefetch.get(step)
            views = [dataclasses.replace(v, input=v.input.to(device), guide=v.guide.to(device)) for v in views]
            lr = lr_at(step, train_params.steps, train_params.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            terms = teacher_losses(trained_model, views, loss_params,
                                   torch.Generator().manual_seed(train_params.seed * 1_000_003 + step),
                                   contrastive_weight_at(step, loss_params.contrastive,
                                                         loss_params.contrastive_decay_steps), ranks)
            check_finite(terms, step + 1, "train", ckpt_path)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()

            usage = usage_over_ranks(cluster_usage(terms["_probs"].detach()), ranks)
            for name, value in terms.items():
                if not name.startswith("_"):
                    live.log_metric(f"train/{name}", float(value.detach()))
            live.log_metric("train/lr", lr)
            live.log_metric("train/clusters_ge_2pct", int((usage >= USAGE_THRESHOLD).sum()))
            done = step + 1
            if ranks.is_main and (done % train_params.val_every == 0 or done == train_params.steps):
                record = validate()
                live.log_metric(f"val/{record['metric'].split('/', 1)[1]}", record["score"])
                live.log_metric("val/clusters_ge_2pct", record["clusters_ge_2pct"])
                live.log_metric("val/min_cluster_share", float(record["usage"].min()))
                if record["score"] > best["score"]:
                    best = {"score": float(record["score"]), "step": done, "metric": record["metric"],
                            "clusters_ge_2pct": record["clusters_ge_2pct"],
                            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                bar.set_postfix(loss=f"{float(terms['total'].detach()):.3f}", val=f"{record['score']:.3f}")
            live.next_step()
            if ranks.is_main and (done % train_params.checkpoint_every == 0 or done == train_params.steps):
                atomic_torch_save({"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "step": done,
                                   "model": model.state_dict(), "optimizer": opt.state_dict(), "best": best},
                                  ckpt_path)
            if stop_after is not None and done >= stop_after:
                live.end()
                return {"stopped_at": done}

        elapsed = time.perf_counter() - t_start
        if not ranks.is_main:
            return {}
        if best["state_dict"] is None:
            raise TrainingError("no validation ran, so there is no best checkpoint (check train.val_every)")
        live.summary["best/score"] = best["score"]
        live.summary["best/step"] = best["step"]
        live.summary["best/clusters_ge_2pct"] = best["clusters_ge_2pct"]
        live.summary["max_k"] = model_params.max_k
        live.make_summary()
        live.end()

        blob = {"format": TEACHER_FORMAT, "config": config, "state_dict": best["state_dict"],
                # ground sample distance of the training tiles: the runtime resamples rasters to it
                "training_pixel_size_m": summary["pixel_size_m"].get("train"),
                # how the training pixels became 8-bit: the runtime maps new rasters the same way
                "input_rescale": summary["input_rescale"],
                "val": {"metric": best["metric"], "score": best["score"], "step": best["step"],
                        "clusters_ge_2pct": best["clusters_ge_2pct"]},
                "fingerprint": fingerprint}
        write_output_dir(out_dir, {"model.pt": lambda p: torch.save(blob, p)})
        ran = train_params.steps - start
        tqdm.write(f"teacher: best {best['metric']} = {best['score']:.4f} at step {best['step']}; "
                   f"{ran} steps in {elapsed:.1f}s on {ranks.world_size} process(es), data wait "
                   f"{100 * prefetch.wait_s / max(elapsed, 1e-9):.1f}%")
        return blob["val"]
    finally:
        prefetch.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the teacher segmenter (DVC stage `train`).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards", help="shards root; the dataset is ingest.dataset")
    ap.add_argument("--out", default="model/teacher")
    ap.add_argument("--checkpoints", default="model/checkpoints/teacher")
    ap.add_argument("--results", default="results/train")
    ap.add_argument("--no-progress", action="store_true")
    add_execution_flags(ap)
    args = ap.parse_args(argv)

    def run() -> int:
        execution = Execution.from_env(args.device, args.threads, args.prefetch, args.nproc)
        code = relaunch_under_torchrun("stages.train", sys.argv[1:] if argv is None else argv, execution.processes)
        if code is not None:
            return code
        p = load_params(args.params)
        train_teacher(Path(args.shards) / p.ingest.dataset, Path(args.out), Path(args.checkpoints),
                      Path(args.results), p.aug, p.model, p.loss, p.train, execution=execution,
                      progress=not args.no_progress)
        return 0

    return run_command("train", run, errors=(ParamsError, TrainingError, DistributedError, FileNotFoundError, ValueError),
                       interrupted=f"{args.out} not written; the last checkpoint in {args.checkpoints} is kept: "
                       "rerun to resume")

if __name__ == "__main__":
    sys.exit(main())
