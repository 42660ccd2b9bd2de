"""Stage `train_distill`: a small single-scale student `Encoder` learns from the frozen teacher.

Each step draws a batch of random windows at one patch size from `data.patch_sizes` (chosen by
`data.patch_size_sampling`, in pixels), one random dihedral transform per window (the teacher and
the student see the same pixels), and computes, at that patch size (stages.losses):

- feature distillation: 1 - cos between the student's embedding, mapped to the teacher's width by a
  learned 1x1 projection (identity when the widths agree), and the teacher's embedding;
- affinity distillation: the student's and the teacher's cosine affinities between the same
  `AFFINITY_SAMPLES` (256) cells per image must agree (width-free: it shapes the student's own
  embedding space, which is what the runtime clusters);
- cluster distillation: KL(teacher || student) of soft assignments to the teacher's centres
  (the teacher's prototypes refined on the batch), the student through its projection;
- edge-aware TV of the student's assignments.

Patch sizes produce losses of different magnitudes, so each patch size's weighted loss is divided
by its own EMA (`distill.ema_decay`, `distill.ema_eps`) and the normalised losses are merged by a
geometric mean (stages.losses.EmaNormaliser). Raw and normalised per-size losses and the merged
value are logged with DVCLive. Model selection, checkpoints and resume: `stages.training.fit`, as for the teacher.
Only the student encoder is written to model/student/model.pt (the projection is a training aid).

    python -m stages.train_distill [--params params.yaml] [--teacher model/teacher] ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from stages import losses
from stages.augment import apply_each, draw_transforms, normalise01, step_generator, to_rgb01
from stages.checkpoints import (
    STUDENT_FORMAT,
    TrainingError,
    read_teacher,
    run_fingerprint,
    student_config,
    teacher_config,
    write_output_dir,
)
from stages.distributed import (
    ONE_PROCESS,
    Ranks,
    usage_over_ranks,
    wrap_ddp,
)
from stages.model import Encoder, student_from_params
from stages.training import (
    DEFAULT_EXECUTION,
    USAGE_THRESHOLD,
    WEIGHT_DECAY,
    Execution,
    add_stage_arguments,
    cluster_usage,
    embed_images,
    fit,
    global_scores,
    joined,
    run_stage,
    selection_sets,
)

# Cells per image whose affinities the student must match: 64 and 1024 scored level with it on the
# synthetic default (docs/experiments.md, "Knobs: removed and kept")
AFFINITY_SAMPLES = 256


class Distiller(nn.Module):
    """The student encoder plus the learned 1x1 projection to the teacher's embedding width."""

    def __init__(self, student: Encoder, teacher_dim: int):
        super().__init__()
        self.student = student
        self.project = (nn.Conv2d(student.embed_dim, teacher_dim, 1) if student.embed_dim != teacher_dim
                        else nn.Identity())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (student unit embeddings (B, Ds, h, w), projected unit embeddings (B, Dt, h, w))."""
        emb = self.student(x)
        return emb, F.normalize(self.project(emb), dim=1, eps=1e-12)


def distill_losses(distiller: Distiller, teacher, x: torch.Tensor, guide: torch.Tensor, distill,
                   edge_sigma: float, generator: torch.Generator, ranks: Ranks = ONE_PROCESS
                   ) -> dict[str, torch.Tensor]:
    """Weighted distillation terms for one batch at one patch size; 'raw' is their weighted sum.

    With several `ranks`, `x` and `guide` are this rank's slice of the global batch; the teacher's
    centres and every term are the global batch's."""
    with torch.no_grad():
        t_emb = teacher.encoder(x)
        t_probs, t_centres = teacher.head(t_emb, total=ranks.sum if ranks.distributed else None)
    s_emb, s_proj = distiller(x)
    s_logits = torch.einsum("bdhw,kd->bkhw", s_proj, t_centres) / teacher.head.temperature
    s_probs = torch.softmax(s_logits, dim=1)
    b, _, h, w = t_emb.shape
    global_b = b * ranks.world_size  # the cells are drawn for the global batch, whatever the ranks
    idx = losses.sample_positions(global_b, h * w, AFFINITY_SAMPLES, generator)[ranks.slice(global_b)]
    terms = ranks.mean_each({  # means over this rank's samples -> the global batch's
        "feature": losses.cosine_distillation(s_proj, t_emb),
        "affinity": losses.affinity_distillation(s_emb, t_emb, idx),
        "cluster": losses.cluster_distillation(s_probs, t_probs),
        "tv": losses.edge_aware_tv(s_probs, guide, edge_sigma),
    })
    weights = {"feature": distill.feature_weight, "affinity": distill.affinity_weight,
               "cluster": distill.cluster_weight, "tv": distill.tv_weight}
    terms["raw"] = sum(weights[name] * value for name, value in terms.items())
    terms["_probs"] = s_probs
    return terms


def prepare_batch(batch_uint8: np.ndarray, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One random dihedral transform per window (shared by teacher and student) -> (input, guide)."""
    transforms = draw_transforms(step_generator(seed, step, stream=1), len(batch_uint8), True, True)
    guide = apply_each(to_rgb01(batch_uint8), transforms)
    return normalise01(guide), guide


def train_student(dataset_root: Path, teacher_path: Path, out_dir: Path, checkpoint_dir: Path,
                  results_dir: Path, model_params, loss_params, student, data, distill, train_params, *,
                  execution: Execution = DEFAULT_EXECUTION, stop_after: int | None = None,
                  progress: bool = True) -> dict:
    """Distil the teacher into the student; returns the best validation record.

    `model_params` is the declared teacher architecture (the checkpoint must match it);
    `loss_params.edge_sigma` sets the TV edge weights; `train_params` gives `val_max_tiles` (the
    teacher's selection tiles are the student's too); `execution`: device, threads, prefetch and
    processes. Returns {} on the ranks other than 0 of a distributed run (stages.distributed).
    """
    bad = [s for s in data.patch_sizes if s % 4]
    if bad:
        raise TrainingError(f"data.patch_sizes must be multiples of 4 (the network stride), got {bad}")
    if not data.patch_sizes:
        raise TrainingError("data.patch_sizes is empty")
    with joined(execution) as (device, ranks):
        return _train_student(dataset_root, teacher_path, out_dir, checkpoint_dir, results_dir, model_params,
                              loss_params, student, data, distill, train_params, execution, device, ranks,
                              stop_after, progress and ranks.is_main)


def _train_student(dataset_root, teacher_path, out_dir, checkpoint_dir, results_dir, model_params, loss_params,
                   student, data, distill, train_params, execution, device, ranks, stop_after, progress) -> dict:
    from stages.datasets import RandomWindowBatches, read_summary

    rows = ranks.slice(distill.batch_size, "distill.batch_size")
    teacher, t_info = read_teacher(teacher_path, expect=teacher_config(model_params))
    teacher = teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    summary = read_summary(dataset_root)
    sources, labelled, heldout = selection_sets(dataset_root, train_params.val_max_tiles, min(data.patch_sizes),
                                                distill.batch_size, distill.seed + 1, ranks)
    batches = RandomWindowBatches(sources, data.patch_sizes, distill.batch_size, distill.seed,
                                  data.patch_size_sampling, True)

    torch.manual_seed(distill.seed)
    distiller = Distiller(student_from_params(student), teacher.encoder.embed_dim).to(device)
    opt = torch.optim.AdamW(distiller.parameters(), lr=distill.lr, weight_decay=WEIGHT_DECAY)
    normaliser = losses.EmaNormaliser(distill.ema_decay, distill.ema_eps)
    fingerprint = run_fingerprint(student, data, distill, data_hash=(
        f"{summary.get('params_hash', '')}:{t_info['fingerprint']}:{loss_params.edge_sigma}:"
        f"{train_params.val_max_tiles}"))
    trained = wrap_ddp(distiller, ranks, device)

    def validate() -> dict:
        distiller.eval()
        with torch.no_grad():
            if labelled is not None:
                embs = embed_images(distiller.student, labelled.images, device)
                scores = global_scores(embs, labelled, teacher.head.temperature, teacher.smooth_iters,
                                       seed=distill.seed)
                metric, score, share = f"{labelled.split}/miou", scores["miou"], scores["min_cluster_share"]
            else:
                raws, probs = [], []
                for i, batch in enumerate(heldout.batches):  # fixed transforms and draws per batch index
                    x, guide = prepare_batch(batch, distill.seed + 1, i)
                    terms = distill_losses(distiller, teacher, x.to(device), guide.to(device), distill,
                                           loss_params.edge_sigma, torch.Generator().manual_seed(distill.seed + i))
                    raws.append(float(terms["raw"]))
                    probs.append(terms["_probs"])
                metric, score = "heldout/neg_loss", -sum(raws) / len(raws)
                share = float(cluster_usage(torch.cat(probs)).min())
        distiller.train()
        return {"metric": metric, "score": score,
                "logs": {f"val/{metric.split('/', 1)[1]}": score, "val/min_cluster_share": share}}

    def make_batch(i: int):  # every rank draws the global batch and its transforms, and keeps its rows
        batch, size = batches.batch(i)
        x, guide = prepare_batch(batch, distill.seed, i)
        return size, x[rows], guide[rows]

    def train_step(step: int, batch, lr: float):
        size, x, guide = batch
        x, guide = x.to(device), guide.to(device)
        # dropout draws: a function of the step (and of the rank: with student.dropout > 0 a
        # distributed run draws other masks than one process)
        torch.manual_seed(distill.seed * 1_000_003 + step + 7919 * ranks.rank)
        gen = torch.Generator().manual_seed(distill.seed * 1_000_003 + step)
        terms = distill_losses(trained, teacher, x, guide, distill, loss_params.edge_sigma, gen, ranks)
        key = str(size)
        normalised = normaliser.normalise(key, terms["raw"])
        merged = normaliser.merged(key, normalised)
        metrics = {f"distill/{name}": float(terms[name].detach()) for name in ("feature", "affinity", "cluster", "tv")}
        metrics[f"distill/raw_p{size}"] = float(terms["raw"].detach())
        metrics[f"distill/normalised_p{size}"] = float(normalised.detach())
        metrics["distill/merged_geomean"] = float(merged.detach())
        metrics["distill/lr"] = lr
        usage = usage_over_ranks(cluster_usage(terms["_probs"].detach()), ranks)
        metrics["distill/clusters_ge_2pct"] = int((usage >= USAGE_THRESHOLD).sum())
        return merged, terms, metrics, {"merged": f"{metrics['distill/merged_geomean']:.3f}"}

    fitted = fit(stage="train_distill", what="distillation", steps=distill.steps, base_lr=distill.lr,
                 val_every=distill.val_every, checkpoint_every=distill.checkpoint_every,
                 model=distiller, opt=opt, extra_state={"normaliser": normaliser}, fingerprint=fingerprint,
                 checkpoint_path=checkpoint_dir / "last.pt", results_dir=results_dir, make_batch=make_batch,
                 train_step=train_step, validate=validate,
                 kept_weights=lambda: {k: v.detach().cpu().clone() for k, v in distiller.student.state_dict().items()},
                 ranks=ranks, prefetch=execution.prefetch, progress=progress, stop_after=stop_after)
    if fitted.stopped_at is not None:
        return {"stopped_at": fitted.stopped_at}
    if not ranks.is_main:
        return {}
    best = fitted.best
    blob = {"format": STUDENT_FORMAT, "config": student_config(student), "state_dict": best["state_dict"],
            "val": {"metric": best["metric"], "score": best["score"], "step": best["step"]},
            "teacher": {"config": t_info["config"], "val": t_info["val"], "fingerprint": t_info["fingerprint"]},
            "fingerprint": fingerprint}
    write_output_dir(out_dir, {"model.pt": lambda p: torch.save(blob, p)})
    tqdm.write(f"student: best {best['metric']} = {best['score']:.4f} at step {best['step']}; "
               f"{distill.steps - fitted.start} steps in {fitted.elapsed:.1f}s on {ranks.world_size} process(es), "
               f"data wait {100 * fitted.wait_s / max(fitted.elapsed, 1e-9):.1f}%")
    return blob["val"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Distil the teacher into the student (DVC stage `train_distill`).")
    add_stage_arguments(ap, "model/student", "model/checkpoints/student", "results/train_distill")
    ap.add_argument("--teacher", default="model/teacher")
    args = ap.parse_args(argv)

    def train(p, execution) -> None:
        train_student(Path(args.shards) / p.ingest.dataset, Path(args.teacher), Path(args.out),
                      Path(args.checkpoints), Path(args.results), p.model, p.loss, p.student, p.data,
                      p.distill, p.train, execution=execution, progress=not args.no_progress)

    return run_stage("train_distill", "stages.train_distill", args, argv, train)


if __name__ == "__main__":
    sys.exit(main())
