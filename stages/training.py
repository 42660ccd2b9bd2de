"""What the two training stages share: how they run (device, threads, processes), the data
prefetcher, model selection on the labelled `metrics_train` split, DVCLive, and `fit`, the one
training loop (resume, learning-rate schedule, validation, keep-best, checkpoints) that both the
teacher (`stages.train`) and the student (`stages.train_distill`) run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime.cluster import fit_centres
from runtime.command import check_signals, run_command
from stages.checkpoints import CHECKPOINT_VERSION, TrainingError, atomic_torch_save, load_checkpoint
from stages.distributed import DistributedError, Ranks, close_ranks, init_ranks, local_threads, relaunch_under_torchrun
from stages.metrics import confusion, hungarian_scores
from stages.model import normalise_rgb, smooth_probs, upsample_to
from stages.params import Params, ParamsError, load_params

# AdamW's weight decay for the teacher and the student: 0 and 0.001 scored level with it on the
# synthetic default (docs/experiments.md, "Knobs: removed and kept")
WEIGHT_DECAY = 1e-4
USAGE_THRESHOLD = 0.02  # a cluster "holds" pixels when it has at least 2 % of them
HELDOUT_BATCHES = 16  # batches in the held-out selection set of a run without labelled tiles


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


@contextlib.contextmanager
def joined(execution: Execution):
    """`execution.apply()` as a context: (device, ranks), leaving the distributed job at the end."""
    device, ranks = execution.apply()
    try:
        yield device, ranks
    finally:
        close_ranks(ranks)


def add_stage_arguments(ap: argparse.ArgumentParser, out: str, checkpoints: str, results: str) -> None:
    """The paths and flags both training stages take (their defaults are dvc.yaml's paths)."""
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards", help="shards root; the dataset is ingest.dataset")
    ap.add_argument("--out", default=out)
    ap.add_argument("--checkpoints", default=checkpoints)
    ap.add_argument("--results", default=results)
    ap.add_argument("--no-progress", action="store_true")
    add_execution_flags(ap)


def run_stage(stage: str, module: str, args: argparse.Namespace, argv: list[str] | None,
              train: Callable[[Params, Execution], object]) -> int:
    """A training stage's main: its execution settings, a relaunch under torchrun when they ask for
    processes, then `train(params, execution)`; input errors are one `error:` line and status 2."""

    def run() -> int:
        execution = Execution.from_env(args.device, args.threads, args.prefetch, args.nproc)
        code = relaunch_under_torchrun(module, sys.argv[1:] if argv is None else argv, execution.processes)
        if code is not None:
            return code
        train(load_params(args.params), execution)
        return 0

    return run_command(stage, run, errors=(ParamsError, TrainingError, DistributedError, FileNotFoundError, ValueError),
                       interrupted=f"{args.out} not written; the last checkpoint in {args.checkpoints} is kept: "
                       "rerun to resume")


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


def training_sources(dataset_root: Path) -> list[Path]:
    from stages.datasets import split_sources

    sources = list(split_sources(dataset_root, "train"))
    if not sources:
        raise TrainingError(f"{dataset_root}: the 'train' split has no tiles to train on")
    return sources


def selection_sets(dataset_root: Path, max_tiles: int, patch_size: int, batch_size: int, seed: int,
                   ranks: Ranks) -> tuple[list[Path], LabelledSet | None, HeldOutBatches | None]:
    """(training sources, labelled selection tiles, held-out batches) of a training stage.

    Model selection scores the labelled `metrics_train` tiles (loaded on rank 0, which alone
    validates); without any, fixed batches of `patch_size` windows from the last tenth of the
    train tiles (seed `seed`), which then leave the training sources on every rank.
    """
    sources = training_sources(dataset_root)
    labelled = load_labelled_split(dataset_root, max_tiles=max_tiles) if ranks.is_main else None
    if ranks.broadcast(labelled is not None):
        return sources, labelled, None
    if len(sources) < 2:
        raise TrainingError(f"{dataset_root}: no labelled metrics_train tiles and fewer than 2 train "
                            "tiles: nothing to hold out for model selection")
    n_held = max(1, len(sources) // 10)
    heldout = HeldOutBatches(sources[-n_held:], patch_size, batch_size, seed) if ranks.is_main else None
    return sources[:-n_held], None, heldout


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
    from stages.datasets import TileDataset, read_summary

    summary = read_summary(dataset_root)
    if int(summary["counts"].get(split, 0)) == 0 or not summary.get("num_classes"):
        return None

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


def selection_centres(x: torch.Tensor, k: int, seed: int, restarts: int = 4) -> torch.Tensor:
    """k unit centres of the unit rows x (N, D), fitted as the runtime fits them
    (`runtime.cluster.fit_centres`: spherical k-means, k-means++ seeding on cosine, Lloyd until no
    assignment changes, the best of `restarts` seeded starts), without its soft phase, which the
    validation's softmax at the head's temperature stands in for."""
    if x.shape[0] < k:
        raise TrainingError(f"cannot fit {k} centres to {x.shape[0]} embeddings")
    return torch.from_numpy(fit_centres(x.numpy(), k, temperature=1.0, iters=0, seed=seed, restarts=restarts))


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
    centres = selection_centres(sample_embeddings(embs, samples_per_image, seed), k, seed)
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


class HeldOutBatches:
    """Fallback model-selection set when no labelled tiles exist: `count` fixed batches of
    `batch_size` windows of `patch_size` pixels from the held-out tiles (seed `seed`), scored
    with fixed views. The score is the mean over the batches: with one batch of 8 windows the
    held-out loss moved more between neighbouring stops than along the whole run
    (docs/experiments.md, "A larger held-out set")."""

    def __init__(self, sources: list[Path], patch_size: int, batch_size: int, seed: int,
                 count: int = HELDOUT_BATCHES):
        from stages.datasets import RandomWindowBatches

        windows = RandomWindowBatches(sources, [patch_size], batch_size, seed, "cycle", True)
        self.batches = [windows.batch(i)[0] for i in range(count)]


@dataclasses.dataclass
class Fitted:
    """What `fit` leaves: the best validation record (rank 0; its "state_dict" holds the kept
    weights), the step it resumed from, the seconds it trained, the seconds it waited for data, and
    `stopped_at` when `stop_after` ended it early."""

    best: dict
    start: int
    elapsed: float
    wait_s: float
    stopped_at: int | None = None


def fit(*, stage: str, what: str, steps: int, base_lr: float, val_every: int, checkpoint_every: int,
        model: torch.nn.Module, opt: torch.optim.Optimizer, extra_state: dict, fingerprint: str,
        checkpoint_path: Path, results_dir: Path, make_batch: Callable[[int], object],
        train_step: Callable[[int, object, float], tuple[torch.Tensor, dict, dict, dict]],
        validate: Callable[[], dict], kept_weights: Callable[[], dict], ranks: Ranks, prefetch: bool,
        progress: bool, summary: dict | None = None, stop_after: int | None = None) -> Fitted:
    """The training loop of both stages; resumable, distributed-aware, the same for any process count.

    make_batch(step): this rank's data for a step, a pure function of the step (prefetched when
    `prefetch`). train_step(step, batch, lr) -> (loss to minimise, terms checked to be finite,
    metrics to log in order, progress-bar fields). validate() on rank 0 every `val_every` steps
    and at the end -> {"metric", "score", "logs": {name: value}, "keep": {fields kept with the best}}.
    kept_weights(): the state dict kept when a validation is the best so far. `summary`: entries
    added to DVCLive's summary beside the best record. `what` names the run in its progress bar and
    messages ("teacher training"). `extra_state`: name
    -> object with state_dict/load_state_dict saved in the checkpoint beside model and optimiser.
    Rank 0 reads the checkpoint and broadcasts it; rank 0 alone validates, logs and checkpoints.
    """
    state = ranks.broadcast(load_checkpoint(checkpoint_path, fingerprint, steps) if ranks.is_main else None)
    start, best = 0, {"score": -math.inf, "step": -1, "metric": None, "state_dict": None}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for name, holder in extra_state.items():
            holder.load_state_dict(state[name])
        start, best = int(state["step"]), state["best"]
        if ranks.is_main:
            tqdm.write(f"resuming {what} from {checkpoint_path} at step {start}")
    live = open_live(results_dir, start) if ranks.is_main else None  # DVCLive writes once, on rank 0
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=what, disable=not progress,
               dynamic_ncols=True)
    prefetcher = Prefetcher(make_batch, start, steps, background=prefetch)
    t_start = time.perf_counter()
    try:
        for step in bar:
            check_signals()
            batch = prefetcher.get(step)
            lr = lr_at(step, steps, base_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, terms, metrics, postfix = train_step(step, batch, lr)
            check_finite(terms, step + 1, stage, checkpoint_path)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for name, value in metrics.items() if live else ():
                live.log_metric(name, value)
            done = step + 1
            if ranks.is_main and (done % val_every == 0 or done == steps):
                record = validate()
                for name, value in record["logs"].items():
                    live.log_metric(name, value)
                if record["score"] > best["score"]:
                    best = {"score": float(record["score"]), "step": done, "metric": record["metric"],
                            **record.get("keep", {}), "state_dict": kept_weights()}
                bar.set_postfix(**postfix, val=f"{record['score']:.3f}")
            if live:
                live.next_step()
            if ranks.is_main and (done % checkpoint_every == 0 or done == steps):
                atomic_torch_save({"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "step": done,
                                   "model": model.state_dict(), "optimizer": opt.state_dict(), "best": best,
                                   **{name: holder.state_dict() for name, holder in extra_state.items()}},
                                  checkpoint_path)
            if stop_after is not None and done >= stop_after:
                if live:
                    live.end()
                return Fitted(best, start, time.perf_counter() - t_start, prefetcher.wait_s, done)
        elapsed = time.perf_counter() - t_start
        if ranks.is_main:
            if best["state_dict"] is None:
                raise TrainingError(f"{stage}: no validation ran, so there is no best checkpoint")
            live.summary["best/score"] = best["score"]
            live.summary["best/step"] = best["step"]
            for name in best:
                if name not in ("score", "step", "metric", "state_dict"):
                    live.summary[f"best/{name}"] = best[name]
            live.summary.update(summary or {})
            live.make_summary()
            live.end()
        return Fitted(best, start, elapsed, prefetcher.wait_s)
    finally:
        prefetcher.close()
