"""Clustering in numpy: spherical soft k-means on unit embeddings, plain k-means on RGB.

Both use a deterministic greedy k-means++ initialisation (seeded numpy Generator; each new centre is
the best, by potential, of 2 + ln(k) candidates drawn proportionally to the squared distance to the
nearest chosen centre), so the same samples and seed always give the same centres.

- `fit_centres(emb, k, temperature, iters, seed, restarts=4)`: unit embeddings (N, D) -> (k, D)
  unit centres: hard spherical k-means (Lloyd) to convergence from `restarts` seeded starts (the
  best total cosine wins), then `iters` updates of spherical soft k-means
  (the model's clustering head: probs = softmax(cos / temperature), centres = normalised
  probability-weighted means), kept only if it did not merge clusters that hard k-means separated.
  Collapse guard: after every update, a centre that
  receives (almost) no probability mass, or that coincides with another centre, is re-seeded at
  the sample worst explained by the remaining centres, so k stays k distinct clusters.
- `balanced_rows(emb, micro, seed)`: the rows resampled so that each of `micro` micro-clusters
  weighs the same (density-balanced fitting: `fit_centres(balanced_rows(emb, 64), k, ...)`).
- `soft_assign(emb, centres, temperature)`: (N, D) -> (N, k) probabilities (`soft_assign_columns`:
  the same as (k, N)).
- `kmeans(x, k, seed, iters)` / `assign(x, centres)`: Euclidean k-means (Lloyd) for the RGB
  baselines; an empty cluster is re-seeded at the point farthest from its centre.
"""

from __future__ import annotations

import math

import numpy as np

from ._blas import matmul
from .errors import InputError

# A centre whose total responsibility is below this fraction of one sample's is considered dead.
_DEAD_MASS = 1e-3
# Two unit centres closer than this cosine are duplicates.
_DUPLICATE_COS = 1.0 - 1e-6
_CHUNK = 65536  # rows per distance block (bounds memory to CHUNK * k)
LLOYD_ITERS = 30  # cap of hard spherical k-means iterations before the soft updates
# Cap of the micro-clusters' Lloyd iterations in `balanced_rows`: they only weigh the rows, and
# with 64 of them Lloyd rarely converges within 30. Capped at 10 the fit takes 0.8x the time with
# per-image mIoU level on Dubai and GID-5 (docs/experiments.md, "Runtime: fewer Lloyd iterations").
MICRO_LLOYD_ITERS = 10
# Seeded k-means++ starts of the hard phase; the best objective wins. One start alone can land in a
# poor local optimum (on Dubai the baselines' mIoU swings by several points between starts).
DEFAULT_RESTARTS = 4


def _check_samples(x: np.ndarray, k: int, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"{name}: expected a non-empty (N, F) array, got shape {x.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"{name}: k must be a positive integer, got {k!r}")
    if x.shape[0] < k:
        raise InputError(f"{name}: {x.shape[0]} samples cannot make {k} clusters")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name}: samples contain NaN or infinite values")
    return x


def _greedy_kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator, sqdist) -> np.ndarray:
    """Indices of k initial centres. sqdist(x, c (m, F)) -> (N, m) squared distances."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(rng.integers(n))
    chosen = [first]
    closest = sqdist(x, x[first:first + 1])[:, 0]
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:
            # every sample already coincides with a centre: take the next unused indices in order
            remaining = np.setdiff1d(np.arange(n), np.asarray(chosen))
            chosen.append(int(remaining[0]))
            continue
        cand = np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random(trials) * total)
        cand = np.minimum(cand, n - 1)
        d = np.minimum(closest[:, None], sqdist(x, x[cand]))  # (N, trials)
        best = int(np.argmin(d.sum(axis=0)))
        chosen.append(int(cand[best]))
        closest = d[:, best]
    return np.asarray(chosen)


def _normalise_rows(c: np.ndarray) -> np.ndarray:
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def _chord_sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    # squared chord distance between unit vectors: 2 - 2 cos, clipped at 0 against rounding
    return np.maximum(2.0 - 2.0 * matmul(x, c.T).astype(np.float64), 0.0)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place, float32."""
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


_SOFTMAX_BAND = 1 << 15  # columns per band of soft_assign_columns' softmax


def soft_assign_columns(emb: np.ndarray, centres: np.ndarray, temperature: float, map_bands=None) -> np.ndarray:
    """soft_assign transposed: (N, D) unit embeddings, (k, D) centres -> (k, N) float32
    probabilities, one row per centre (the (k, h, w) layout smoothing works on; reductions over
    the k rows run along whole rows instead of k elements at a time). The softmax runs in bands
    of columns through `map_bands(fn, starts)` when given (a thread pool's map)."""
    logits = _cosine_logits(emb, centres, temperature, columns=True)

    def softmax(s0: int) -> None:
        v = logits[:, s0:s0 + _SOFTMAX_BAND]
        v -= v.max(axis=0)
        np.exp(v, out=v)
        v /= v.sum(axis=0)

    starts = range(0, logits.shape[1], _SOFTMAX_BAND)
    if map_bands is None:
        for s0 in starts:
            softmax(s0)
    else:
        map_bands(softmax, starts)
    return logits


def soft_assign(emb: np.ndarray, centres: np.ndarray, temperature: float) -> np.ndarray:
    """(N, D) unit embeddings, (k, D) centres -> (N, k) float32 softmax(cos / temperature)."""
    return softmax_rows(_cosine_logits(emb, centres, temperature, columns=False))


def _cosine_logits(emb: np.ndarray, centres: np.ndarray, temperature: float, columns: bool) -> np.ndarray:
    """cos(embedding, centre) / temperature: (k, N) with `columns`, else (N, k)."""
    c = _normalise_rows(np.asarray(centres, dtype=np.float32)).astype(np.float32)
    logits = matmul(c, emb.T) if columns else matmul(emb, c.T)
    logits /= np.float32(temperature)
    return logits


def fit_centres(emb: np.ndarray, k: int, temperature: float, iters: int, seed: int = 0,
                lloyd_iters: int = LLOYD_ITERS, restarts: int = DEFAULT_RESTARTS, map_starts=None) -> np.ndarray:
    """Centres of unit rows `emb` (N, D): hard spherical k-means (k-means++ init, Lloyd until no
    assignment changes, at most `lloyd_iters`) from `restarts` seeded starts (seed, seed + 1, ...),
    keeping the one with the highest total cosine to its centres (as scikit-learn's n_init keeps the
    lowest inertia); then `iters` soft k-means updates at `temperature` (`Model` passes its
    artifact's `fit_temperature`, 0.05 from export, below the head's training 0.1, which pulls
    centres together). The hard phase is temperature-free, so it separates clusters even when
    embeddings are tightly packed; the soft phase then refines them. The soft result is kept
    only if it did not collapse the clustering (see `_collapsed`); otherwise the hard k-means
    centres are returned.

    `map_starts(fn, items)`, when given, runs fn on every item (a thread pool's map, such as
    `Network.map`): the starts are independent and each is seeded by its index, so running them in
    parallel gives the same centres; numpy releases the GIL in their products and argmax."""
    x = _normalise_rows(_check_samples(emb, k, "fit_centres"))
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 1:
        raise InputError(f"fit_centres: restarts must be an integer >= 1, got {restarts!r}")
    starts: list = [None] * int(restarts)

    def start(r: int) -> None:
        c = _spherical_lloyd(x, k, np.random.default_rng(seed + r), lloyd_iters)
        starts[r] = (float(matmul(x, c.T).max(axis=1).sum(dtype=np.float64)), c)

    (map_starts or serial_map)(start, range(len(starts)))
    hard, best = None, -np.inf
    for score, c in starts:
        if score > best:  # strict: ties keep the earlier start
            hard, best = c, score
    c = hard
    for _ in range(iters):
        p = soft_assign(x, c, temperature)
        mass = p.sum(axis=0)
        c = _normalise_rows(matmul(p.T, x).astype(np.float32))
        reseeded = _reseed_collapsed(x, c, mass)
        if reseeded is not c:  # the soft updates merged or emptied a cluster
            return hard.astype(np.float32)
    if iters and _collapsed(x, c, hard):
        return hard.astype(np.float32)
    return c.astype(np.float32)


def serial_map(fn, items) -> None:
    """fn(item) for every item, one after another: the default of the `map_*` arguments, which
    otherwise take a thread pool's map."""
    for item in items:
        fn(item)


def balanced_rows(emb: np.ndarray, micro: int, seed: int = 0, lloyd_iters: int = MICRO_LLOYD_ITERS) -> np.ndarray:
    """Unit rows of `emb` (N, D) resampled so that each of `micro` micro-clusters weighs the same.

    The rows are first split into `micro` clusters by hard spherical k-means (one seeded start, at
    most `lloyd_iters` iterations);
    then N rows are drawn with replacement (seeded), each with probability proportional to
    1 / the size of its micro-cluster. Fitting k << micro centres on the result counts every
    distinct kind of cell once instead of by its area, so a cover that is rare in the sample (a
    road in a tile of sand) can still get a centre rather than a second centre going to the
    dominant one. min(micro, N) micro-clusters when N is smaller."""
    x = _normalise_rows(_check_samples(emb, 1, "balanced_rows"))
    if isinstance(micro, bool) or not isinstance(micro, (int, np.integer)) or micro < 1:
        raise InputError(f"balanced_rows: micro must be an integer >= 1, got {micro!r}")
    rng = np.random.default_rng(seed)
    m = min(int(micro), len(x))
    c = _spherical_lloyd(x, m, rng, lloyd_iters)
    label = np.argmax(matmul(x, c.T), axis=1)  # as _spherical_lloyd assigns them (N x micro, like its loop)
    weight = 1.0 / np.bincount(label, minlength=m)[label]
    pick = rng.choice(len(x), size=len(x), replace=True, p=weight / weight.sum())
    return x[np.sort(pick)]


def _spherical_lloyd(x: np.ndarray, k: int, rng: np.random.Generator, lloyd_iters: int) -> np.ndarray:
    """Hard spherical k-means of unit rows x from a greedy k-means++ start: (k, D) unit centres."""
    c = x[_greedy_kmeanspp(x, k, rng, _chord_sqdist)].copy()
    c = _reseed_collapsed(x, c, np.full(k, np.inf))
    columns = np.ascontiguousarray(x.T, dtype=np.float64)  # what _sums_by_label reads, made once
    labels = None
    for _ in range(lloyd_iters):
        new = np.argmax(matmul(x, c.T), axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums = _sums_by_label(columns, labels, k).astype(x.dtype)
        mass = np.bincount(labels, minlength=k).astype(np.float64)
        c = _reseed_collapsed(x, np.where(mass[:, None] > 0, _normalise_rows(sums), c), mass)
    return c


def _sums_by_label(columns: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, D) float64 sums per label of the rows of x, given as its float64 columns (D, N):
    one np.bincount per column, each adding its rows in order in float64. As exact as
    np.add.at in float64 and several times faster than np.add.at in float32 on numpy before
    1.25 (Debian 12's, QGIS's), whose element-wise loop was half of segment_raster's time there."""
    return np.stack([np.bincount(labels, weights=col, minlength=k) for col in columns], axis=1)


def _separation(c: np.ndarray) -> float:
    """1 - the largest cosine between two different centres."""
    cos = matmul(c.astype(np.float64), c.T.astype(np.float64))
    np.fill_diagonal(cos, -1.0)
    return 1.0 - float(cos.max()) if len(c) > 1 else 1.0


def _collapsed(x: np.ndarray, soft: np.ndarray, hard: np.ndarray) -> bool:
    """Whether soft updates merged clusters that hard k-means kept apart: a centre that wins no
    sample, or the closest pair of centres less than half as far apart as after the hard phase
    (a centre losing all its mass or duplicating another during the updates counts too).
    (At a temperature above a group's spread, soft k-means pulls its centres together.)"""
    wins = np.bincount(np.argmax(matmul(x, soft.T), axis=1), minlength=len(soft))
    return bool((wins == 0).any() or _separation(soft) < 0.5 * _separation(hard))


def _reseed_collapsed(x: np.ndarray, c: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Replace dead or duplicate centres by the samples worst explained by the others (returns `c`
    itself, not a copy, when no centre needs it)."""
    k = c.shape[0]
    bad = set(np.flatnonzero(mass < _DEAD_MASS).tolist())
    cos = matmul(c, c.T)
    for i in range(k):
        if i in bad:
            continue
        for j in range(i + 1, k):
            if j not in bad and cos[i, j] > _DUPLICATE_COS:
                bad.add(j)
    if not bad:
        return c
    c = c.copy()
    keep = [i for i in range(k) if i not in bad]
    best = matmul(x, c[keep].T).max(axis=1) if keep else np.full(x.shape[0], -np.inf, np.float32)
    for i in sorted(bad):
        j = int(np.argmin(best))  # first of the worst-explained samples: deterministic
        c[i] = x[j]
        best = np.maximum(best, x @ c[i])
    return c


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Euclidean k-means (greedy k-means++ init, Lloyd iterations): (N, F) -> (k, F) float32 centres.

    Stops early when no assignment changes. Computed in float64 for stable sums.
    """
    x32 = _check_samples(x, k, "kmeans")
    x64 = x32.astype(np.float64)
    rng = np.random.default_rng(seed)
    c = x64[_greedy_kmeanspp(x64, k, rng, _sqdist)].copy()
    x_sq = (x64 * x64).sum(axis=1)  # the same every iteration
    columns = np.ascontiguousarray(x64.T)
    labels = None
    for _ in range(iters):
        new = _nearest(x64, c, x_sq)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = _sums_by_label(columns, labels, k)
        empty = np.flatnonzero(counts == 0)
        c = sums / np.maximum(counts, 1)[:, None]
        if empty.size:
            # re-seed empty clusters at the points farthest from their current centres
            d = np.sum((x64 - c[labels]) ** 2, axis=1)
            for e in empty:
                j = int(np.argmax(d))
                c[e] = x64[j]
                d[j] = -1.0
    return c.astype(np.float32)


def _sqdist(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances (N, m); x_sq: the rows' squared norms, when already known."""
    x_sq = (x * x).sum(axis=1) if x_sq is None else x_sq
    d = x_sq[:, None] - 2.0 * matmul(x, c.T) + (c * c).sum(axis=1)[None, :]
    return np.maximum(d, 0.0)


def _nearest(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], _CHUNK):
        part = None if x_sq is None else x_sq[s:s + _CHUNK]
        out[s:s + _CHUNK] = np.argmin(_sqdist(x[s:s + _CHUNK], c, part), axis=1)
    return out


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index (int64) of the nearest centre (Euclidean) for each row of x (N, F)."""
    x = np.asarray(x)
    centres = np.asarray(centres)
    if x.ndim != 2 or centres.ndim != 2 or x.shape[1] != centres.shape[1]:
        raise InputError(f"assign: expected x (N, F) and centres (k, F), got {x.shape} and {centres.shape}")
    return _nearest(x.astype(np.float64), centres.astype(np.float64))
