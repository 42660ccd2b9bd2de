"""Do the model's clusters hold when the images of one run differ in colour (other flights,
sensors, dates, haze)?

Every tile of `--split` is given the colour shift of its source image: one seeded draw per source
image, so the tiles of one image agree and the images disagree, as in a mosaic of several flights.
The shift of strength s is evaluate's `colour_shift_for` (gains, gamma curve and haze). Strength 1
is about the range of the teacher's photometric augmentation (haze is not among the training
augmentations; evaluate's label-free jitter_agreement uses strength 1), strength 2 twice that. The
model (`model/best` through the numpy runtime) and both k-means baselines are then scored by
evaluate's own `score_method` under both protocols, one strength after another on the same tiles.
The global protocol (one set of centres for all images) is the one a shift can hurt; per tile, a
shift common to the whole tile matters little to any method that refits its centres per tile.
Prints a table and, last, one JSON line: global mIoU per method and strength and, per strength,
model / kmeans_features.

    python benchmarks/colour_shift_check.py --shards data/shards/dubai --model model/best \\
        [--split metrics_train] [--strengths 0 1 2] [--every 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.baselines import KMeansBaseline, handcrafted_features, rgb_features  # noqa: E402
from stages.datasets import read_summary  # noqa: E402
from stages.evaluate import (  # noqa: E402
    RuntimeSegmenter,
    ScoredImages,
    apply_colour_shift,
    colour_shift_for,
    load_model_dir,
    load_val_tiles,
    score_method,
)
from stages.params import EvaluateParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True, help="data/shards/<dataset>")
    ap.add_argument("--model", type=Path, required=True, help="artifact directory (model/best)")
    ap.add_argument("--split", default="metrics_train")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    ap.add_argument("--every", type=int, default=1, help="use every n-th tile (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shifts (default: %(default)s)")
    args = ap.parse_args()

    summary = read_summary(args.shards)
    num_classes = int(summary["num_classes"])
    split = load_val_tiles(args.shards, num_classes, args.split)
    picked = range(0, len(split.images), args.every)
    item_ids, images, labels, groups, sources = ([getattr(split, f)[i] for i in picked]
                                                 for f in ("item_ids", "images", "labels", "groups", "sources"))
    p = EvaluateParams()  # evaluate's defaults: samples, restarts, iterations, seed
    methods = {
        "model": RuntimeSegmenter(load_model_dir(args.model), p.kmeans_restarts),
        "kmeans_rgb": KMeansBaseline(rgb_features, p.kmeans_iters, p.kmeans_restarts),
        "kmeans_features": KMeansBaseline(handcrafted_features, p.kmeans_iters, p.kmeans_restarts),
    }
    t0 = time.perf_counter()
    result: dict = {"split": args.split, "tiles": len(images), "sources": len(set(sources))}
    print(f"{'strength':>8} {'method':<16} {'global mIoU':>11} {'tile mIoU':>10}")
    for s in args.strengths:
        shifted = ScoredImages(item_ids, [apply_colour_shift(rgb, *colour_shift_for(src, s, args.seed))
                                          for rgb, src in zip(images, sources)],
                               labels, groups, split_tiles=len(images), sources=sources)
        for name, method in methods.items():
            run = score_method(method, shifted, num_classes, num_classes, p.seed, p.samples_per_tile,
                               p.global_samples, name)
            g, t = run.glob.result()["miou"], run.per_image.result()["miou"]
            result[f"{name}@{s:g}"] = round(g, 4)
            print(f"{s:>8g} {name:<16} {g:>11.4f} {t:>10.4f}", flush=True)
        result[f"model_over_kmeans_features@{s:g}"] = round(result[f"model@{s:g}"]
                                                            / result[f"kmeans_features@{s:g}"], 3)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
