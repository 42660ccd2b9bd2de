"""Stage `evaluate`: score model/best through the numpy runtime, beside the baselines, on `val`
(or, for a set without labels, its label-free figures on `train`).

What users run is what is scored: the exported artifact is loaded with `runtime.load_model` and
segments every labelled tile of the `val` split (or a fixed subset of `evaluate.max_tiles` of them,
for splits too large to score in full) with k = summary.json's num_classes (or `evaluate.k`). Beside it, on exactly the same tiles, k and protocols:
- `teacher`: the trained teacher's encoder, run through the same runtime code (in memory);
- `kmeans_rgb`: k-means on raw RGB (what the QGIS plugin offers for free);
- `kmeans_features`: k-means on hand-crafted colour + texture features (see `stages/baselines.py`).

Two protocols (definitions in `stages/metrics.py`), each with its own cluster centres:
- `global`: one set of centres fitted on `evaluate.global_samples` pixels/embeddings drawn from all
  val tiles, one Hungarian matching for the whole split: the same cluster id must mean the same
  class everywhere (what a GIS user gets from one model on one region);
- `per_tile`: centres fitted on `evaluate.samples_per_tile` samples of each tile alone and matched
  on that tile (partition quality).
Truth labels 0 are ignored; every predicted pixel of a labelled pixel counts.

Tiles are scored one by one, each seen alone with zero padding at its borders (the 39 px receptive
field and the smoothing reach about 20 px into a 256 px tile from every side). A user's raster
has its neighbours there: `segment_raster` runs whole rasters, seamlessly. So with `evaluate.rasters`
(the default) every method is also scored on the tiles' whole source rasters from data/raw, each
segmented in one piece (the model through `Model.embed_cells` on the whole array, which equals
`segment_raster`'s tiled result), under the same two protocols: `global` (one set of centres
sampled from all rasters in proportion to their areas, one matching) and `per_raster` (each
raster's own centres and matching, as `segment_raster` fits them by default).

Label-free figures, for every method on the scored tiles (`label_free_figures`; all a set without
labels gets, on its `train` tiles with k = `evaluate.k` or `UNLABELLED_K`): the clusters' pixel
shares, their agreement across seeds of the global centres and under a colour shift of the image,
and each method's agreement with the model (docs/evaluation.md, "Imagery without labels").

Outputs (written to a temporary directory, then moved into `--out`; on any error the previous
metrics.json is removed so nothing stale looks current):
- `metrics.json` (the headline for `dvc metrics show/diff`): per method and protocol mIoU,
  pixel accuracy and boundary F-score (`boundary_f`, `stages.metrics.BoundaryScore`, within 2 px;
  `<method>.rasters.global` / `.per_raster` for the whole rasters); `ratio_miou` (model / method)
  per protocol; `tiles` scored of the split's `split_tiles`, `rasters` scored;
- `per_class_iou.json`: per method and protocol, IoU of every class by name (null when the class
  is in neither truth nor prediction);
- `per_group.json`: per method and split group (area, `shards.group_regex`), its tile count and
  both protocols' mIoU and pixel accuracy; the global protocol keeps the split's one matching, so
  it shows how well the clusters shared by all areas fit each one (generalisation across places);
- `plots/confusion.json`: the model's global-protocol matched confusion for `dvc plots`
  (`confusion` template), 100 records per true class, one per percent of its pixels;
- `cluster_shares.json`: per method, the pixel share of every cluster, for all tiles and per group;
- `plots/overlays/<item_id>.png`: image | truth | model prediction (global protocol), each
  predicted cluster drawn in the colour of the class it is matched to, unmatched clusters magenta
  (image | clusters without labels, where `plots/confusion.json` holds no records).

    python -m stages.evaluate [--params params.yaml] [--shards data/shards] [--raw data/raw]
                              [--model model/best] [--teacher model/teacher] [--out results/evaluate]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from runtime import Model, load_model
from runtime.artifact import build_meta, clustering_settings
from runtime.command import run_command
from runtime.destination import check_folder, child, discard, remove_stale, temporary
from runtime.model import sample_rows
from stages.baselines import KMeansBaseline, handcrafted_features, rgb_features
from stages.checkpoints import TrainingError, read_teacher
from stages.datasets import DatasetError, TileDataset, read_summary
from stages.metrics import (
    BoundaryScore,
    GlobalProtocol,
    PerTileProtocol,
    cooccurrence,
    matched_agreement,
    matched_confusion,
    row_percent_records,
    scores_from_matched,
    share_figures,
)
from stages.model import INPUT_MEAN, INPUT_SCALE, INPUT_STD, output_size
from stages.params import EvaluateParams, ParamsError, load_params
from stages.rasterio_utils import RasterError

METHODS = ("model", "teacher", "kmeans_rgb", "kmeans_features")
BASELINES = METHODS[1:]

# Overlay colours (RGB) by class id 1..16; 0 (ignored) is black, unmatched clusters magenta.
PALETTE = np.array([
    [0, 0, 0], [31, 119, 180], [44, 160, 44], [188, 189, 34], [140, 86, 75], [127, 127, 127],
    [214, 39, 40], [23, 190, 207], [255, 127, 14], [148, 103, 189], [174, 199, 232], [152, 223, 138],
    [255, 187, 120], [196, 156, 148], [199, 199, 199], [219, 219, 141], [158, 218, 229],
], dtype=np.uint8)
UNMATCHED_COLOUR = np.array([255, 0, 255], dtype=np.uint8)
OVERLAY_GAP_PX = 4
# Clusters of a set without labels when evaluate.k is 0: the covers a GIS user first separates on
# aerial RGB (water, trees, grass or field, bare soil, roads and paved, buildings).
UNLABELLED_K = 6
# Extra seeds of the global centres behind the label-free seed_agreement.
STABILITY_SEEDS = 2


class EvaluateError(ValueError):
    """Evaluation inputs missing or inconsistent (no labelled tiles, label out of range, bad k)."""


class Segmenter(Protocol):
    """How evaluate drives a method: rows to cluster per image, centres from rows, labels.

    `features(rgb)` -> (N, F) float32 rows (pixels for the baselines, stride-4 cells for the
    network); `fit(samples, k, seed)` -> (k, F) centres for the whole split (global protocol) and
    `fit_tile(samples, k, seed)` -> (k, F) centres for one tile (per-tile protocol, the way a user
    fits centres per raster); `labels(feats, rgb, centres)` -> uint8 (H, W) cluster ids in [0, k) of
    the image `rgb` whose `features` are `feats` (the model's smoothing follows its colours).
    """

    def features(self, rgb: np.ndarray) -> np.ndarray: ...

    def fit(self, samples: np.ndarray, k: int, seed: int = 0) -> np.ndarray: ...

    def fit_tile(self, samples: np.ndarray, k: int, seed: int = 0) -> np.ndarray: ...

    def labels(self, feats: np.ndarray, rgb: np.ndarray, centres: np.ndarray) -> np.ndarray: ...


class RuntimeSegmenter:
    """A runtime `Model` as a `Segmenter`, through the same calls `Model.predict_labels` makes
    (embed_cells -> fit_centres_from_cells -> labels_from_cells), so each tile
    is embedded once per pass instead of once per call. Centres for the split are fitted plainly
    (as `Model.fit_centres`); a tile's own centres with `tile_balance` micro-clusters of
    density-balanced fitting (as `segment_raster` and `predict_*` fit them per raster or image)."""

    def __init__(self, model: Model, restarts: int, tile_balance: int = 0):
        self.model, self.restarts, self.tile_balance = model, restarts, tile_balance

    def features(self, rgb: np.ndarray) -> np.ndarray:
        cells = self.model.embed_cells(rgb)
        return cells.reshape(-1, cells.shape[2])

    def fit(self, samples: np.ndarray, k: int, seed: int = 0, balance: int = 0) -> np.ndarray:
        return self.model.fit_centres_from_cells([samples], k, seed=seed, samples=len(samples),
                                                 restarts=self.restarts, balance=balance)

    def fit_tile(self, samples: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
        return self.fit(samples, k, seed, balance=self.tile_balance)

    def labels(self, feats: np.ndarray, rgb: np.ndarray, centres: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        cells = feats.reshape(output_size(h), output_size(w), -1)
        return self.model.labels_from_cells(cells, centres, h, w, image=rgb)


@dataclass
class ScoredImages:
    """The images one evaluation scores (tiles of a split, or whole rasters), with their labels
    (`labels` empty for a set without labels)."""

    item_ids: list[str]
    images: list[np.ndarray]   # uint8 (H, W, 3)
    labels: list[np.ndarray]   # uint8 (H, W), 0 = ignored, 1..num_classes
    groups: list[str]          # split group (area) of each tile's source raster
    split_tiles: int = 0       # tiles in the split; more than len(images) under evaluate.max_tiles
    sources: list[str] = field(default_factory=list)  # each tile's source raster (item id)


def class_names(summary: dict) -> list[str]:
    """Names of classes 1..num_classes (from summary.json, else class_<c>)."""
    names = summary.get("class_names") or {}
    return [str(names.get(str(c), f"class_{c}")) for c in range(1, summary["num_classes"] + 1)]


def _scored_tiles(ds: TileDataset, with_labels: bool) -> ScoredImages:
    """The tiles of `ds` in index order, with their labels when `with_labels`."""
    tiles = ScoredImages([], [], [], [], split_tiles=ds.split_tiles)
    for i, r in enumerate(ds.records):
        item = ds[i]
        tiles.item_ids.append(r.item_id)
        tiles.images.append(item["image"])
        tiles.groups.append(r.group)
        tiles.sources.append(r.source_item)
        if with_labels:
            tiles.labels.append(item["label"])
    return tiles


def load_val_tiles(dataset_root: Path, num_classes: int, split: str = "val",
                   max_tiles: int = 0) -> ScoredImages:
    """Every tile of `split` with its label, or the fixed subset of `max_tiles` of them
    (`stable_subset`; 0 = all); errors on unlabelled tiles or labels > num_classes."""
    try:  # the split's tiles, every one labelled (checked on the whole split), image and label shapes
        ds = TileDataset(dataset_root, split, require_labels=True, max_tiles=max_tiles)
    except DatasetError as e:
        raise EvaluateError(f"{e} (evaluate refuses an empty split and one with no label on some tile)") from None
    tiles = _scored_tiles(ds, with_labels=True)
    for r, label in zip(ds.records, tiles.labels):
        if label.size and int(label.max()) > num_classes:
            raise EvaluateError(f"{r.target}: label value {int(label.max())} exceeds num_classes "
                                f"{num_classes} of {dataset_root / 'summary.json'}")
    if not any((lab > 0).any() for lab in tiles.labels):
        raise EvaluateError(f"{dataset_root / split}: every label pixel is 0 (ignored); nothing to score")
    return tiles


def load_unlabelled_tiles(dataset_root: Path, split: str, max_tiles: int = 0) -> ScoredImages:
    """Every tile of `split` (or the fixed subset of `max_tiles`), labels left out (`labels` empty)."""
    ds = TileDataset(dataset_root, split, max_tiles=max_tiles)
    if not ds.records:
        raise EvaluateError(f"{dataset_root / split}: split {split!r} has no tiles; nothing to segment")
    return _scored_tiles(ds, with_labels=False)


def load_val_rasters(raw_dir: Path, tiles: ScoredImages, num_classes: int, fill: np.ndarray) -> ScoredImages:
    """The whole source rasters of `tiles` (data/raw, by the tiles' source item ids, in id order),
    each with its label on the image's grid, as `ScoredImages` (one entry per raster; `groups` are
    the tiles' groups). Pixels that are nodata in the image are ignored in the label and set to
    `fill`, the colour segment_raster feeds the network there."""
    from rasterio.windows import Window

    from stages.build_shards import ShardsError, read_manifest
    from stages.rasterio_utils import open_raster, read, read_label_aligned, read_valid

    try:
        entries, _ = read_manifest(raw_dir)
    except ShardsError as e:
        raise EvaluateError(f"{e} (evaluate.rasters scores the val split's whole rasters)") from None
    by_id = {e["item_id"]: e for e in entries}
    group_of = dict(zip(tiles.sources, tiles.groups))
    rasters = ScoredImages([], [], [], [])
    for item in sorted(group_of):
        entry = by_id.get(item)
        if entry is None or not entry["label"]:
            raise EvaluateError(f"{raw_dir / 'manifest.jsonl'}: no labelled item {item!r}, the source of val tiles: "
                                "data/raw and the shards disagree (rerun build_shards)")
        with open_raster(raw_dir / entry["image"], what="image") as src, \
                open_raster(raw_dir / entry["label"], what="label raster") as lab:
            window = Window(0, 0, src.width, src.height)
            rgb = np.ascontiguousarray(read(src, [1, 2, 3], window).transpose(1, 2, 0))
            valid = read_valid(src, window, [1, 2, 3])
            label = read_label_aligned(lab, src, window)
        rgb[~valid] = fill
        label[~valid] = 0
        if label.size and int(label.max()) > num_classes:
            raise EvaluateError(f"{raw_dir / entry['label']}: label value {int(label.max())} exceeds num_classes "
                                f"{num_classes}")
        rasters.item_ids.append(item)
        rasters.images.append(rgb)
        rasters.labels.append(label)
        rasters.groups.append(group_of[item])
        rasters.sources.append(item)
    rasters.split_tiles = len(rasters.images)
    return rasters


def load_model_dir(model_dir: Path) -> Model:
    if not (model_dir / "meta.json").is_file():
        raise EvaluateError(f"{model_dir}: exported model not found (no meta.json; run the export stage)")
    return load_model(model_dir)


def teacher_model(teacher_path: Path, **clustering) -> Model:
    """The teacher's encoder as an in-memory runtime Model (same settings export would write).
    `clustering`: the artifact's optional clustering and smoothing keys (`cue`, `fit_temperature`,
    `smooth_colour_sigma`, `smooth_colour_floor`, `label_colour_sigma`; `runtime.artifact.clustering_settings` of
    model/best's meta), so that both are clustered and smoothed the same way."""
    teacher, info = read_teacher(teacher_path)
    cfg = info["config"]
    encoder = teacher.encoder
    layers, arrays = encoder.export_layers()
    meta = build_meta(embed_dim=encoder.embed_dim, max_k=cfg["max_k"], temperature=cfg["temperature"],
                      cluster_iters_default=cfg["cluster_iters"], smooth_iters_default=cfg["smooth_iters"],
                      input_mean=INPUT_MEAN, input_std=INPUT_STD, input_scale=INPUT_SCALE,
                      supports_learned_refine=encoder.refine is not None,
                      receptive_field=encoder.receptive_field, git_commit="in-memory",
                      params_hash="in-memory", created="in-memory", source="teacher", **clustering)
    return Model(layers, arrays, meta)


@dataclass
class MethodRun:
    """One method scored on a set of images (`score_method`).

    `preds`: every image's global-protocol cluster ids, uint8 (H, W), in image order.
    `glob`, `per_image`, `groups`, `edges_*`: the labelled protocols' accumulators, scores per group
    and boundary scores (None without labels). `seed_cooc`: for each extra seed of the global centres, the (k, k)
    co-occurrence of its labels with `preds`; `jitter_same` / `jitter_total`: pixels whose cluster
    id survives the colour shift of their source image with the same centres (label-free figures;
    empty and 0 when not asked for).
    """

    preds: list[np.ndarray]
    glob: GlobalProtocol | None = None
    per_image: PerTileProtocol | None = None
    groups: dict | None = None
    edges_glob: BoundaryScore | None = None
    edges_per_image: BoundaryScore | None = None
    seed_cooc: list[np.ndarray] = field(default_factory=list)
    jitter_same: int = 0
    jitter_total: int = 0


def score_method(method: Segmenter, tiles: ScoredImages, k: int, num_classes: int, seed: int,
                 samples_per_tile: int, global_samples: int, name: str, label_free: bool = False) -> MethodRun:
    """One method on `tiles`, in two passes over the images (memory: one image's features plus
    the global sample, and every image's global labels).

    Pass 1 samples ceil(global_samples x its share of the total area) rows of every tile (or raster)
    and fits the global centres (and, with `label_free`, `STABILITY_SEEDS` more from the same rows
    under the next seeds).
    Pass 2 labels every image with them (global protocol) and, where the images are labelled
    (`num_classes` > 0), with centres fitted on `samples_per_tile` rows of that image alone
    (per-tile protocol). With `label_free` it also labels each image under the other seeds' centres
    and, with the global centres, the image after its source's colour shift (`colour_shift_for` at
    strength 1: a flight of other exposure and white balance).
    """
    start = time.perf_counter()
    labelled = num_classes > 0
    run = MethodRun(preds=[])
    if labelled:
        run.glob, run.per_image = GlobalProtocol(k, num_classes), PerTileProtocol(k, num_classes)
        run.edges_glob, run.edges_per_image = BoundaryScore(), BoundaryScore()
        group_glob = {g: GlobalProtocol(k, num_classes) for g in sorted(set(tiles.groups))}
        group_tile = {g: PerTileProtocol(k, num_classes) for g in group_glob}
    rng = np.random.default_rng(seed)
    progress = dict(unit="tile", file=sys.stderr, disable=None, leave=False)
    areas = [rgb.shape[0] * rgb.shape[1] for rgb in tiles.images]
    total = sum(areas)
    # a share of global_samples in proportion to each image's area: the same number from every
    # tile (all one size), more from a larger raster
    pooled = np.concatenate([
        sample_rows([method.features(rgb)], max(k, -(-global_samples * area // total)), rng)
        for rgb, area in tqdm(list(zip(tiles.images, areas)), desc=f"{name}: sample", **progress)])
    centres = method.fit(pooled, k, seed=seed)
    other_centres = [method.fit(pooled, k, seed=seed + j) for j in range(1, STABILITY_SEEDS + 1)] if label_free else []
    run.seed_cooc = [np.zeros((k, k), np.int64) for _ in other_centres]
    del pooled
    for i, rgb in enumerate(tqdm(tiles.images, desc=f"{name}: label", **progress)):
        feats = method.features(rgb)
        pred = method.labels(feats, rgb, centres)
        run.preds.append(pred)
        for cooc, other in zip(run.seed_cooc, other_centres):
            cooc += cooccurrence(pred, method.labels(feats, rgb, other), k)
        if label_free:
            shifted = apply_colour_shift(rgb, *colour_shift_for(tiles.sources[i], 1.0, seed))
            run.jitter_same += int((method.labels(method.features(shifted), shifted, centres) == pred).sum())
            run.jitter_total += pred.size
        if labelled:
            label = tiles.labels[i]
            run.glob.add(pred, label)
            run.edges_glob.add(pred, label)
            group_glob[tiles.groups[i]].add(pred, label)
            own = method.fit_tile(sample_rows([feats], samples_per_tile, rng), k, seed=seed)
            own_pred = method.labels(feats, rgb, own)
            run.per_image.add(own_pred, label)
            run.edges_per_image.add(own_pred, label)
            group_tile[tiles.groups[i]].add(own_pred, label)
    if labelled:
        run.groups = per_group_scores(run.glob, group_glob, group_tile)
    # one line per method whether or not stderr is a terminal (the bars above show only on one):
    # a log of `dvc repro` shows where a long evaluate is
    print(f"{name}: {len(tiles.images)} images scored in {time.perf_counter() - start:.1f} s", flush=True)
    return run


def label_free_figures(run: MethodRun, counts: np.ndarray) -> dict:
    """What a method's maps show without labels: cluster shares (`share_figures` of `counts`, the
    pixels of each cluster over all images), the mean matched agreement of its labels under the
    other seeds' centres, and the share of pixels whose cluster survives a colour shift of the
    image (same centres)."""
    shares = share_figures(counts)
    return {"clusters_used": round(shares["clusters_used"], 6), "largest_share": round(shares["largest_share"], 6),
            "seed_agreement": _json_number(float(np.mean([matched_agreement(c) for c in run.seed_cooc]))),
            "jitter_agreement": _json_number(run.jitter_same / run.jitter_total)}


def colour_shift_for(source: str, strength: float, seed: int) -> tuple[np.ndarray, float, float]:
    """(per-channel gains, gamma, haze) of one source image, a pure function of its name and seed.

    At strength s, on RGB in [0, 1]: gains exp(u), u ~ U(-0.1 s, 0.1 s) (white balance); a gamma
    curve x ** exp(u), u ~ U(-0.15 s, 0.15 s); haze x (1 - h) + 0.8 h, h ~ U(0, 0.1 s) (a bright,
    low-contrast veil). Strength 1 is about the range of the teacher's photometric augmentation.
    """
    digest = hashlib.sha256(f"{seed}/{source}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    gains = np.exp(rng.uniform(-0.1 * strength, 0.1 * strength, 3))
    gamma = float(np.exp(rng.uniform(-0.15 * strength, 0.15 * strength)))
    haze = float(rng.uniform(0.0, 0.1 * strength))
    return gains, gamma, haze


def apply_colour_shift(rgb: np.ndarray, gains: np.ndarray, gamma: float, haze: float) -> np.ndarray:
    """uint8 (H, W, 3) after the gains, gamma and haze of `colour_shift_for`."""
    x = (rgb.astype(np.float64) / 255.0) * gains
    x = np.clip(x, 0.0, 1.0) ** gamma
    x = x * (1.0 - haze) + 0.8 * haze
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def per_group_scores(glob: GlobalProtocol, group_glob: dict[str, GlobalProtocol],
                     group_tile: dict[str, PerTileProtocol]) -> dict:
    """{group: {"tiles", "global": scores, "per_tile": scores}}. A group's global score keeps the
    split's one matching (`glob.mapping()`): how well the clusters shared by every area fit this
    one, not a matching of its own."""
    mapping = glob.mapping()
    return {g: {"tiles": group_glob[g].tiles,
                "global": scores_from_matched(matched_confusion(group_glob[g].confusion, mapping)),
                "per_tile": group_tile[g].result()} for g in group_glob}


def _json_number(v: float) -> float | None:
    """Rounded for readable diffs; JSON has no NaN, so a class absent from truth and prediction is null."""
    return None if v != v else round(v, 6)


def overlay(rgb: np.ndarray, label: np.ndarray, pred: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(H, 3W + 2 gap, 3) uint8: image | truth | prediction coloured by matched class."""
    cluster_colours = np.stack([PALETTE[1 + c % (len(PALETTE) - 1)] if c >= 0 else UNMATCHED_COLOUR
                                for c in mapping])
    truth = PALETTE[np.minimum(label, len(PALETTE) - 1)]
    gap = np.full((rgb.shape[0], OVERLAY_GAP_PX, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, truth, gap, cluster_colours[pred]], axis=1)


def cluster_overlay(rgb: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, 2W + gap, 3) uint8: image | clusters, cluster c drawn in PALETTE[1 + c]."""
    colours = PALETTE[1 + np.arange(int(pred.max()) + 1) % (len(PALETTE) - 1)]
    gap = np.full((rgb.shape[0], OVERLAY_GAP_PX, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, colours[pred]], axis=1)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 -> PNG through GDAL's PNG driver (no georeferencing, no sidecar)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with rasterio.Env(GDAL_PAM_ENABLED="NO"), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="PNG", width=rgb.shape[1], height=rgb.shape[0], count=3,
                           dtype="uint8") as dst:
            dst.write(rgb.transpose(2, 0, 1))


def evaluate(dataset_root: Path, model_dir: Path, teacher_path: Path, out_dir: Path,
             params: EvaluateParams, dataset: str = "", raw_dir: Path | None = None) -> dict:
    """Score model/best, the teacher and both baselines; write metrics and plots to out_dir.

    A labelled set is scored on `val` against its labels (with `params.rasters`, also on the val
    tiles' whole source rasters in `raw_dir`, data/raw), and every method's label-free figures are
    reported beside. A set without labels (no `val` tiles: build_shards sends unlabelled rasters to
    `train`) gets the label-free figures alone, on the `train` tiles: the imagery the user segments.
    """
    dataset_root, out_dir = Path(dataset_root), Path(out_dir)
    check_folder(out_dir, "evaluate output folder")  # before the work
    _remove_outputs(out_dir)  # nothing from an earlier run may look current if this one fails
    summary = read_summary(dataset_root)
    labelled = summary["counts"].get("val", 0) > 0
    num_classes = summary["num_classes"] if labelled else 0
    if labelled and num_classes < 1:
        raise EvaluateError(f"{dataset_root / 'summary.json'}: val has tiles but num_classes is {num_classes}; "
                            "expected the number of label classes (>= 1)")
    if not labelled and summary["counts"].get("train", 0) == 0:
        raise EvaluateError(f"{dataset_root / 'summary.json'}: the val and train splits have no tiles; "
                            "nothing to segment (rerun build_shards)")
    names = class_names(summary) if labelled else []
    model = load_model_dir(Path(model_dir))
    teacher = teacher_model(Path(teacher_path), **clustering_settings(model.meta))
    k = params.k or (num_classes if labelled else UNLABELLED_K)
    k_from = "evaluate.k" if params.k else ("num_classes of summary.json" if labelled
                                           else f"{UNLABELLED_K} for a set without labels (evaluate.k = 0)")
    max_k = min(model.meta["max_k"], teacher.meta["max_k"])
    if not 2 <= k <= max_k:
        raise EvaluateError(f"k = {k} ({k_from}) must lie in [2, {max_k}] (max_k of {model_dir} and the teacher)")
    split = "val" if labelled else "train"
    if labelled:
        tiles = load_val_tiles(dataset_root, num_classes, max_tiles=params.max_tiles)
    else:
        tiles = load_unlabelled_tiles(dataset_root, split, max_tiles=params.max_tiles)
        print(f"{dataset_root}: no labelled val tiles; label-free figures on the {split} tiles, k = {k} ({k_from})")
    if len(tiles.images) < tiles.split_tiles:
        print(f"scoring {len(tiles.images)} of the {tiles.split_tiles} {split} tiles (evaluate.max_tiles)")

    methods: dict[str, Segmenter] = {
        "model": RuntimeSegmenter(model, params.kmeans_restarts, params.tile_balance),
        "teacher": RuntimeSegmenter(teacher, params.kmeans_restarts, params.tile_balance),
        "kmeans_rgb": KMeansBaseline(rgb_features, params.kmeans_iters, params.kmeans_restarts),
        "kmeans_features": KMeansBaseline(handcrafted_features, params.kmeans_iters, params.kmeans_restarts),
    }
    metrics: dict = {"dataset": dataset or summary.get("dataset", ""), "labelled": labelled, "split": split,
                     "k": k, "num_classes": num_classes, "tiles": len(tiles.images),
                     "split_tiles": tiles.split_tiles}
    if labelled:
        metrics["labelled_pixels"] = int(sum((lab > 0).sum() for lab in tiles.labels))
    per_class: dict = {}
    per_group: dict = {}
    shares: dict = {}
    runs: dict[str, MethodRun] = {}
    results: dict = {}
    agreement: dict = {}
    for name, method in methods.items():
        run = runs[name] = score_method(method, tiles, k, num_classes, params.seed, params.samples_per_tile,
                                        params.global_samples, name, label_free=True)
        metrics[name] = {}
        if labelled:
            results[name] = {"global": scored(run.glob, run.edges_glob),
                             "per_tile": scored(run.per_image, run.edges_per_image)}
            metrics[name] = {proto: _scores(s) for proto, s in results[name].items()}
            per_class[name] = {proto: dict(zip(names, map(_json_number, s["per_class_iou"])))
                               for proto, s in results[name].items()}
        counts = [np.bincount(p.ravel(), minlength=k) for p in run.preds]  # pixels per cluster, per image
        metrics[name]["label_free"] = label_free_figures(run, sum(counts))
        per_group[name] = {}
        shares[name] = {"all": share_figures(sum(counts))["shares"]}
        for g in sorted(set(tiles.groups)):
            mine = [c for c, pg in zip(counts, tiles.groups) if pg == g]
            shares[name][g] = share_figures(sum(mine))["shares"]
            per_group[name][g] = {"tiles": len(mine)}
            if labelled:
                r = run.groups[g]
                per_group[name][g].update({proto: _scores(r[proto]) for proto in ("global", "per_tile")})
        shares[name] = {g: [round(v, 6) for v in sh] for g, sh in shares[name].items()}
        if name != "model":  # the model ran first: its labels against this method's, then these are dropped
            agreement[name] = _json_number(matched_agreement(
                sum(cooccurrence(a, b, k) for a, b in zip(runs["model"].preds, run.preds))))
            run.preds = []
    metrics["agreement_with_model"] = agreement
    if labelled and params.rasters:
        if raw_dir is None:
            raise EvaluateError("evaluate.rasters needs the ingested rasters (data/raw); set it false to score "
                                "tiles only")
        rasters = load_val_rasters(Path(raw_dir), tiles, num_classes, model.nodata_fill)
        metrics["rasters"] = len(rasters.images)
        metrics["raster_labelled_pixels"] = int(sum((lab > 0).sum() for lab in rasters.labels))
        for name, method in methods.items():
            run = score_method(method, rasters, k, num_classes, params.seed, params.samples_per_tile,
                               params.global_samples, f"{name} (rasters)")
            results[name]["rasters_global"] = scored(run.glob, run.edges_glob)
            results[name]["per_raster"] = scored(run.per_image, run.edges_per_image)
            metrics[name]["rasters"] = {proto: _scores(results[name][key]) for proto, key in
                                        (("global", "rasters_global"), ("per_raster", "per_raster"))}
            for proto in ("rasters_global", "per_raster"):
                per_class[name][proto] = dict(zip(names, map(_json_number, results[name][proto]["per_class_iou"])))
    if labelled:
        metrics["ratio_miou"] = {
            proto: {b: (round(results["model"][proto]["miou"] / results[b][proto]["miou"], 6)
                        if results[b][proto]["miou"] > 0 else None) for b in BASELINES}
            for proto in results["model"]}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir)
    tmp = temporary(out_dir)
    discard(tmp)
    try:
        (tmp / "plots" / "overlays").mkdir(parents=True)
        # Without labels there is no confusion: the plot's file holds no records.
        records = row_percent_records(runs["model"].glob.matched, names) if labelled else []
        (tmp / "plots" / "confusion.json").write_text(json.dumps(records, indent=None) + "\n")
        mapping = runs["model"].glob.mapping() if labelled else None
        for i in range(min(params.num_overlays, len(tiles.images))):
            panels = overlay(tiles.images[i], tiles.labels[i], runs["model"].preds[i], mapping) if labelled \
                else cluster_overlay(tiles.images[i], runs["model"].preds[i])
            write_png(child(tmp / "plots" / "overlays", tiles.item_ids[i], f"{split} tile id", ".png"), panels)
        (tmp / "per_class_iou.json").write_text(json.dumps(per_class, indent=2) + "\n")
        (tmp / "per_group.json").write_text(json.dumps(per_group, indent=2) + "\n")
        (tmp / "cluster_shares.json").write_text(json.dumps(shares, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _install_outputs(tmp, out_dir)
    finally:
        discard(tmp)
    return metrics


def scored(protocol: GlobalProtocol | PerTileProtocol, edges: BoundaryScore) -> dict:
    """A protocol's scores with the boundary F-score of the same predictions."""
    return {**protocol.result(), "boundary_f": edges.result()["f_score"]}


def _scores(s: dict) -> dict:
    """What metrics.json keeps of a protocol's scores (per_group.json: mIoU and accuracy)."""
    return {key: _json_number(s[key]) for key in ("miou", "pixel_accuracy", "boundary_f") if key in s}


def _remove_outputs(out_dir: Path) -> None:
    """Delete this stage's outputs in out_dir (metrics first: its presence means 'complete')."""
    if not out_dir.is_dir():
        return
    (out_dir / "metrics.json").unlink(missing_ok=True)
    (out_dir / "per_class_iou.json").unlink(missing_ok=True)
    (out_dir / "per_group.json").unlink(missing_ok=True)
    (out_dir / "cluster_shares.json").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "plots", ignore_errors=True)


def _install_outputs(tmp: Path, out_dir: Path) -> None:
    """Move plots and per-class IoU, then metrics.json (last, atomic rename) from tmp into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out_dir)
    os.replace(tmp / "plots", out_dir / "plots")
    os.replace(tmp / "per_class_iou.json", out_dir / "per_class_iou.json")
    os.replace(tmp / "per_group.json", out_dir / "per_group.json")
    os.replace(tmp / "cluster_shares.json", out_dir / "cluster_shares.json")
    os.replace(tmp / "metrics.json", out_dir / "metrics.json")


def print_table(metrics: dict, per_group: dict | None = None) -> None:
    rows = [("tiles", "global", "per_tile", "tile")] if metrics["labelled"] else []
    if "rasters" in metrics:
        rows.append((f"whole rasters ({metrics['rasters']})", "global", "per_raster", "raster"))
    for title, glob, own, unit in rows:
        print(f"{title}:")
        print(f"{'method':<16} {'global mIoU':>11} {'global acc':>10} {'global bF':>9} {unit + ' mIoU':>11} "
              f"{unit + ' acc':>10} {unit + ' bF':>9}")
        for name in METHODS:
            scores = metrics[name] if unit == "tile" else metrics[name]["rasters"]
            g, t = scores[glob], scores[own]
            print(f"{name:<16} {_fmt(g['miou']):>11} {_fmt(g['pixel_accuracy']):>10} {_fmt(g['boundary_f']):>9} "
                  f"{_fmt(t['miou']):>11} {_fmt(t['pixel_accuracy']):>10} {_fmt(t['boundary_f']):>9}")
    if metrics["labelled"] and per_group and len(per_group["model"]) > 1:
        print("global mIoU per group (the split's one matching):")
        print(f"{'group':<16} {'tiles':>5} " + " ".join(f"{name:>15}" for name in METHODS))
        for g, r in per_group["model"].items():
            cells = " ".join(f"{_fmt(per_group[name][g]['global']['miou']):>15}" for name in METHODS)
            print(f"{g:<16} {r['tiles']:>5} {cells}")
    print(f"label-free, {metrics['tiles']} {metrics['split']} tiles, k = {metrics['k']}:")
    print(f"{'method':<16} {'clusters used':>13} {'largest share':>13} {'seed agreement':>14} "
          f"{'colour-shift agreement':>22} {'agreement with model':>20}")
    for name in METHODS:
        f = metrics[name]["label_free"]
        with_model = metrics["agreement_with_model"].get(name) if name != "model" else 1.0
        print(f"{name:<16} {f['clusters_used']:>13.2f} {_fmt(f['largest_share']):>13} {_fmt(f['seed_agreement']):>14} "
              f"{_fmt(f['jitter_agreement']):>22} {_fmt(with_model):>20}")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Score model/best (numpy runtime), the teacher and k-means "
                                 "baselines on the val split (DVC stage `evaluate`).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards", help="shards root; the dataset is ingest.dataset")
    ap.add_argument("--model", default="model/best")
    ap.add_argument("--teacher", default="model/teacher")
    ap.add_argument("--out", default="results/evaluate")
    ap.add_argument("--raw", default="data/raw", help="ingested rasters (for evaluate.rasters)")
    args = ap.parse_args(argv)

    def run() -> int:
        p = load_params(args.params)
        try:
            metrics = evaluate(Path(args.shards) / p.ingest.dataset, Path(args.model), Path(args.teacher),
                               Path(args.out), p.evaluate, dataset=p.ingest.dataset, raw_dir=Path(args.raw))
        except BaseException:
            _remove_outputs(Path(args.out))  # metrics of another model or data must not stay behind
            raise
        print_table(metrics, json.loads((Path(args.out) / "per_group.json").read_text()))
        print(f"wrote {Path(args.out) / 'metrics.json'}")
        return 0

    return run_command("evaluate", run, errors=(ParamsError, EvaluateError, DatasetError, RasterError, TrainingError),
                       interrupted=f"no metrics in {args.out}")

if __name__ == "__main__":
    sys.exit(main())
