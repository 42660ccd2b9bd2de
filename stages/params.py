"""Every knob of the pipeline, in one place: typed, range-checked and documented.

`params.yaml` is parsed into the dataclasses below. Each field's metadata carries its
documentation and its allowed range or choices; `load_params` rejects unknown keys, wrong types
and out-of-range values with a `ParamsError` naming the full key path (e.g. `train.lr`) and what
was expected. Stages read their groups through `load_params(...)`; no stage reads the YAML itself.

`python -m stages.params` prints the documented schema (the reference for params.yaml).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runtime.cue import valid_size
from runtime.errors import InputError
from runtime.rescale import check_limits


class ParamsError(ValueError):
    """A params.yaml key is unknown, missing, of the wrong type or out of range."""


def knob(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
         choices: tuple | None = None) -> Any:
    """A dataclass field with its documentation and allowed range (inclusive) or choices."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Stage groups
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticParams:
    num_scenes: int = knob(15, "Number of procedural scenes (separate areas: each is its own split group).",
                           lo=1, hi=100000)
    scene_size: int = knob(512, "Scene width and height in pixels.", lo=64, hi=65536)
    labelled_fraction: float = knob(0.67, "Fraction of scenes written with a label raster (rounded to "
                                    "whole scenes, chosen by the seed).", lo=0.0, hi=1.0)
    pixel_size_m: float = knob(0.6, "Ground sample distance in metres (CRS units) per pixel.", lo=0.05, hi=10.0)
    crs: str = knob("EPSG:32611", "Projected CRS of the synthetic scenes (metres).")
    noise_std: float = knob(4.0, "Sensor noise standard deviation in digital numbers (0..255).", lo=0.0, hi=64.0)


@dataclass
class LocalParams:
    path: str = knob("", "Directory (raster files in it) or glob of input rasters, any GDAL-readable "
                     "format; 3 bands after `bands` (8-bit, or others through `ingest.rescale`).")
    labels: str = knob("", "Directory or glob of single-band label rasters; empty = no labels.")
    label_regex: str = knob("", "Regex with one group extracting the pairing key from image and label "
                            "file stems; empty = pair image and label by identical stem.")
    label_map: dict[int, int] = knob({}, "Optional map from raw label value to class id (0 = ignore); "
                                     "values absent from a non-empty map are an error.")
    bands: list[int] = knob([1, 2, 3], "1-based band indices read as R, G, B (e.g. [1, 2, 3] of 4-band NAIP).",
                            lo=1, hi=64)
    pixel_size_m: float = knob(
        0.0, "Ground sample distance in metres of rasters without a CRS (plain JPEG / PNG tiles of a known "
        "resolution), recorded as the model's training pixel size so that `segment_raster` resamples "
        "georeferenced rasters to it; 0 = unknown. A raster with a CRS is an error when this is set (its "
        "CRS gives its size).", lo=0.0, hi=1000.0)

    def check(self, prefix: str) -> None:
        if len(self.bands) != 3:
            raise ParamsError(f"{prefix}.bands: expected 3 band indices (R, G, B), got {self.bands!r}")
        for raw, cls in self.label_map.items():
            if not (0 <= raw < 65536 and 0 <= cls <= 255):
                raise ParamsError(f"{prefix}.label_map: expected raw values in [0, 65535] mapped to classes "
                                  f"in [0, 255], got {raw!r}: {cls!r}")
        _check_regex(self.label_regex, f"{prefix}.label_regex")


@dataclass
class RemoteParams:
    urls: list[str] = knob([], "COG URLs (http(s):// or s3://) read by range requests through GDAL's "
                           "virtual file systems, never downloaded whole.")
    label_urls: list[str] = knob([], "Optional label COG URLs, one per entry of `urls` (or empty); "
                                 "warped onto the image window's grid (nearest neighbour).")
    windows: list[list[int]] = knob([], "Optional pixel window per URL as [col_off, row_off, width, "
                                    "height]; empty = whole raster.", lo=0)
    bounds: list[list[float]] = knob([], "Optional bounding box per URL as [left, bottom, right, top] in the "
                                     "raster's CRS units, rounded outward to whole pixels; exclusive with "
                                     "`windows`.")
    timeout_s: int = knob(30, "HTTP timeout in seconds for remote reads.", lo=1, hi=3600)

    def check(self, prefix: str) -> None:
        if self.windows and self.bounds:
            raise ParamsError(f"{prefix}.bounds: give either windows or bounds, not both")
        if self.bounds and len(self.bounds) != len(self.urls):
            raise ParamsError(f"{prefix}.bounds: expected one per URL ({len(self.urls)}), got {len(self.bounds)}")
        for i, b in enumerate(self.bounds):
            if len(b) != 4 or b[0] >= b[2] or b[1] >= b[3]:
                raise ParamsError(f"{prefix}.bounds[{i}]: expected [left, bottom, right, top] with left < right "
                                  f"and bottom < top, got {b!r}")
        if self.label_urls and len(self.label_urls) != len(self.urls):
            raise ParamsError(f"{prefix}.label_urls: expected one per URL ({len(self.urls)}), "
                              f"got {len(self.label_urls)}")
        if self.windows and len(self.windows) != len(self.urls):
            raise ParamsError(f"{prefix}.windows: expected one per URL ({len(self.urls)}), got {len(self.windows)}")
        for i, w in enumerate(self.windows):
            if len(w) != 4 or w[2] < 1 or w[3] < 1:
                raise ParamsError(f"{prefix}.windows[{i}]: expected [col_off, row_off, width >= 1, "
                                  f"height >= 1], got {w!r}")


@dataclass
class IngestParams:
    provider: str = knob("synthetic", "Where the rasters come from.", choices=("synthetic", "local", "remote"))
    dataset: str = knob("synthetic", "Dataset name: data/shards/<dataset>/ is where build_shards writes.")
    seed: int = knob(0, "Seed of the synthetic provider.", lo=0, hi=2**31 - 1)
    class_names: dict[int, str] = knob({}, "Names of label classes 1..C for the local and remote providers "
                                       "(synthetic names its own six); empty = unnamed, C = largest label.")
    rescale: str = knob(
        "auto", "How local and remote rasters become 8-bit: 'auto' keeps 8-bit data as it is and maps "
        "anything else (16-bit, float) band by band from its own 2-98 % percentile range (over the "
        "pixels ingested: the raster, or its remote window) to 0..255, as `segment_raster` does at run "
        "time; 'none' refuses data that is not 8-bit; 'percentile' stretches 8-bit data too; 'fixed' "
        "maps every raster from "
        "`rescale_limits` (the same mapping for all, so colours stay comparable between rasters).",
        choices=("auto", "none", "percentile", "fixed"))
    rescale_limits: list[float] = knob(
        [], "With rescale: fixed, [low, high] for all bands or [low_r, high_r, low_g, high_g, low_b, "
        "high_b], in the rasters' own units, mapped to 0..255 (e.g. [0, 4095] for 12-bit data); empty "
        "otherwise.")
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    local: LocalParams = field(default_factory=LocalParams)
    remote: RemoteParams = field(default_factory=RemoteParams)

    def rescale_limit_pairs(self) -> list[list[float]] | None:
        """`rescale_limits` as three [low, high] pairs (R, G, B); None unless rescale is 'fixed'."""
        return check_limits(self.rescale_limits).tolist() if self.rescale == "fixed" else None

    def check(self, prefix: str) -> None:
        lim = self.rescale_limits
        if self.rescale == "fixed":
            try:
                check_limits(lim)
            except InputError:
                raise ParamsError(f"{prefix}.rescale_limits: rescale: fixed needs [low, high] or three "
                                  f"(low, high) pairs with low < high, got {lim!r}") from None
        elif lim:
            raise ParamsError(f"{prefix}.rescale_limits: only read with rescale: fixed (rescale is "
                              f"{self.rescale!r}); leave it empty")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.dataset):
            raise ParamsError(f"{prefix}.dataset: expected a folder name of letters, digits, '.', '_' or "
                              f"'-', got {self.dataset!r}")
        bad = [k for k in self.class_names if not 1 <= k <= 255]
        if bad:
            raise ParamsError(f"{prefix}.class_names: expected class ids in [1, 255], got {bad}")


@dataclass
class ShardsParams:
    tile_size: int = knob(256, "Tile width and height in pixels.", lo=16, hi=8192)
    max_blank_fraction: float = knob(0.25, "Tiles with more than this fraction of blank pixels (outside "
                                     "the raster, nodata/masked, or the whole tile one constant colour) are "
                                     "dropped.", lo=0.0, hi=1.0)
    metrics_train_fraction: float = knob(0.25, "Share of labelled groups assigned to `metrics_train` "
                                         "(model selection); the rest go to `val`.", lo=0.0, hi=1.0)
    train_fraction: float = knob(0.0, "Share of labelled groups sent to `train` without their labels, "
                                 "for datasets where every raster is labelled (e.g. Dubai). Decided by a "
                                 "second, independent hash of the group key, so the other groups keep "
                                 "their metrics_train/val split.", lo=0.0, hi=1.0)
    group_regex: str = knob("", "Regex whose first group (searched in the source item id) defines the "
                            "split group, e.g. 't(\\d+)_' for Dubai; empty = the source raster.")
    tiles_per_shard: int = knob(256, "Tiles per shard directory.", lo=1, hi=1000000)

    def check(self, prefix: str) -> None:
        _check_regex(self.group_regex, f"{prefix}.group_regex")


def _check_regex(pattern: str, key: str) -> None:
    if not pattern:
        return
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ParamsError(f"{key}: not a valid regular expression {pattern!r}: {e}") from None
    if compiled.groups < 1:
        raise ParamsError(f"{key}: expected a regex with one capture group, got {pattern!r}")


@dataclass
class AugParams:
    seed: int = knob(0, "Seed of the augmentation stream (new draws every epoch, reproducible).", lo=0, hi=2**31 - 1)
    rotate90: bool = knob(True, "Random 90-degree rotations per view.")
    flip: bool = knob(True, "Random horizontal/vertical flips per view.")
    brightness: float = knob(0.2, "Max relative brightness change (RGB only).", lo=0.0, hi=1.0)
    contrast: float = knob(0.2, "Max relative contrast change (RGB only).", lo=0.0, hi=1.0)
    saturation: float = knob(0.2, "Max relative saturation change (RGB only).", lo=0.0, hi=1.0)
    noise_std: float = knob(0.02, "Gaussian noise std on normalised RGB.", lo=0.0, hi=1.0)
    channel_gain: float = knob(0.1, "Max relative per-channel gain change (white balance; RGB only).", lo=0.0, hi=1.0)
    gamma: float = knob(0.15, "Max |log gamma| of a random gamma curve (RGB only).", lo=0.0, hi=2.0)


@dataclass
class ModelParams:
    width: int = knob(32, "Teacher encoder channel width.", lo=8, hi=1024)
    depth: int = knob(2, "Teacher residual blocks at stride 4.", lo=0, hi=64)
    embed_dim: int = knob(32, "Teacher embedding dimension.", lo=2, hi=1024)
    max_k: int = knob(8, "Number of soft k-means prototypes (largest k the runtime accepts).", lo=2, hi=16)
    temperature: float = knob(0.1, "Soft k-means temperature on cosine similarity.", lo=1e-4, hi=10.0)
    cluster_iters: int = knob(3, "Soft k-means refinement iterations.", lo=0, hi=100)
    smooth_iters: int = knob(8, "3x3 probability smoothing iterations at stride 4 (inference and validation).", lo=0, hi=32)
    refine_head: bool = knob(False, "Add a learned residual refinement head on the embeddings.")
    seed: int = knob(0, "Seed of weight and prototype initialisation.", lo=0, hi=2**31 - 1)


@dataclass
class LossParams:
    consistency: float = knob(1.0, "Weight of the two-view consistency loss.", lo=0.0, hi=100.0)
    entropy: float = knob(0.1, "Weight of the per-pixel assignment entropy (confidence).", lo=0.0, hi=100.0)
    marginal_entropy: float = knob(1.0, "Weight of the negative marginal entropy (anti-collapse).", lo=0.0, hi=100.0)
    smoothness: float = knob(0.1, "Weight of the edge-aware total variation of assignments.", lo=0.0, hi=100.0)
    edge_sigma: float = knob(0.1, "Image-gradient scale of the edge-aware weights.", lo=1e-4, hi=10.0)
    contrastive: float = knob(1.0, "Weight of the dense two-view contrastive (InfoNCE) term on embeddings.",
                              lo=0.0, hi=100.0)
    contrastive_temperature: float = knob(0.2, "Temperature of the dense contrastive term.", lo=1e-3, hi=10.0)
    contrastive_decay_steps: int = knob(
        -1, "Teacher steps over which the contrastive weight falls to 0 on a half-cosine and stays there, so "
        "the other terms hold the features it built instead of letting it "
        "keep pulling cells apart; 0 = constant weight; -1 = 0 when labelled metrics_train tiles select "
        "the step and 300 when the held-out loss does (it cannot see the features drift). Held-out "
        "validation scores the full weight.", lo=-1, hi=10_000_000)
    pseudo_labels: float = knob(
        0.3, "Weight of the pseudo-label term: the teacher's embedding predicts, for every cell, its "
        "cluster among 16 k-means clusters of the hand-crafted colour and texture features fitted once "
        "over the training windows (one legend across images, stages.pseudo_labels); 0 = off, as the "
        "configuration for real imagery sets it (a gain on the synthetic scenes only).",
        lo=0.0, hi=100.0)


@dataclass
class TrainParams:
    seed: int = knob(0, "Seed of sampling and training.", lo=0, hi=2**31 - 1)
    steps: int = knob(300, "Optimiser steps.", lo=1, hi=10**8)
    batch_size: int = knob(8, "Samples per step.", lo=1, hi=4096)
    patch_size: int = knob(64, "Training patch size in pixels (a multiple of 4).", lo=16, hi=4096)
    lr: float = knob(0.003, "AdamW learning rate.", lo=1e-7, hi=1.0)
    val_every: int = knob(25, "Steps between validation (model selection) runs.", lo=1, hi=10**8)
    val_max_tiles: int = knob(0, "Model selection (teacher and student) scores at most this many "
                              "`metrics_train` tiles, a fixed subset chosen by a hash of the tile ids "
                              "(the same tiles for both stages and every seed); 0 = all. Each "
                              "validation embeds and clusters every tile it scores, so a large labelled "
                              "split costs time and memory at every `val_every`.", lo=0, hi=10**9)
    checkpoint_every: int = knob(50, "Steps between resumable checkpoints.", lo=1, hi=10**8)


@dataclass
class StudentParams:
    width: int = knob(32, "Student encoder channel width.", lo=8, hi=1024)
    depth: int = knob(2, "Student residual blocks.", lo=0, hi=64)
    embed_dim: int = knob(24, "Student embedding dimension.", lo=2, hi=1024)
    norm: str = knob("batch", "Normalisation layer (batch norm is folded into convs at export).",
                     choices=("batch", "none"))
    dropout: float = knob(0.0, "Channel dropout inside residual blocks (training only).", lo=0.0, hi=0.9)


@dataclass
class DataParams:
    patch_sizes: list[int] = knob([64, 96, 128], "Patch sizes in pixels used by distillation.", lo=16, hi=4096)
    patch_size_sampling: str = knob("cycle", "How a step's patch size is chosen.", choices=("cycle", "uniform"))


@dataclass
class DistillParams:
    seed: int = knob(0, "Seed of sampling and training.", lo=0, hi=2**31 - 1)
    steps: int = knob(300, "Optimiser steps.", lo=1, hi=10**8)
    batch_size: int = knob(8, "Samples per step.", lo=1, hi=4096)
    lr: float = knob(0.003, "AdamW learning rate.", lo=1e-7, hi=1.0)
    ema_decay: float = knob(0.98, "Decay of each patch size's loss EMA used for normalisation.", lo=0.0, hi=0.99999)
    ema_eps: float = knob(1e-06, "Epsilon added to the EMA before dividing.", lo=0.0, hi=1.0)
    feature_weight: float = knob(1.0, "Weight of cosine feature distillation.", lo=0.0, hi=100.0)
    affinity_weight: float = knob(1.0, "Weight of affinity distillation.", lo=0.0, hi=100.0)
    cluster_weight: float = knob(1.0, "Weight of cluster-assignment distillation.", lo=0.0, hi=100.0)
    tv_weight: float = knob(0.1, "Weight of edge-aware total variation.", lo=0.0, hi=100.0)
    val_every: int = knob(50, "Steps between validation (model selection) runs.", lo=1, hi=10**8)
    checkpoint_every: int = knob(50, "Steps between resumable checkpoints.", lo=1, hi=10**8)


@dataclass
class ExportParams:
    source: str = knob("student", "Which checkpoint becomes model/best.", choices=("student", "teacher"))
    cue_size: int = knob(0, "Texture cue appended to the embedding before clustering (runtime.cue): the "
                         "side in pixels of the square of the dark top-hat (grey closing minus the image; "
                         "large on dark structures narrower than the square). 0 = no cue; else odd, >= 3. "
                         "Recorded in meta.json; every clustering of the artifact then sees it.", lo=0, hi=63)
    cue_scale: float = knob(3.6, "Multiplier of the cue (a lightness difference, 0..1) before it joins the "
                            "unit embedding; 3.6 = 1.5 x 0.35 / the cue's spread on Dubai's area 8. Used "
                            "only when cue_size > 0.", lo=0.01, hi=100.0)
    fit_temperature: float = knob(0.05, "Temperature of the soft k-means updates that follow hard spherical "
                                  "k-means whenever the runtime fits centres (meta.json fit_temperature). "
                                  "Lower is closer to hard k-means; the head's training temperature "
                                  "(model.temperature) still gives the cell probabilities and smoothing. "
                                  "0.05 beat 0.1 on metrics_train of the synthetic default and of Dubai "
                                  "(docs/experiments.md).", lo=0.001, hi=10.0)
    smooth_colour_sigma: float = knob(0.1, "Colour distance (RGB scaled to 0..1) at which the runtime's "
                                      "smoothing of the cluster map between two neighbour cells (4 x 4 px "
                                      "each) falls to 0.61 of its weight (meta.json smooth_colour_sigma): "
                                      "the map keeps the image's colour edges, so small houses and narrow "
                                      "roads keep their own cluster. 0 = plain smoothing, blind to the "
                                      "image.", lo=0.0, hi=10.0)
    smooth_colour_floor: float = knob(0.3, "The least weight (0..1) a neighbour cell keeps in that smoothing "
                                      "however different its colour (meta.json smooth_colour_floor): texture "
                                      "inside one cover is still smoothed. 0.3 had the best mean whole-raster "
                                      "mIoU on metrics_train of Dubai and the synthetic scenes against 0 and "
                                      "0.5 (docs/experiments.md); 1 = plain smoothing.", lo=0.0, hi=1.0)
    label_colour_sigma: float = knob(0.05, "Colour distance (RGB scaled to 0..1) at which a cell's weight in "
                                     "a pixel's label falls to 0.61 (meta.json label_colour_sigma): each pixel "
                                     "takes the clusters of the neighbouring cells whose mean colour is closest "
                                     "to its own, so label edges follow the image's edges inside the 4 x 4 px "
                                     "cells. 0.05 raised boundary F on metrics_train of Dubai and the synthetic "
                                     "scenes at no cost in mIoU there or on GID-5 (docs/experiments.md); 0 = "
                                     "plain bilinear labels.", lo=0.0, hi=10.0)

    def check(self, prefix: str) -> None:
        if self.cue_size and not valid_size(self.cue_size):
            raise ParamsError(f"{prefix}.cue_size: expected 0 (no cue) or an odd integer >= 3, got {self.cue_size}")

    def cue(self) -> dict | None:
        """The artifact's `cue` entry (None = no cue)."""
        return ({"kind": "dark_tophat", "size": self.cue_size, "scale": self.cue_scale}
                if self.cue_size else None)


@dataclass
class EvaluateParams:
    k: int = knob(0, "Clusters predicted by the model and every baseline; 0 = the number of label "
                  "classes (summary.json num_classes) of a labelled set, 6 for a set without labels "
                  "(water, trees, grass or field, bare soil, roads, buildings: the covers one first "
                  "separates). Must be >= 2 and <= the artifact's max_k.", lo=0, hi=16)
    seed: int = knob(0, "Seed of centre fitting (model, teacher, baselines) and of pixel sampling.", lo=0, hi=2**31 - 1)
    num_overlays: int = knob(4, "Overlay images written as plots (image | truth | prediction; image | clusters "
                             "for a set without labels); the first scored tiles in index order.", lo=0, hi=64)
    samples_per_tile: int = knob(4096, "Per-tile protocol: pixels (baselines) or stride-4 embeddings (model, "
                                 "teacher) of a tile sampled (seeded) to fit that tile's centres.", lo=16, hi=10**7)
    global_samples: int = knob(100000, "Global protocol: pixels or embeddings sampled (seeded, from every tile or "
                               "raster in proportion to its area: the same number from every tile) across the "
                               "split to fit its one set of centres.", lo=16, hi=10**8)
    kmeans_iters: int = knob(50, "Lloyd iterations of the baselines' k-means (stops early when stable).",
                             lo=1, hi=1000)
    max_tiles: int = knob(0, "Score at most this many `val` tiles, a fixed subset chosen by a hash of the "
                          "tile ids (the same tiles for every method, seed and run; raising the cap only "
                          "adds tiles); 0 = all. metrics.json records how many of the split's tiles were "
                          "scored. For val splits too large to hold in memory or to score in time.",
                          lo=0, hi=10**9)
    kmeans_restarts: int = knob(3, "Seeded k-means++ starts per centre fit, for every method alike (the "
                                "model's and teacher's spherical k-means, both baselines' k-means); the "
                                "best objective is kept.", lo=1, hi=100)
    tile_balance: int = knob(64, "Per-tile protocol, model and teacher: micro-clusters of the density-balanced "
                             "centre fitting each tile's own centres get, as segment_raster and predict_* "
                             "fit centres per raster or image by default (runtime PER_IMAGE_BALANCE; "
                             "runtime.cluster.balanced_rows); 0 = plain k-means. The global protocol's "
                             "centres and both baselines are plain k-means.", lo=0, hi=4096)
    rasters: bool = knob(True, "Also score the split's whole source rasters (data/raw), each segmented in one "
                         "piece as segment_raster segments a raster, under the same two protocols (global: one "
                         "set of centres for all rasters; per_raster: each raster's own centres). The tile "
                         "protocols see every tile alone, with zero padding at its borders where a user's "
                         "raster has its neighbours. Holds the rasters of the scored tiles in memory (the "
                         "tiles' pixels again) and about doubles the stage's time; false = tiles only.")


@dataclass
class Params:
    ingest: IngestParams = field(default_factory=IngestParams)
    shards: ShardsParams = field(default_factory=ShardsParams)
    aug: AugParams = field(default_factory=AugParams)
    model: ModelParams = field(default_factory=ModelParams)
    loss: LossParams = field(default_factory=LossParams)
    train: TrainParams = field(default_factory=TrainParams)
    student: StudentParams = field(default_factory=StudentParams)
    data: DataParams = field(default_factory=DataParams)
    distill: DistillParams = field(default_factory=DistillParams)
    export: ExportParams = field(default_factory=ExportParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, meta: dict) -> Any:
    """Check `value` against the annotation `tp` (and the field's range), returning the value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, meta)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        # Integer keys written as strings ('1': ...) are what JSON and `dvc exp run -S` produce.
        return {_convert(int(k) if kt is int and isinstance(k, str) and re.fullmatch(r"-?\d+", k) else k,
                         kt, f"{key} key {k!r}", {}): _convert(v, vt, f"{key}[{k!r}]", {})
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (YAML reads '1e-3' as text: write 0.001 or 1.0e-3)" if isinstance(value, str) else ""
            raise ParamsError(f"{key}: expected a number, got {value!r}{hint}")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every range check (nan < lo and nan > hi are False)
            raise ParamsError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported params type {tp} for {key}")
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ParamsError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ParamsError(f"{key}: expected a value in [{lo}, {hi}], got {value!r}")
    return value


def _parse_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "params.yaml"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(known))
    if unknown:
        names = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ParamsError(f"unknown key(s) {names}; allowed keys in {where}: {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], key, dict(f.metadata))
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded YAML mapping. Missing keys take the documented defaults."""
    return _parse_dataclass(Params, raw, "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (the plain loader
    keeps the last value without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ParamsError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one "
                                  f"mapping (first on line {seen[key] + 1}); keep one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)



def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming the file and key on any problem."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    try:
        return parse_params(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def params_hash(*groups: Any) -> str:
    """Stable sha256 of one or more param groups (dataclasses), for provenance and summaries."""
    blob = json.dumps([dataclasses.asdict(g) for g in groups], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def describe(cls: type = Params, prefix: str = "") -> list[str]:
    """One line per knob: key path, type, default, range or choices, documentation."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, key)
            continue
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rng = (f" one of {list(m['choices'])}" if m.get("choices")
               else f" in [{m.get('lo')}, {m.get('hi')}]" if m.get("lo") is not None or m.get("hi") is not None
               else "")
        lines.append(f"{key} ({_type_name(tp)}, default {default!r}{rng}): {m.get('doc', '')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        try:
            load_params(argv[0])
        except ParamsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{argv[0]}: OK")
    else:
        print("\n".join(describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
