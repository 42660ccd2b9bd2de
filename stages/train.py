"""Stage `train`: the teacher (`MonolithicSegmenter`) learns land-cover clusters without labels.

Objective (stages.losses, weights in params.yaml `loss`): two augmented views of every patch
(stages.augment) go through the network in one batch and share one set of soft k-means centres;
their assignment maps are mapped back to the source pixel grid and must agree (consistency), be
confident (pixel entropy), use every cluster (marginal entropy) and change mostly across image edges
(edge-aware TV); their embeddings must predict each cell's cluster in one colour-texture legend of
the whole training set (pseudo-labels, stages.pseudo_labels).

Model selection: every `train.val_every` steps the encoder is scored by Hungarian-matched mIoU on
the labelled `metrics_train` split under the global protocol (one set of k-means centres for the
whole split, k = number of classes), and the best weights are kept. Without labelled tiles the score
is minus the training loss on fixed held-out batches from tiles excluded from training.

Resumable: the full state (weights, optimiser, best weights, step) is written every
`train.checkpoint_every` steps to model/checkpoints/teacher/last.pt (DVC-persisted). Data windows and
augmentations are pure functions of (seed, step) and the learning rate of the step, so a run killed
and restarted ends exactly where an uninterrupted run ends. A checkpoint written under other params
or data is not resumed (the run says so and starts over).

Outputs: model/teacher/model.pt (best weights + architecture, `load_teacher`), DVCLive metrics and
per-step plots in results/train/.

    python -m stages.train [--params params.yaml] [--shards data/shards] [--out model/teacher] ...

The loop itself (resume, schedule, validation, keep-best, checkpoints) is `stages.training.fit`,
shared with `train_distill`; the teacher's file format is in `stages.checkpoints`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages import losses
from stages.augment import invert_each, make_views
from stages.checkpoints import (
    TEACHER_FORMAT,
    TrainingError,
    build_teacher,
    run_fingerprint,
    teacher_config,
    write_output_dir,
)
from stages.distributed import (
    ONE_PROCESS,
    Ranks,
    usage_over_ranks,
    wrap_ddp,
)
from stages.model import MonolithicSegmenter
from stages.pseudo_labels import PseudoLabelHead, PseudoLabels
from stages.training import (
    DEFAULT_EXECUTION,
    USAGE_THRESHOLD,
    WEIGHT_DECAY,
    Execution,
    HeldOutBatches,
    add_stage_arguments,
    cluster_usage,
    embed_images,
    fit,
    global_scores,
    joined,
    run_stage,
    selection_sets,
)

# loss.contrastive_decay_steps = -1 (automatic): the decay a run selected by held-out loss gets.
# That loss keeps falling while the features drift, so without labels to see the drift the
# contrastive term is faded out instead (docs/experiments.md, "Stopping the drift").
AUTO_DECAY_WITHOUT_LABELS = 300
# Cells per image of the dense contrastive term: 128 scored level with it on Dubai
# (docs/experiments.md, "Knobs: removed and kept")
CONTRASTIVE_SAMPLES = 32


def resolved_decay_steps(decay_steps: int, labelled_selection: bool) -> int:
    """`loss.contrastive_decay_steps`, with -1 resolved: 0 (constant weight) when labelled tiles
    select the step, `AUTO_DECAY_WITHOUT_LABELS` when the held-out loss does."""
    if decay_steps >= 0:
        return decay_steps
    return 0 if labelled_selection else AUTO_DECAY_WITHOUT_LABELS


def contrastive_weight_at(step: int, weight: float, decay_steps: int) -> float:
    """`loss.contrastive` at a 0-based step: constant when `decay_steps` is 0, else a half-cosine from
    `weight` at step 0 to 0 at `decay_steps`, and 0 after it."""
    if decay_steps <= 0:
        return weight
    t = min(step / decay_steps, 1.0)
    return weight * 0.5 * (1.0 + math.cos(math.pi * t))


def teacher_losses(model: MonolithicSegmenter, views, loss_params, generator: torch.Generator,
                   contrastive_weight: float | None = None, ranks: Ranks = ONE_PROCESS,
                   pseudo: tuple[PseudoLabelHead, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All teacher loss terms for a list of two views; both views share one set of centres.

    `generator` draws the cells of the dense contrastive term. `contrastive_weight` replaces
    `loss.contrastive` in the total (the scheduled weight, `contrastive_weight_at`). With several
    `ranks` the views are this rank's slice of the global batch and every term is the global
    batch's value. `pseudo`: the pseudo-label head and the batch's targets (B, h, w) on the source
    grid (`PseudoLabels.targets`), for the `pseudo_labels` term (weight `loss.pseudo_labels`).
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
    idx = losses.sample_positions(global_b, side * side, CONTRASTIVE_SAMPLES,
                                  generator)[ranks.slice(global_b)]
    terms = {
        "contrastive": losses.dense_contrastive(emb_aligned[0], emb_aligned[1], idx,
                                                loss_params.contrastive_temperature, ranks),
        "consistency": losses.consistency(aligned[0], aligned[1]),
    }
    if pseudo is not None:
        head, targets = pseudo
        terms["pseudo_labels"] = sum(F.cross_entropy(head(e), targets) for e in emb_aligned) / len(emb_aligned)
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
    with joined(execution) as (device, ranks):
        return _train_teacher(dataset_root, out_dir, checkpoint_dir, results_dir, aug, model_params,
                              loss_params, train_params, execution, device, ranks, stop_after,
                              progress and ranks.is_main)


def pseudo_label_legend(sources: list[Path], train_params) -> PseudoLabels:
    """The teacher's pseudo-label legend, fitted on windows of the training `sources` drawn with
    their own seed (`train.seed` + 1 draws the held-out batches)."""
    return PseudoLabels.from_sources(sources, train_params.patch_size, train_params.batch_size, train_params.seed + 2)


@torch.no_grad()
def heldout_losses(model: MonolithicSegmenter, heldout: HeldOutBatches, aug, loss_params,
                   device: torch.device, pseudo: tuple[PseudoLabelHead, list[torch.Tensor]] | None = None
                   ) -> tuple[dict[str, float], np.ndarray]:
    """(each loss term and the total, averaged over the held-out batches; cluster shares over
    them). Minus the total is the selection score of a run without labelled tiles. Fixed views
    and contrastive cells per batch index, and the full contrastive weight, so stops along a run
    compare. `model` must be in eval mode. `pseudo`: the pseudo-label head and each held-out
    batch's targets."""
    sums, probs = {}, []
    for i, batch in enumerate(heldout.batches):
        views = make_views(batch, i, aug)
        views = [dataclasses.replace(v, input=v.input.to(device), guide=v.guide.to(device)) for v in views]
        terms = teacher_losses(model, views, loss_params, torch.Generator().manual_seed(i),
                               pseudo=None if pseudo is None else (pseudo[0], pseudo[1][i].to(device)))
        for name, value in terms.items():
            if not name.startswith("_"):
                sums[name] = sums.get(name, 0.0) + float(value)
        probs.append(terms["_probs"])
    return {name: total / len(heldout.batches) for name, total in sums.items()}, cluster_usage(torch.cat(probs))


def _train_teacher(dataset_root, out_dir, checkpoint_dir, results_dir, aug, model_params, loss_params,
                   train_params, execution, device, ranks, stop_after, progress) -> dict:
    from stages.datasets import RandomWindowBatches, read_summary

    rows = ranks.slice(train_params.batch_size, "train.batch_size")
    summary = read_summary(dataset_root)
    sources, labelled, heldout = selection_sets(dataset_root, train_params.val_max_tiles, train_params.patch_size,
                                                train_params.batch_size, train_params.seed + 1, ranks)
    batches = RandomWindowBatches(sources, [train_params.patch_size], train_params.batch_size,
                                  train_params.seed, "cycle", True)
    decay_steps = resolved_decay_steps(loss_params.contrastive_decay_steps, heldout is None)
    if decay_steps != loss_params.contrastive_decay_steps and decay_steps and progress:
        print(f"no labelled metrics_train tiles: the contrastive weight fades out over {decay_steps} steps "
              "(loss.contrastive_decay_steps = -1); set it to 0 to keep it constant")

    config = teacher_config(model_params)
    model = build_teacher(config).to(device)
    trained = list(model.parameters())
    pseudo_labels, head, heldout_targets = None, None, None
    if loss_params.pseudo_labels > 0:
        pseudo_labels = pseudo_label_legend(sources, train_params)
        head = PseudoLabelHead(model_params.embed_dim, pseudo_labels.k, model_params.seed).to(device)
        trained += list(head.parameters())
        if heldout is not None:
            heldout_targets = [pseudo_labels.targets(b) for b in heldout.batches]
    opt = torch.optim.AdamW(trained, lr=train_params.lr, weight_decay=WEIGHT_DECAY)
    fingerprint = run_fingerprint(aug, model_params, loss_params, train_params,
                                  data_hash=summary.get("params_hash", ""))
    trained_model = wrap_ddp(model, ranks, device)
    trained_head = None if head is None else wrap_ddp(head, ranks, device)

    def validate() -> dict:
        model.eval()
        with torch.no_grad():
            if labelled is not None:
                embs = embed_images(model.encoder, labelled.images, device)
                scores = global_scores(embs, labelled, model.head.temperature, model.smooth_iters,
                                       seed=train_params.seed)
                probs, _ = model.head(torch.cat([e.reshape(e.shape[0], -1) for e in embs], 1).T[:, :, None, None].to(device))
                usage = cluster_usage(probs[:, :, 0, 0])
                metric, score = f"{labelled.split}/miou", scores["miou"]
            else:
                means, usage = heldout_losses(model, heldout, aug, loss_params, device,
                                              None if head is None else (head, heldout_targets))
                score = -means["total"]
                metric = "heldout/neg_loss"
        model.train()
        clusters = int((usage >= USAGE_THRESHOLD).sum())
        return {"metric": metric, "score": score, "keep": {"clusters_ge_2pct": clusters},
                "logs": {f"val/{metric.split('/', 1)[1]}": score, "val/clusters_ge_2pct": clusters,
                         "val/min_cluster_share": float(usage.min())}}

    def make_batch(step: int):
        """This rank's rows of the step's views and, with pseudo-labels, of their targets."""
        batch = batches.batch(step)[0]
        views = [v.rows(rows) for v in make_views(batch, step, aug)]
        return views, None if pseudo_labels is None else pseudo_labels.targets(batch[rows])

    def train_step(step: int, data, lr: float):
        views, targets = data
        views = [dataclasses.replace(v, input=v.input.to(device), guide=v.guide.to(device)) for v in views]
        terms = teacher_losses(trained_model, views, loss_params,
                               torch.Generator().manual_seed(train_params.seed * 1_000_003 + step),
                               contrastive_weight_at(step, loss_params.contrastive, decay_steps),
                               ranks, None if targets is None else (trained_head, targets.to(device)))
        usage = usage_over_ranks(cluster_usage(terms["_probs"].detach()), ranks)
        metrics = {f"train/{name}": float(value.detach()) for name, value in terms.items() if not name.startswith("_")}
        metrics["train/lr"] = lr
        metrics["train/clusters_ge_2pct"] = int((usage >= USAGE_THRESHOLD).sum())
        return terms["total"], terms, metrics, {"loss": f"{metrics['train/total']:.3f}"}

    fitted = fit(stage="train", what="teacher training", steps=train_params.steps, base_lr=train_params.lr,
                 val_every=train_params.val_every, checkpoint_every=train_params.checkpoint_every,
                 model=model, opt=opt, extra_state={} if head is None else {"pseudo_label_head": head},
                 fingerprint=fingerprint,
                 checkpoint_path=checkpoint_dir / "last.pt", results_dir=results_dir,
                 # every rank draws the global batch and its augmentations, and keeps its rows
                 make_batch=make_batch,
                 train_step=train_step, validate=validate,
                 kept_weights=lambda: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                 ranks=ranks, prefetch=execution.prefetch, progress=progress,
                 summary={"max_k": model_params.max_k}, stop_after=stop_after)
    if fitted.stopped_at is not None:
        return {"stopped_at": fitted.stopped_at}
    if not ranks.is_main:
        return {}
    best = fitted.best
    blob = {"format": TEACHER_FORMAT, "config": config, "state_dict": best["state_dict"],
            # ground sample distance of the training tiles: the runtime resamples rasters to it
            "training_pixel_size_m": summary["pixel_size_m"].get("train"),
            # how the training pixels became 8-bit: the runtime maps new rasters the same way
            "input_rescale": summary["input_rescale"],
            "val": {"metric": best["metric"], "score": best["score"], "step": best["step"],
                    "clusters_ge_2pct": best["clusters_ge_2pct"]},
            "fingerprint": fingerprint}
    write_output_dir(out_dir, {"model.pt": lambda p: torch.save(blob, p)})
    tqdm.write(f"teacher: best {best['metric']} = {best['score']:.4f} at step {best['step']}; "
               f"{train_params.steps - fitted.start} steps in {fitted.elapsed:.1f}s on {ranks.world_size} "
               f"process(es), data wait {100 * fitted.wait_s / max(fitted.elapsed, 1e-9):.1f}%")
    return blob["val"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the teacher segmenter (DVC stage `train`).")
    add_stage_arguments(ap, "model/teacher", "model/checkpoints/teacher", "results/train")
    args = ap.parse_args(argv)

    def train(p, execution) -> None:
        train_teacher(Path(args.shards) / p.ingest.dataset, Path(args.out), Path(args.checkpoints),
                      Path(args.results), p.aug, p.model, p.loss, p.train, execution=execution,
                      progress=not args.no_progress)

    return run_stage("train", "stages.train", args, argv, train)


if __name__ == "__main__":
    sys.exit(main())
