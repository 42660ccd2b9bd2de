"""One training step of the teacher and of the student on the global batch of step 0, as the
training stages take it; writes the loss terms and the gradients (after DDP's average) of rank 0
to OUT. Run with plain python (one process) or under torchrun (tests/test_distributed.py).

    python tests/distributed_step.py PARAMS SHARDS OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.augment import make_views  # noqa: E402
from stages.checkpoints import build_teacher, teacher_config  # noqa: E402
from stages.datasets import RandomWindowBatches, split_sources  # noqa: E402
from stages.distributed import close_ranks, wrap_ddp  # noqa: E402
from stages.model import student_from_params  # noqa: E402
from stages.params import load_params  # noqa: E402
from stages.pseudo_labels import PseudoLabelHead  # noqa: E402
from stages.train import pseudo_label_legend, teacher_losses  # noqa: E402
from stages.train_distill import Distiller, distill_losses, prepare_batch  # noqa: E402
from stages.training import Execution  # noqa: E402


def main(params_path: str, shards: str, out: str) -> None:
    p = load_params(params_path)
    device, ranks = Execution(device="cpu", threads=1).apply()
    sources = split_sources(Path(shards) / p.ingest.dataset, "train")
    result = {}

    # teacher, with its pseudo-label head
    batches = RandomWindowBatches(sources, [p.train.patch_size], p.train.batch_size, p.train.seed)
    batch = batches.batch(0)[0]
    rows = ranks.slice(p.train.batch_size)
    views = [v.rows(rows) for v in make_views(batch, 0, p.aug)]
    raw = build_teacher(teacher_config(p.model))
    model = wrap_ddp(raw, ranks, device).train()
    labels = pseudo_label_legend(sources, p.train)
    raw_head = PseudoLabelHead(p.model.embed_dim, labels.k, p.model.seed)
    head = wrap_ddp(raw_head, ranks, device)
    terms = teacher_losses(model, views, p.loss, torch.Generator().manual_seed(0), ranks=ranks,
                           pseudo=(head, labels.targets(batch[rows])))
    terms["total"].backward()
    result["teacher_terms"] = {k: float(v.detach()) for k, v in terms.items() if not k.startswith("_")}
    result["teacher_grads"] = {**{n: q.grad.clone() for n, q in raw.named_parameters()},
                               **{f"pseudo_head.{n}": q.grad.clone() for n, q in raw_head.named_parameters()}}
    result["teacher_running_var"] = raw.encoder.stem[0].norm.running_var.clone()

    # student, distilled from the (untrained) teacher above in eval mode
    teacher = build_teacher(teacher_config(p.model)).eval()
    batches = RandomWindowBatches(sources, p.data.patch_sizes, p.distill.batch_size, p.distill.seed)
    batch, _ = batches.batch(0)
    x, guide = prepare_batch(batch, p.distill.seed, 0)
    rows = ranks.slice(p.distill.batch_size)
    torch.manual_seed(p.distill.seed)
    raw = Distiller(student_from_params(p.student), teacher.encoder.embed_dim)
    distiller = wrap_ddp(raw, ranks, device).train()
    terms = distill_losses(distiller, teacher, x[rows], guide[rows], p.distill, p.loss.edge_sigma,
                           torch.Generator().manual_seed(0), ranks)
    terms["raw"].backward()
    result["student_terms"] = {k: float(v.detach()) for k, v in terms.items() if not k.startswith("_")}
    result["student_grads"] = {n: q.grad.clone() for n, q in raw.named_parameters()}
    if ranks.is_main:
        torch.save(result, out)
    close_ranks(ranks)


if __name__ == "__main__":
    main(*sys.argv[1:4])
