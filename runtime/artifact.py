"""The model artifact: the one contract between `stages.export` (writer) and the runtime (reader).

An artifact is a directory of three files:

    model.npz     plain float32 arrays, read with allow_pickle=False:
                  "<layer name>.weight" (out, in, k, k) and "<layer name>.bias" (out,) for every conv
                  of meta["layers"], and optionally "centres_k<K>" (K, embed_dim) for 2 <= K <= max_k:
                  precomputed unit cluster centres, so a cluster id means the same thing across rasters
    meta.json     {"format": "landseg-segmenter", "format_version": 1, "layers": [...],
                   "stride": 4, "embed_dim", "max_k", "temperature", "cluster_iters_default",
                   "smooth_iters_default", "input_mean": [r, g, b], "input_std": [r, g, b],
                   "input_scale", "supports_learned_refine", "receptive_field",
                   "provenance": {"git_commit", "params_hash", "created"}}
                  plus optional keys: "cue" (runtime.cue; null = none), "fit_temperature" (the
                  temperature of the soft k-means updates when centres are fitted; absent or null =
                  "temperature"), "smooth_colour_sigma" and "smooth_colour_floor" (smoothing
                  guided by the image's colours, runtime.model.smooth_probs_guided; sigma absent,
                  null or 0 = plain smoothing; floor absent or null = 0), "label_colour_sigma"
                  (labels whose edges follow the image's, runtime.model.upsample4_guided; absent, null
                  or 0 = plain bilinear labels), "training_pixel_size_m", "input_rescale"; and any informational
                  keys (e.g. "source": "student"), which are kept but not used
    metrics.json  a JSON object of the scores the exported model reached (informational)

The export stage writes one with

    layers, arrays = encoder.export_layers()
    meta = build_meta(embed_dim=..., max_k=..., temperature=..., cluster_iters_default=...,
                      smooth_iters_default=..., input_mean=INPUT_MEAN, input_std=INPUT_STD,
                      input_scale=INPUT_SCALE, supports_learned_refine=...,
                      receptive_field=encoder.receptive_field, git_commit=..., params_hash=...)
    write_artifact("model/best", layers=layers, arrays=arrays, meta=meta, metrics={...},
                   overwrite=True)

`write_artifact` validates exactly what `load_artifact` validates, writes into a temporary
directory beside the destination and renames it into place, so a reader never sees half an
artifact. model.npz is written with fixed zip timestamps and sorted keys: the same arrays give the
same bytes. `load_artifact` checks the format name and version, every required meta key's type and
range, the layer list, and every array's presence, dtype and exact shape; any problem raises
`ArtifactError` naming the file and key.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cue import valid_size
from .destination import atomic_folder
from .errors import ArtifactError, OutputExistsError
from .network import LayerSummary, validate_layers
from .rescale import check_training_rescale

FORMAT_NAME = "landseg-segmenter"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
STRIDE = 4
MODEL_FILE, META_FILE, METRICS_FILE = "model.npz", "meta.json", "metrics.json"
ARTIFACT_FILES = (MODEL_FILE, META_FILE, METRICS_FILE)


def artifact_files(model_dir) -> list[Path]:
    """The files of the artifact folder `model_dir` (what a command reads, and so may not write)."""
    return [Path(model_dir) / name for name in ARTIFACT_FILES]
CENTRES_KEY = re.compile(r"^centres_k(\d+)$")

# key -> (check, description) for the required meta keys (besides format, version and layers)
_META_SCHEMA = {
    "stride": (lambda v: _is_int(v) and v == STRIDE, f"the integer {STRIDE}"),
    "embed_dim": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_k": (lambda v: _is_int(v) and 2 <= v <= 254, "an integer in [2, 254]"),
    "temperature": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "cluster_iters_default": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "smooth_iters_default": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "input_mean": (lambda v: _is_triple(v), "a list of 3 numbers"),
    "input_std": (lambda v: _is_triple(v) and all(x > 0 for x in v), "a list of 3 numbers > 0"),
    "input_scale": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "supports_learned_refine": (lambda v: isinstance(v, bool), "true or false"),
    "receptive_field": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "provenance": (lambda v: isinstance(v, dict) and all(isinstance(v.get(k), str) for k in
                                                         ("git_commit", "params_hash", "created")),
                   'an object with string "git_commit", "params_hash" and "created"'),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _is_triple(v) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v)


@dataclass
class Artifact:
    """A validated artifact: the layer list, float32 arrays, meta and metrics as loaded."""

    layers: list
    arrays: dict
    meta: dict
    metrics: dict = field(default_factory=dict)
    summary: LayerSummary | None = None

    def centres(self, k: int) -> np.ndarray | None:
        """The precomputed (k, embed_dim) unit centres for k, or None if the artifact has none."""
        return self.arrays.get(f"centres_k{k}")


def build_meta(*, embed_dim: int, max_k: int, temperature: float, cluster_iters_default: int,
               smooth_iters_default: int, input_mean, input_std, input_scale: float,
               supports_learned_refine: bool, receptive_field: int, git_commit: str,
               params_hash: str, created: str | None = None, **info) -> dict:
    """The meta dict `write_artifact` expects (format name/version and layers are added there).

    `created` defaults to now (UTC, ISO 8601), or to SOURCE_DATE_EPOCH when that is set, so that
    reproducible builds can pin it. `info` holds optional informational keys (e.g. source="student").
    """
    if created is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch
                else _dt.datetime.now(_dt.timezone.utc))
        created = when.replace(microsecond=0).isoformat()
    meta = {
        "stride": STRIDE, "embed_dim": int(embed_dim), "max_k": int(max_k),
        "temperature": float(temperature), "cluster_iters_default": int(cluster_iters_default),
        "smooth_iters_default": int(smooth_iters_default),
        "input_mean": [float(v) for v in input_mean], "input_std": [float(v) for v in input_std],
        "input_scale": float(input_scale), "supports_learned_refine": bool(supports_learned_refine),
        "receptive_field": int(receptive_field),
        "provenance": {"git_commit": str(git_commit), "params_hash": str(params_hash), "created": created},
    }
    overlap = set(info) & (set(meta) | {"format", "format_version", "layers"})
    if overlap:
        raise ArtifactError(f"build_meta: informational keys {sorted(overlap)} clash with required ones")
    meta.update(info)
    return meta


def cluster_dim(meta: dict) -> int:
    """Width of what is clustered (and of centres): the embedding, plus one channel for a cue."""
    return meta["embed_dim"] + (1 if meta.get("cue") else 0)


def clustering_settings(meta: dict) -> dict:
    """The optional meta keys that change how an artifact's cells are clustered, smoothed and
    labelled ("cue", "fit_temperature", "smooth_colour_sigma", "smooth_colour_floor",
    "label_colour_sigma"), as `build_meta` keywords: what another model needs to be clustered the
    same way (evaluate's teacher)."""
    return {key: meta.get(key) for key in ("cue", "fit_temperature", "smooth_colour_sigma",
                                           "smooth_colour_floor", "label_colour_sigma")}


def validate(layers, arrays: dict, meta: dict, where: str = "artifact") -> LayerSummary:
    """Check a (layers, arrays, meta) triple exactly as `load_artifact` does; raise ArtifactError."""
    meta_at = f"{where}/{META_FILE}"
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_at}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{meta_at}: 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(f"{meta_at}: unknown format_version {version!r}; this runtime supports "
                            f"version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}")
    for key, (check, expected) in _META_SCHEMA.items():
        if key not in meta:
            raise ArtifactError(f"{meta_at}: missing key {key!r} (expected {expected})")
        if not check(meta[key]):
            raise ArtifactError(f"{meta_at}: {key!r} must be {expected}, got {meta[key]!r}")
    gsd = meta.get("training_pixel_size_m")  # optional: the training tiles' ground sample distance
    if gsd is not None and (isinstance(gsd, bool) or not isinstance(gsd, (int, float))
                            or not math.isfinite(gsd) or gsd <= 0):
        raise ArtifactError(f"{meta_at}: 'training_pixel_size_m' must be a positive number of metres "
                            f"or null (unknown), got {gsd!r}")
    if "input_rescale" in meta:  # optional (older artifacts): how the training data became 8-bit
        check_training_rescale(meta["input_rescale"], meta_at)
    fit_t = meta.get("fit_temperature")  # optional: soft k-means temperature when fitting centres
    if fit_t is not None and not (_is_num(fit_t) and fit_t > 0):
        raise ArtifactError(f"{meta_at}: 'fit_temperature' must be null or a number > 0, got {fit_t!r}")
    sigma = meta.get("smooth_colour_sigma")  # optional: colour-guided smoothing of the cluster map
    if sigma is not None and not (_is_num(sigma) and 0 <= sigma <= 10):
        raise ArtifactError(f"{meta_at}: 'smooth_colour_sigma' must be null or a number in [0, 10] "
                            f"(0 = plain smoothing), got {sigma!r}")
    label_sigma = meta.get("label_colour_sigma")  # optional: colour-guided labels
    if label_sigma is not None and not (_is_num(label_sigma) and 0 <= label_sigma <= 10):
        raise ArtifactError(f"{meta_at}: 'label_colour_sigma' must be null or a number in [0, 10] "
                            f"(0 = plain bilinear labels), got {label_sigma!r}")
    floor = meta.get("smooth_colour_floor")  # optional: the least weight of that smoothing
    if floor is not None and not (_is_num(floor) and 0 <= floor <= 1):
        raise ArtifactError(f"{meta_at}: 'smooth_colour_floor' must be null or a number in [0, 1], got {floor!r}")
    cue = meta.get("cue")  # optional: the texture cue appended before clustering (runtime.cue)
    if cue is not None:
        if (not isinstance(cue, dict) or set(cue) != {"kind", "size", "scale"} or cue["kind"] != "dark_tophat"
                or not valid_size(cue["size"]) or isinstance(cue["scale"], bool) or not isinstance(cue["scale"], (int, float))
                or not math.isfinite(cue["scale"]) or cue["scale"] <= 0):
            raise ArtifactError(f"{meta_at}: 'cue' must be null or {{\"kind\": \"dark_tophat\", \"size\": an odd "
                                f"integer >= 3, \"scale\": a positive number}}, got {cue!r}")
    try:
        summary = validate_layers(layers)
    except ArtifactError as e:
        raise ArtifactError(f"{meta_at}: {e}") from None
    if summary.out_channels != meta["embed_dim"]:
        raise ArtifactError(f"{meta_at}: layers output {summary.out_channels} channels but embed_dim "
                            f"is {meta['embed_dim']}")
    if summary.stride != meta["stride"]:
        raise ArtifactError(f"{meta_at}: layers have total stride {summary.stride}, meta says {meta['stride']}")
    if meta["receptive_field"] < summary.receptive_field:
        raise ArtifactError(f"{meta_at}: receptive_field {meta['receptive_field']} is smaller than the "
                            f"layers' {summary.receptive_field} (tiles would show seams)")

    npz_at = f"{where}/{MODEL_FILE}"
    expected = dict(summary.array_shapes)
    for key in arrays:
        m = CENTRES_KEY.match(key)
        if m:
            k = int(m.group(1))
            if not 2 <= k <= meta["max_k"]:
                raise ArtifactError(f"{npz_at}: {key!r} is for k={k}, outside 2..max_k={meta['max_k']}")
            expected[key] = (k, cluster_dim(meta))
        elif key not in expected:
            raise ArtifactError(f"{npz_at}: unexpected array {key!r} (not used by any layer)")
    for key, shape in expected.items():
        if key not in arrays:
            raise ArtifactError(f"{npz_at}: missing array {key!r} of shape {shape}")
        a = arrays[key]
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            raise ArtifactError(f"{npz_at}: {key!r} must be a float32 array, got "
                                f"{getattr(a, 'dtype', type(a).__name__)}")
        if a.shape != tuple(shape):
            raise ArtifactError(f"{npz_at}: {key!r} has shape {a.shape}, expected {tuple(shape)}")
        if not np.all(np.isfinite(a)):
            raise ArtifactError(f"{npz_at}: {key!r} contains NaN or infinite values")
        if CENTRES_KEY.match(key):
            norms = np.linalg.norm(a.astype(np.float64), axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                raise ArtifactError(f"{npz_at}: {key!r} rows must be unit vectors, norms {norms.round(4).tolist()}")
    return summary


def _write_npz(path: Path, arrays: dict) -> None:
    """np.savez with sorted keys and fixed zip timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def write_artifact(dst_dir, *, layers: list, arrays: dict, meta: dict, metrics: dict,
                   overwrite: bool = False) -> Path:
    """Validate and write model.npz, meta.json and metrics.json to `dst_dir`, atomically.

    `layers`, `arrays` as returned by `Encoder.export_layers()` (arrays are cast to float32; add
    "centres_k<K>" arrays for precomputed centres); `meta` from `build_meta` (format name, version
    and layers are filled in here); `metrics` any JSON object. Refuses an existing `dst_dir` unless
    `overwrite`. Returns the destination path.
    """
    dst = Path(dst_dir)
    if dst.exists() and not overwrite:
        raise OutputExistsError(f"{dst}: artifact directory exists (pass overwrite=True to replace it)")
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{dst}/{METRICS_FILE}: metrics must be a dict, got {type(metrics).__name__}")
    full_meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    full_meta.update({k: v for k, v in meta.items() if k != "layers"})
    full_meta["layers"] = layers
    arrays32 = {}
    for key, a in arrays.items():
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.floating):
            raise ArtifactError(f"{dst}/{MODEL_FILE}: {key!r} must be floating point, got {a.dtype}")
        arrays32[key] = a.astype(np.float32)
    validate(layers, arrays32, full_meta, where=str(dst))
    try:
        meta_text = json.dumps(full_meta, indent=2, sort_keys=False, allow_nan=False) + "\n"
        metrics_text = json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{dst}: meta or metrics are not plain JSON: {e}") from None

    with atomic_folder(dst, what="model artifact folder") as tmp:
        _write_npz(tmp / MODEL_FILE, arrays32)
        (tmp / META_FILE).write_text(meta_text)
        (tmp / METRICS_FILE).write_text(metrics_text)
    return dst


def load_artifact(path) -> Artifact:
    """Read and validate an artifact directory (or the path of its model.npz / meta.json)."""
    root = Path(path)
    if root.is_file() and root.name in (MODEL_FILE, META_FILE, METRICS_FILE):
        root = root.parent
    if not root.is_dir():
        raise ArtifactError(f"{root}: model artifact directory not found (expected {MODEL_FILE}, "
                            f"{META_FILE}, {METRICS_FILE})")
    for name in (MODEL_FILE, META_FILE, METRICS_FILE):
        if not (root / name).is_file():
            raise ArtifactError(f"{root}: missing {name}")
    try:
        meta = json.loads((root / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{root / META_FILE}: not readable JSON: {e}") from None
    try:
        metrics = json.loads((root / METRICS_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{root / METRICS_FILE}: not readable JSON: {e}") from None
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{root / METRICS_FILE}: expected a JSON object")
    arrays = {}
    try:
        with np.load(root / MODEL_FILE, allow_pickle=False) as npz:
            for key in npz.files:
                arrays[key] = npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ArtifactError(f"{root / MODEL_FILE}: truncated or not a valid npz archive: "
                            f"{type(e).__name__}: {e}") from None
    layers = meta.get("layers") if isinstance(meta, dict) else None
    summary = validate(layers, arrays, meta, where=str(root))
    return Artifact(layers=layers, arrays=arrays, meta=meta, metrics=metrics, summary=summary)
