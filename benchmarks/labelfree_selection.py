"""Label-free model-selection candidates against the labelled score, along one teacher run.

A run without labelled `metrics_train` tiles selects its teacher by held-out loss, which keeps
falling while the features drift (docs/experiments.md). This script trains the teacher of the
given params step by step (resuming its own checkpoint every `train.val_every` steps, so the run
is exactly the stage's) and at each stop scores the `metrics_train` split with labels (the stage's
global mIoU) and with label-free candidates computed on the same images' embeddings:

    compact       mean cosine of sampled cells to their k-means centre (k = number of classes)
    nb_cos        mean cosine of horizontally adjacent cells
    coherence     nb_cos minus the mean cosine of random cell pairs
    agree         share of adjacent cells with the same k-means label
    usage_entropy entropy of the k-means cluster shares / log k
    agree_x_ent   agree * usage_entropy
    shift_agree   share of cells whose k-means label stays when the image gets evaluate's colour
                  shift (`colour_shift_for`, strength 1), labelled with the same centres
    shift_x_ent   shift_agree * usage_entropy
    features_miou global mIoU of the embedding's clusters against the clusters of k-means on
                  evaluate's hand-crafted features (Lab colour + texture, k = number of classes,
                  one legend for the split) taken as labels
    rgb_miou      the same against k-means on RGB

and prints one JSON line per stop, then each candidate's Spearman correlation with the mIoU and
the mIoU at the step it would pick.

With `--label-free` the teacher trains exactly as it would on a dataset without labelled tiles:
it sees a copy of the dataset root whose `metrics_train` split is hidden, so it holds out a tenth
of the train tiles and validates by minus the mean loss on fixed batches of them
(`heldout_neg_loss`, the stage's own selection score, also listed as a candidate; `heldout_1batch`
is the same score on the first of those batches alone), while the mIoU is still computed on the
real labelled split. That shows what a run without labels would keep. Each term of the held-out
loss is a candidate too (`heldout_<term>`: minus its mean over the same batches).

    python benchmarks/labelfree_selection.py --params params.yaml --shards data/shards/dubai \
        -S model.embed_dim=8 -S train.steps=600 -S train.lr=0.001 -S train.val_every=50
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.baselines import KMeansBaseline, handcrafted_features, rgb_features  # noqa: E402
from stages.checkpoints import build_teacher, teacher_config  # noqa: E402
from stages.distributed import ONE_PROCESS  # noqa: E402
from stages.evaluate import ScoredImages, apply_colour_shift, colour_shift_for, score_method  # noqa: E402
from stages.params import parse_params  # noqa: E402
from stages.pseudo_labels import PseudoLabelHead  # noqa: E402
from stages.train import heldout_losses, pseudo_label_legend, train_teacher  # noqa: E402
from stages.training import (  # noqa: E402
    LabelledSet,
    embed_images,
    global_scores,
    load_labelled_split,
    sample_embeddings,
    selection_centres,
    selection_sets,
)

CANDIDATES = ("compact", "nb_cos", "coherence", "agree", "usage_entropy", "agree_x_ent", "shift_agree", "shift_x_ent",
              "features_miou", "rgb_miou")


def label_free_root(shards: Path, dst: Path) -> Path:
    """A dataset root with `shards`' train split and no labelled split (what a dataset without
    labels looks like to the train stage)."""
    summary = json.loads((shards / "summary.json").read_text())
    summary["counts"] = {"train": summary["counts"]["train"], "metrics_train": 0, "val": 0}
    dst.mkdir(parents=True)
    (dst / "summary.json").write_text(json.dumps(summary))
    shutil.copytree(shards / "train", dst / "train")  # a copy: the dataset reader refuses links out of its root
    return dst


def baseline_labels(images: list[np.ndarray], features, k: int, seed: int, samples: int = 100_000) -> list[np.ndarray]:
    """The global-protocol maps of k-means on `features` over `images` as evaluate makes them
    (`score_method`: one legend fitted on `samples` pixels), as uint8 (H, W) labels 1..k (0 is
    the scorer's ignore value)."""
    unlabelled = ScoredImages([str(i) for i in range(len(images))], images, [], [""] * len(images))
    run = score_method(KMeansBaseline(features, iters=50, restarts=3), unlabelled, k, 0, seed, 0, samples,
                       features.__name__)
    return [pred + 1 for pred in run.preds]


@torch.no_grad()
def label_free_scores(embs: list[torch.Tensor], shifted: list[torch.Tensor], k: int, seed: int = 0) -> dict:
    x = sample_embeddings(embs, 256, seed)
    centres = selection_centres(x, k, seed)
    compact = float((x @ centres.T).max(dim=1).values.mean())
    nb_cos = float(torch.cat([(e[:, :, 1:] * e[:, :, :-1]).sum(0).reshape(-1) for e in embs]).mean())
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    rand_cos = float((x * shuffled).sum(1).mean())
    same = total = kept = cells = 0
    counts = torch.zeros(k)
    for e, e_shifted in zip(embs, shifted):
        lab = torch.einsum("dhw,kd->khw", e, centres).argmax(0)
        same += int((lab[:, 1:] == lab[:, :-1]).sum())
        total += lab[:, 1:].numel()
        counts += torch.bincount(lab.reshape(-1), minlength=k)
        kept += int((torch.einsum("dhw,kd->khw", e_shifted, centres).argmax(0) == lab).sum())
        cells += lab.numel()
    p = counts / counts.sum()
    usage_entropy = float(-(p * p.clamp_min(1e-12).log()).sum() / np.log(k))
    agree = same / total
    return {"compact": compact, "nb_cos": nb_cos, "coherence": nb_cos - rand_cos, "agree": agree,
            "usage_entropy": usage_entropy, "agree_x_ent": agree * usage_entropy,
            "shift_agree": kept / cells, "shift_x_ent": kept / cells * usage_entropy}


def main() -> int:
    from scipy.stats import spearmanr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--shards", type=Path, required=True, help="data/shards/<dataset> with labelled metrics_train")
    ap.add_argument("--label-free", action="store_true",
                    help="train as on a dataset without labels (held-out loss selection), score with labels")
    ap.add_argument("--save", type=Path, default=None,
                    help="write every stop's metrics_train embeddings (stop-NNNNN.npy) and rows.jsonl here")
    ap.add_argument("-S", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE")
    args = ap.parse_args()

    raw = yaml.safe_load(args.params.read_text())
    for item in args.overrides:
        key, value = item.split("=", 1)
        group, name = key.split(".", 1)
        raw[group][name] = yaml.safe_load(value)
    p = parse_params(raw)
    labelled = load_labelled_split(args.shards)
    if labelled is None:
        raise SystemExit(f"{args.shards}: no labelled metrics_train tiles to compare against")
    shifted_images = [apply_colour_shift(rgb, *colour_shift_for(str(i), 1.0, p.train.seed))
                      for i, rgb in enumerate(labelled.images)]
    pseudo = {name: LabelledSet(labelled.images, baseline_labels(labelled.images, features, labelled.num_classes,
                                                                 p.train.seed),
                                labelled.num_classes, f"{name} clusters")
              for name, features in (("features_miou", handcrafted_features), ("rgb_miou", rgb_features))}
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / "rows.jsonl").write_text("")  # this run's stops only
    rows = []
    tmp = Path(tempfile.mkdtemp())
    candidates = CANDIDATES + (("heldout_neg_loss", "heldout_1batch") if args.label_free else ())
    try:
        train_root = label_free_root(args.shards, tmp / "labelfree") if args.label_free else args.shards
        if args.label_free:  # the stage's held-out batches, and its first batch alone
            train_sources, _, heldout = selection_sets(train_root, p.train.val_max_tiles, p.train.patch_size,
                                                       p.train.batch_size, p.train.seed + 1, ONE_PROCESS)
            first = copy.copy(heldout)
            first.batches = heldout.batches[:1]
            # the held-out loss holds the pseudo-label term too: the stage's legend, the stop's head
            legend = pseudo_label_legend(train_sources, p.train) if p.loss.pseudo_labels > 0 else None
            heldout_targets = None if legend is None else [legend.targets(b) for b in heldout.batches]
            first_targets = None if legend is None else heldout_targets[:1]
        for step in range(p.train.val_every, p.train.steps + 1, p.train.val_every):
            train_teacher(train_root, tmp / "teacher", tmp / "ckpt", tmp / "results", p.aug, p.model, p.loss,
                          dataclasses.replace(p.train, checkpoint_every=p.train.val_every), stop_after=step,
                          progress=False)
            model = build_teacher(teacher_config(p.model))
            checkpoint = torch.load(tmp / "ckpt" / "last.pt", weights_only=False)
            model.load_state_dict(checkpoint["model"])
            model.eval()
            with torch.no_grad():
                embs = embed_images(model.encoder, labelled.images, torch.device("cpu"))
                shifted = embed_images(model.encoder, shifted_images, torch.device("cpu"))
                scores = {name: global_scores(embs, scored, model.head.temperature, model.smooth_iters,
                                              seed=p.train.seed)["miou"]
                          for name, scored in (("miou", labelled), *pseudo.items())}
            row = {"step": step, "miou": round(scores.pop("miou"), 4),
                   **{k: round(v, 4) for k, v in label_free_scores(embs, shifted, labelled.num_classes).items()},
                   **{k: round(v, 4) for k, v in scores.items()}}
            if args.label_free:  # the stage's own score at this stop, from its DVCLive log
                log = (tmp / "results/plots/metrics/val/neg_loss.tsv").read_text().splitlines()
                row["heldout_neg_loss"] = round(float(log[-1].split("\t")[1]), 4)
                head = None
                if first_targets is not None:
                    head = PseudoLabelHead(p.model.embed_dim, legend.k)
                    head.load_state_dict(checkpoint["pseudo_label_head"])
                first_means, _ = heldout_losses(model, first, p.aug, p.loss, torch.device("cpu"),
                                                None if head is None else (head, first_targets))
                row["heldout_1batch"] = round(-first_means["total"], 4)
                means, _ = heldout_losses(model, heldout, p.aug, p.loss, torch.device("cpu"),
                                          None if head is None else (head, heldout_targets))
                row.update({f"heldout_{name}": round(-value, 4) for name, value in means.items() if name != "total"})
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.save:
                np.save(args.save / f"stop-{step:05d}.npy", np.stack([e.numpy() for e in embs]).astype(np.float16))
                with open(args.save / "rows.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(tmp)
    mious = [r["miou"] for r in rows]
    candidates += tuple(key for key in rows[0] if key.startswith("heldout_") and key not in candidates)
    for key in candidates:
        picked = max(rows, key=lambda r: r[key])
        print(f"{key}: spearman {spearmanr(mious, [r[key] for r in rows]).correlation:.2f}; "
              f"picks step {picked['step']} (mIoU {picked['miou']})")
    print(f"labels pick step {max(rows, key=lambda r: r['miou'])['step']} (mIoU {max(mious)}); "
          f"the last step has {mious[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
