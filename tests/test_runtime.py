"""The numpy runtime on arrays: numeric parity with the torch model, clustering, numpy-only import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from runtime_fixtures import encoder_meta, random_encoder, synthetic_rgb, write_encoder_artifact

from runtime import cluster
from runtime.errors import InputError
from runtime.model import (
    Model,
    cell_colours,
    load_model,
    smooth_probs,
    smooth_probs_guided,
    upsample4,
    upsample4_guided,
)
from runtime.network import output_size
from stages.model import normalise_rgb
from stages.model import smooth_probs as torch_smooth_probs
from stages.model import upsample_to as torch_upsample_to

REPO = Path(__file__).resolve().parents[1]
# sizes not divisible by 4 (and tiny ones) exercise borders and the ceil(H/4) grid
SIZES = [(67, 93), (64, 64), (33, 5), (1, 1), (2, 7)]


def _model(enc, **kw) -> Model:
    layers, arrays = enc.export_layers()
    return Model(layers, arrays, encoder_meta(enc, **kw))


def _torch_embed(enc, rgb: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return enc(normalise_rgb(torch.from_numpy(rgb).permute(2, 0, 1)[None]))[0].numpy()


def _torch_labels(emb: np.ndarray, centres: np.ndarray, temperature: float, smooth: int, h: int, w: int):
    e = torch.from_numpy(emb)
    d = e.shape[0]
    with torch.no_grad():
        c = F.normalize(torch.from_numpy(centres), dim=1)
        probs = torch.softmax(e.permute(1, 2, 0).reshape(-1, d) @ c.T / temperature, dim=1)
        probs = probs.T.reshape(1, -1, *e.shape[1:])
        up = torch_upsample_to(torch_smooth_probs(probs, smooth), h, w)[0]
    return up.numpy(), up.argmax(dim=0).numpy()


@pytest.mark.parametrize("arch", [
    dict(width=16, depth=2, embed_dim=8),               # teacher-like: residual blocks
    dict(width=8, depth=0, embed_dim=6),                 # stem + head only
    dict(width=16, depth=1, embed_dim=8, refine=True),   # learned refinement head
])
def test_embeddings_match_torch_within_1e4(arch):
    enc = random_encoder(**arch, seed=3)
    model = _model(enc)
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = model.embed(rgb)
        ref = _torch_embed(enc, rgb)
        assert ours.shape == ref.shape == (arch["embed_dim"], output_size(h), output_size(w))
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_labels_and_probabilities_match_torch():
    enc = random_encoder(width=16, depth=2, embed_dim=8, seed=5)
    model = _model(enc, smooth_iters=2)
    for i, (h, w) in enumerate([(131, 97), (64, 64), (30, 9)]):
        rgb = synthetic_rgb(h, w, seed=i)
        centres = model.fit_centres([rgb], k=5, seed=i)
        ref_probs, ref_labels = _torch_labels(_torch_embed(enc, rgb), centres, 0.1, 2, h, w)
        probs = model.predict_proba(rgb, 5, centres=centres)
        labels = model.predict_labels(rgb, 5, centres=centres)
        assert probs.shape == (5, h, w) and labels.shape == (h, w) and labels.dtype == np.uint8
        np.testing.assert_allclose(probs, ref_probs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
        # the labels agree wherever the reference's best cluster leads by more than the two
        # probabilities' tolerance; at a near tie float rounding (which differs between CPUs) decides
        top2 = np.sort(ref_probs, axis=0)[-2:]
        decided = top2[1] - top2[0] > 2e-4
        assert decided.mean() >= 0.95
        assert (labels[decided] == ref_labels[decided]).all()
        # borders included: the outer 4-pixel frame agrees as well as the interior
        frame = np.ones((h, w), bool)
        frame[4:-4, 4:-4] = False
        assert (labels[frame & decided] == ref_labels[frame & decided]).all()
        # banded labels are exactly the argmax of the full probabilities
        np.testing.assert_array_equal(labels, probs.argmax(axis=0))


@pytest.mark.parametrize("shape,iters", [((4, 9, 13), 1), ((3, 1, 5), 2), ((2, 2, 1), 3), ((5, 6, 6), 0)])
def test_smoothing_and_upsampling_match_torch(shape, iters):
    rng = np.random.default_rng(1)
    p = rng.random(shape, dtype=np.float32)
    p /= p.sum(axis=0, keepdims=True)
    ours = smooth_probs(p.copy(), iters)
    ref = torch_smooth_probs(torch.from_numpy(p)[None], iters)[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    np.testing.assert_allclose(ours.sum(axis=0), 1.0, atol=1e-6)  # still normalised at borders
    for h, w in [(4 * shape[1], 4 * shape[2]), (4 * shape[1] - 3, 4 * shape[2] - 1)]:
        up = upsample4(ours, h, w)
        ref_up = torch_upsample_to(torch.from_numpy(ours)[None], h, w)[0].numpy()
        assert up.shape == ref_up.shape == (shape[0], h, w)
        np.testing.assert_allclose(up, ref_up, atol=1e-6)


def test_thread_count_does_not_change_results_and_band_size_only_rounding():
    enc = random_encoder(width=16, depth=1, embed_dim=8)
    layers, arrays = enc.export_layers()
    meta = encoder_meta(enc)
    rgb = synthetic_rgb(90, 70, seed=2)
    for band in (1 << 12, 1 << 16, 1 << 24):
        # the same bands on any number of threads: the same sgemm calls, so the same bits
        ref = Model(layers, arrays, meta, threads=1, band_bytes=band).embed(rgb)
        for threads in (2, 3):
            got = Model(layers, arrays, meta, threads=threads, band_bytes=band).embed(rgb)
            np.testing.assert_array_equal(got, ref)
    # another band height is another sgemm height: some BLAS kernels (OpenBLAS 0.3.31 on AVX2)
    # round a row differently by height, so band size may move the last bit, never more
    whole = Model(layers, arrays, meta, threads=1, band_bytes=1 << 24).embed(rgb)
    for band in (64, 1 << 12, 1 << 16):
        got = Model(layers, arrays, meta, threads=2, band_bytes=band).embed(rgb)
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-6)


def test_band_pool_runs_every_item_once_on_several_threads_and_raises_a_bands_error():
    import threading
    import time

    from runtime.network import BandPool

    pool = BandPool(2)
    seen, threads = [], set()

    def record(i: int) -> None:
        time.sleep(0.002)  # long enough that the helper thread gets items too
        seen.append(i)
        threads.add(threading.get_ident())

    pool.map(record, range(40))
    assert sorted(seen) == list(range(40)) and len(threads) == 2
    pool.map(record, [])
    done = []

    def fail_at_7(i: int) -> None:
        if i == 7:
            raise ValueError("band 7")
        done.append(i)

    with pytest.raises(ValueError, match="band 7"):
        pool.map(fail_at_7, range(1000))
    assert len(done) < 999  # the threads stopped taking items
    pool.map(record, range(3))  # the pool still works after an error
    assert sorted(seen[-3:]) == [0, 1, 2]


def test_fit_centres_keeps_the_best_of_its_restarts():
    # unit vectors in 8 overlapping groups of unequal size: single k-means++ starts at k=5 land in
    # different local optima; `restarts` must return the best start's centres (by total cosine)
    rng = np.random.default_rng(0)
    groups = rng.standard_normal((8, 6)).astype(np.float32)
    x = np.concatenate([g + 0.8 * rng.standard_normal((n, 6)).astype(np.float32)
                        for g, n in zip(groups, [400, 300, 200, 150, 100, 80, 60, 40])])
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def objective(c):
        return float((x @ c.T).max(axis=1).sum(dtype=np.float64))

    singles = [cluster.fit_centres(x, 5, 0.1, 0, seed=s, restarts=1) for s in range(10, 14)]
    best = cluster.fit_centres(x, 5, 0.1, 0, seed=10, restarts=4)
    scores = [objective(c) for c in singles]
    assert len({round(v, 3) for v in scores}) > 1          # the starts really differ
    np.testing.assert_array_equal(best, singles[int(np.argmax(scores))])
    # the starts run on a thread pool's map give the same centres, in the same order of preference
    from runtime.network import BandPool

    pool = BandPool(2)
    for iters in (0, 3):
        np.testing.assert_array_equal(cluster.fit_centres(x, 5, 0.1, iters, seed=10, restarts=4, map_starts=pool.map),
                                      cluster.fit_centres(x, 5, 0.1, iters, seed=10, restarts=4))
    with pytest.raises(InputError, match="restarts"):
        cluster.fit_centres(x, 5, 0.1, 0, restarts=0)


def test_fit_temperature_sets_the_soft_updates_of_centre_fitting():
    enc = random_encoder(width=16, depth=1, embed_dim=8)
    plain, cooled = _model(enc), _model(enc, fit_temperature=0.03)
    assert plain.fit_temperature == plain.temperature == 0.1 and cooled.fit_temperature == 0.03
    # five loose groups of unit vectors: soft updates move the hard centres without merging them
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(np.eye(8)[i] * 3, 1.0, (200, 8)) for i in range(5)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hard = cluster.fit_centres(x, 5, 0.1, 0, seed=0)
    fits = {}
    for model, t in ((plain, 0.1), (cooled, 0.03)):  # every row is sampled, so both fits see exactly x
        fits[t] = model.fit_centres_from_cells([x], 5, seed=0, samples=len(x))
        np.testing.assert_array_equal(fits[t], cluster.fit_centres(x, 5, t, 3, seed=0))
        assert not np.array_equal(fits[t], hard)
    assert not np.array_equal(fits[0.1], fits[0.03])
    # the probabilities (and so smoothing) keep the head's training temperature
    cells = x[:120].reshape(10, 12, 8)
    np.testing.assert_array_equal(cooled.cell_proba(cells, fits[0.03]), plain.cell_proba(cells, fits[0.03]))


@pytest.mark.parametrize("bad", [0, -0.1, "0.05", True, float("nan")])
def test_bad_fit_temperature_is_refused(bad):
    from runtime.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="'fit_temperature' must be null or a number > 0"):
        _model(random_encoder(width=16, depth=1, embed_dim=8), fit_temperature=bad)


def test_fit_centres_is_deterministic_distinct_and_global():
    model = _model(random_encoder(width=16, depth=1, embed_dim=8))
    images = [synthetic_rgb(64, 80, seed=s) for s in range(3)]
    a = model.fit_centres(images, k=6, seed=0, samples=500)
    b = model.fit_centres(images, k=6, seed=0, samples=500)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 8) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # no two identical centres (random weights put all embeddings in a narrow cone, so the
    # separation itself is small here; test_soft_kmeans_recovers... checks quality)
    cos = a.astype(np.float64) @ a.T.astype(np.float64)
    assert cos[~np.eye(6, dtype=bool)].max() < 1 - 1e-6
    # the global protocol: the same centres label every image consistently
    for im in images:
        lab = model.predict_labels(im, 6, centres=a)
        assert lab.max() < 6
    # cells reused: fitting from precomputed embeddings equals fitting from images
    cells = [model.embed_cells(im) for im in images]
    np.testing.assert_array_equal(model.fit_centres_from_cells(cells, 6, seed=0, samples=500), a)
    np.testing.assert_array_equal(model.labels_from_cells(cells[1], a, 64, 80),
                                  model.predict_labels(images[1], 6, centres=a))


def test_soft_kmeans_recovers_separated_directions_and_reseeds_collapsed_centres():
    rng = np.random.default_rng(0)
    truth = np.eye(4, 16, dtype=np.float32)
    x = np.repeat(truth, 200, axis=0) + rng.normal(0, 0.05, (800, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = cluster.fit_centres(x, 4, temperature=0.1, iters=10, seed=1)
    assert sorted(np.argmax(c @ truth.T, axis=1).tolist()) == [0, 1, 2, 3]
    assert not np.array_equal(c, cluster.fit_centres(x, 4, temperature=0.1, iters=0, seed=1))  # soft kept
    # duplicate / dead centres get re-seeded at the worst-explained samples
    dup = np.stack([truth[0], truth[0], truth[1], truth[1]])
    fixed = cluster._reseed_collapsed(x, dup, np.ones(4))
    assert sorted(np.argmax(fixed @ truth.T, axis=1).tolist()) == [0, 1, 2, 3]
    # soft updates at a temperature above the clusters' spread would merge them: hard centres kept
    near = np.stack([truth[0] + 0.01 * truth[i] for i in (1, 2, 3)])
    near = np.repeat(near, 100, axis=0) + rng.normal(0, 1e-3, (300, 16)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    hard = cluster.fit_centres(near, 3, temperature=0.1, iters=0, seed=0)
    np.testing.assert_array_equal(cluster.fit_centres(near, 3, temperature=0.1, iters=20, seed=0), hard)
    assert sorted(np.bincount(np.argmax(near @ hard.T, axis=1), minlength=3).tolist()) == [100, 100, 100]
    # a degenerate input (all samples identical) still returns k centres without failing
    same = np.tile(truth[:1], (50, 1))
    assert cluster.fit_centres(same, 3, 0.1, 3, seed=0).shape == (3, 16)


def test_balanced_rows_weighs_each_micro_cluster_the_same():
    rng = np.random.default_rng(0)
    e = np.eye(3, 8, dtype=np.float32)
    big = e[0] + rng.normal(0, 0.02, (1000, 8)).astype(np.float32)   # a cover that fills the sample
    small = e[1] + rng.normal(0, 0.02, (10, 8)).astype(np.float32)   # a rare one
    x = np.concatenate([big, small])
    out = cluster.balanced_rows(x, 2, seed=0)
    assert out.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert 0.4 < np.mean(out @ e[1] > 0.9) < 0.6  # about half the rows now, against 1 % before
    np.testing.assert_array_equal(out, cluster.balanced_rows(x, 2, seed=0))  # seeded
    assert cluster.balanced_rows(x[:3], 64, seed=0).shape == (3, 8)  # min(micro, N) micro-clusters
    with pytest.raises(InputError, match="micro"):
        cluster.balanced_rows(x, 0)


def test_balanced_fitting_gives_a_rare_cover_a_centre():
    """Three centres for a sample that is 1000 cells of one broad cover (two shades), 1000 of a
    second and 12 of a rare third: plain k-means spends two centres on the broad cover, balanced
    fitting gives the rare one its own."""
    rng = np.random.default_rng(1)
    e = np.eye(4, 8, dtype=np.float32)
    shades = np.concatenate([e[0] + 0.35 * e[3], e[0] - 0.35 * e[3]] * 500).reshape(1000, 8)
    x = np.concatenate([shades + rng.normal(0, 0.02, (1000, 8)),
                        e[1] + rng.normal(0, 0.02, (1000, 8)),
                        e[2] + rng.normal(0, 0.02, (12, 8))]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    model = _model(random_encoder(embed_dim=8))
    rare = lambda c: bool((np.asarray(c) @ e[2] > 0.9).any())
    assert not rare(model.fit_centres_from_cells([x], 3, iters=0))
    assert rare(model.fit_centres_from_cells([x], 3, iters=0, balance=16))
    for bad in (-1, 1.5, True):
        with pytest.raises(InputError, match="balance"):
            model.fit_centres_from_cells([x], 3, balance=bad)


def test_predict_with_balanced_centres_fitted_on_the_image():
    model = _model(random_encoder(embed_dim=8))
    rgb = synthetic_rgb(64, 72, seed=2)
    balanced = model.fit_centres([rgb], 4, balance=16)
    assert not np.allclose(balanced, model.fit_centres([rgb], 4))
    np.testing.assert_array_equal(model.predict_labels(rgb, 4, balance=16),
                                  model.predict_labels(rgb, 4, centres=balanced))
    np.testing.assert_array_equal(model.predict_proba(rgb, 4, balance=16),
                                  model.predict_proba(rgb, 4, centres=balanced))


def test_euclidean_kmeans_and_assign_for_rgb_baselines():
    rng = np.random.default_rng(0)
    means = np.array([[20, 20, 20], [200, 30, 30], [30, 200, 30]], np.float32)
    x = np.concatenate([m + rng.normal(0, 5, (300, 3)) for m in means]).astype(np.float32)
    c = cluster.kmeans(x, 3, seed=0, iters=50)
    np.testing.assert_array_equal(c, cluster.kmeans(x, 3, seed=0, iters=50))
    order = np.argsort(c[:, 0] + 2 * c[:, 1])
    np.testing.assert_allclose(c[order], means[[0, 1, 2]], atol=2.0)
    labels = cluster.assign(x, c)
    assert labels.shape == (900,)
    for i in range(3):
        assert len(np.unique(labels[i * 300:(i + 1) * 300])) == 1
    with pytest.raises(InputError, match="cannot make 5 clusters"):
        cluster.kmeans(x[:3], 5)


def test_euclidean_kmeans_equals_a_plain_lloyd_reference():
    """The fast sums (bincount per feature) and cached norms give bit-for-bit the centres of plain
    Lloyd iterations (np.add.at sums, norms recomputed) from the same k-means++ start."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (5000, 4)).astype(np.float32)
    x[:2500] += 3.0
    for k, seed in ((6, 0), (3, 5)):
        x64 = x.astype(np.float64)
        c = x64[cluster._greedy_kmeanspp(x64, k, np.random.default_rng(seed), cluster._sqdist)].copy()
        labels = None
        for _ in range(50):
            d = (x64 * x64).sum(axis=1)[:, None] - 2.0 * (x64 @ c.T) + (c * c).sum(axis=1)[None, :]
            new = np.argmin(np.maximum(d, 0.0), axis=1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            sums = np.zeros_like(c)
            np.add.at(sums, labels, x64)
            assert np.bincount(labels, minlength=k).min() > 0  # no re-seeding on this data
            c = sums / np.bincount(labels, minlength=k)[:, None]
        np.testing.assert_array_equal(cluster.kmeans(x, k, seed=seed, iters=50), c.astype(np.float32))


def test_bad_arrays_and_arguments_raise_clear_errors():
    model = _model(random_encoder(width=8, depth=0, embed_dim=4))
    rgb = synthetic_rgb(16, 16)
    with pytest.raises(InputError, match="uint8 array"):
        model.embed(rgb.astype(np.float32))
    with pytest.raises(InputError, match=r"\(H, W, 3\)"):
        model.embed(rgb[..., :2])
    for k in (1, 9, 2.5, True):
        with pytest.raises(InputError, match=r"k must be an integer in 2\.\.8"):
            model.predict_labels(rgb, k)
    with pytest.raises(InputError, match=r"centres must have shape \(k, embed_dim\) = \(3, 4\)"):
        model.predict_labels(rgb, 3, centres=np.ones((3, 5)))
    with pytest.raises(InputError, match=r"no precomputed centres for k=3 \(it has none\); fit them"):
        model.artifact_centres(3)


NUMPY_ONLY = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "scipy", "rasterio", "stages")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    import numpy as np
    import runtime
    from runtime import cluster
    model = runtime.load_model(sys.argv[1])
    rgb = np.random.default_rng(0).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    labels = model.predict_labels(rgb, k=3)
    assert labels.shape == (37, 41) and labels.max() < 3
    centres = cluster.kmeans(rgb.reshape(-1, 3).astype(np.float32), 3, seed=0)
    assert cluster.assign(rgb.reshape(-1, 3), centres).shape == (37 * 41,)
    loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    try:
        import torch  # noqa: F401
    except ImportError:
        print("NUMPY-ONLY OK")
""")


def test_runtime_imports_loads_and_predicts_with_numpy_only(tmp_path):
    art = write_encoder_artifact(tmp_path / "best", random_encoder(width=8, depth=1, embed_dim=4))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", NUMPY_ONLY, str(art)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "NUMPY-ONLY OK" in res.stdout


def test_load_model_from_disk_equals_in_memory_model(tmp_path):
    enc = random_encoder(width=8, depth=1, embed_dim=4)
    art = write_encoder_artifact(tmp_path / "best", enc)
    rgb = synthetic_rgb(20, 24)
    np.testing.assert_array_equal(load_model(art).embed(rgb), _model(enc).embed(rgb))


def test_reused_activation_buffers_do_not_change_results():
    # the arena hands buffers of earlier (larger, smaller) images to later ones: borders must be
    # re-zeroed and nothing may leak from one call into the next
    enc = random_encoder(width=16, depth=2, embed_dim=8)
    layers, arrays = enc.export_layers()
    meta = encoder_meta(enc)
    images = [synthetic_rgb(70, 90, seed=1), synthetic_rgb(133, 41, seed=2), synthetic_rgb(9, 13, seed=3)]
    fresh = [Model(layers, arrays, meta).embed_cells(im) for im in images]
    model = Model(layers, arrays, meta)
    for order in ([0, 1, 2, 0], [2, 1, 0, 1]):
        for i in order:
            np.testing.assert_array_equal(model.embed_cells(images[i]), fresh[i])
            np.testing.assert_array_equal(model.embed(images[i]), fresh[i].transpose(2, 0, 1))
    # the normalised-float entry point runs the same pass
    x = (images[0].astype(np.float32) / meta["input_scale"] - np.float32(meta["input_mean"])) \
        / np.float32(meta["input_std"])
    np.testing.assert_array_equal(model.network(x.astype(np.float32)), fresh[0])
    assert model.network.arena.retained_bytes <= model.network.arena.keep_bytes


def test_buffer_arena_reuses_replaces_and_trims():
    from runtime.network import BufferArena

    arena = BufferArena(keep_bytes=4000)
    a, b = arena.take(100), arena.take(300)
    arena.give(a)
    arena.give(b)
    assert arena.take(50) is a            # the smallest that fits
    c = arena.take(500)                   # nothing fits: new, and the largest free one (b) goes
    assert c.size == 500 and arena.retained_bytes == 0
    arena.give(a)
    arena.give(c)
    arena.trim()                          # 2400 bytes: under the cap, kept
    assert arena.retained_bytes == 2400
    arena.keep_bytes = 1000
    arena.trim()                          # the largest goes first
    assert arena.retained_bytes == 400 and arena.take(100) is a


def test_forward_without_blas_thread_control_gives_the_same_result(monkeypatch):
    # e.g. Apple Accelerate: bands run serially with BLAS's own threads (larger bands, so the
    # same numbers up to the rounding a band height may change; see the test above)
    from runtime import network

    enc = random_encoder(width=16, depth=1, embed_dim=8)
    layers, arrays = enc.export_layers()
    rgb = synthetic_rgb(70, 90, seed=6)
    ref = Model(layers, arrays, encoder_meta(enc), threads=2).embed(rgb)

    class NoControl:
        available = False
        description = "no BLAS thread control found"

    monkeypatch.setattr(network, "blas_threads", lambda: NoControl())
    model = Model(layers, arrays, encoder_meta(enc), threads=2)
    assert not model.network.parallel and "serial" in model.network.describe()
    np.testing.assert_allclose(model.embed(rgb), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (3, 2, 1), (1, 1, 1), (1, 2, 1),
                                                     (3, 1, 2), (3, 2, 2), (5, 2, 1)])
def test_conv_matches_torch_for_strides_dilations_and_tiny_bands(kernel, stride, dilation):
    from runtime.network import ConvWeights, conv2d

    rng = np.random.default_rng(kernel * 10 + stride + dilation)
    x = rng.standard_normal((13, 11, 5), dtype=np.float32)
    w = rng.standard_normal((4, 5, kernel, kernel), dtype=np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    layer = {"op": "conv", "name": "c", "in": 5, "out": 4, "kernel": kernel, "stride": stride,
             "dilation": dilation, "padding": dilation * (kernel // 2), "act": "relu"}
    with torch.no_grad():
        ref = F.relu(F.conv2d(torch.from_numpy(x.transpose(2, 0, 1))[None], torch.from_numpy(w),
                              torch.from_numpy(b), stride=stride, padding=dilation * (kernel // 2),
                              dilation=dilation))[0].numpy().transpose(1, 2, 0)
    for band_bytes in (64, 1 << 20):  # one output row per band, and the whole layer in one band
        np.testing.assert_allclose(conv2d(x, ConvWeights(layer, w, b), band_bytes=band_bytes), ref, atol=1e-4)


def test_sums_by_label_equal_np_add_at_in_float64_bit_for_bit():
    from runtime.cluster import _sums_by_label

    rng = np.random.default_rng(0)
    for trial in range(12):
        n, d, k = int(rng.integers(50, 20000)), int(rng.integers(1, 20)), int(rng.integers(2, 17))
        x = rng.standard_normal((n, d)).astype(np.float32 if trial % 2 else np.float64)
        labels = rng.integers(0, k, n)
        labels[labels == 1] = 0  # an empty label
        expected = np.zeros((k, d), np.float64)
        np.add.at(expected, labels, x.astype(np.float64))
        got = _sums_by_label(np.ascontiguousarray(x.T, dtype=np.float64), labels, k)
        assert got.dtype == np.float64 and np.array_equal(got, expected)


def test_labels_from_cell_proba_equal_the_argmax_of_the_full_upsample():
    """The block shortcut (agreeing 2 x 2 cells take their cluster directly) and the interpolated
    blocks give exactly argmax(upsample4(probs)), also with exact ties, one-cell rows or columns
    and crops that cut a block."""
    from runtime.model import labels_from_cell_proba

    rng = np.random.default_rng(0)
    for k, h, w, height, width in ((6, 40, 52, 160, 208), (2, 10, 7, 37, 26), (8, 1, 1, 3, 4),
                                   (5, 33, 1, 130, 2), (3, 2, 3, 5, 9), (4, 17, 23, 66, 91)):
        p = rng.random((k, h, w)).astype(np.float32) ** 6
        p = smooth_probs(p / p.sum(axis=0), 3)
        p[:, : h // 2, : w // 2] = np.float32(1.0 / k)  # exact ties: argmax keeps the first cluster
        p[1, h // 2:, :] += np.float32(1e-6)  # near-ties, inside the shortcut's margin
        expected = np.argmax(upsample4(p, height, width), axis=0)
        np.testing.assert_array_equal(labels_from_cell_proba(p, height, width, band_cells=3), expected)


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (3, 2), (5, 1)])
def test_shifted_conv_matches_torch_with_skip_and_tiny_bands(kernel, dilation):
    """conv2d_shifted_into (k * k sgemms on shifted runs of the padded input) against torch, with
    the skip added inside, one row per band or the whole layer in one; the border stays zero."""
    from runtime._blas import direct_sgemm
    from runtime.network import ConvWeights, conv2d_shifted_into

    sgemm = direct_sgemm()
    if sgemm is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS that can be called directly")
    rng = np.random.default_rng(kernel + dilation)
    p = dilation * (kernel // 2)
    x = rng.standard_normal((13, 11, 5), dtype=np.float32)
    skip = rng.standard_normal((13, 11, 4), dtype=np.float32)
    w = rng.standard_normal((4, 5, kernel, kernel), dtype=np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    layer = {"op": "conv", "name": "c", "in": 5, "out": 4, "kernel": kernel, "stride": 1,
             "dilation": dilation, "padding": p, "act": "relu"}
    with torch.no_grad():
        conv = F.conv2d(torch.from_numpy(x.transpose(2, 0, 1))[None], torch.from_numpy(w),
                        torch.from_numpy(b), padding=p, dilation=dilation)[0].numpy().transpose(1, 2, 0)
    ref = np.maximum(conv + skip, 0.0)
    xbuf = np.pad(x, ((p, p), (p, p), (0, 0)))
    sbuf = np.pad(skip, ((p, p), (p, p), (0, 0)))
    for band_bytes in (64, 1 << 20):
        ybuf = np.full((13 + 2 * p, 11 + 2 * p, 4), np.nan, dtype=np.float32)
        ybuf[:p], ybuf[-p:], ybuf[:, :p], ybuf[:, -p:] = 0.0, 0.0, 0.0, 0.0
        conv2d_shifted_into(xbuf, ConvWeights(layer, w, b), ybuf, sgemm, sbuf, band_bytes=band_bytes)
        np.testing.assert_allclose(ybuf[p:-p, p:-p], ref, atol=1e-4)
        border = np.ones(ybuf.shape[:2], bool)
        border[p:-p, p:-p] = False
        assert not ybuf[border].any()


def test_network_with_and_without_direct_sgemm_agree(monkeypatch):
    """The shifted sgemms (numpy's OpenBLAS called directly) and the row taps (np.matmul) give
    the same embeddings up to rounding, for plain blocks and a refinement head (dilated convs:
    test_shifted_conv_matches_torch_with_skip_and_tiny_bands)."""
    from runtime import network

    rng = np.random.default_rng(4)
    for arch in (dict(width=16, depth=2, embed_dim=8), dict(width=8, depth=1, embed_dim=6, refine=True)):
        enc = random_encoder(**arch, seed=5)
        layers, arrays = enc.export_layers()
        rgb = rng.integers(0, 256, (61, 45, 3), dtype=np.uint8)
        fast = Model(layers, arrays, encoder_meta(enc), threads=2)
        if not fast.network._shifted:
            pytest.skip("numpy's BLAS is not an OpenBLAS that can be called directly")
        monkeypatch.setattr(network, "direct_sgemm", lambda: None)
        plain = Model(layers, arrays, encoder_meta(enc), threads=2)
        monkeypatch.undo()
        assert not plain.network._shifted
        np.testing.assert_allclose(fast.embed(rgb), plain.embed(rgb), rtol=0, atol=1e-5)


def test_cell_colours_are_the_mean_of_each_cells_pixels():
    rgb = np.random.default_rng(0).integers(0, 256, (10, 7, 3), dtype=np.uint8)  # partial last cells
    got = cell_colours(rgb)
    assert got.shape == (3, 2, 3) and got.dtype == np.float32
    for i in range(3):
        for j in range(2):
            block = rgb[4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1, 3) / 255.0
            np.testing.assert_allclose(got[i, j], block.mean(axis=0), atol=1e-6)


def test_guided_smoothing_without_colour_contrast_is_plain_smoothing():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(13, 9)).transpose(2, 0, 1).astype(np.float32)
    flat = np.full((13, 9, 3), 0.4, np.float32)  # one colour: every weight is 1
    for iters in (1, 3, 8):
        np.testing.assert_allclose(smooth_probs_guided(probs, iters, flat, 0.1), smooth_probs(probs, iters),
                                   atol=2e-6)
    out = smooth_probs_guided(probs, 3, rng.random((13, 9, 3)).astype(np.float32), 0.1)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-6)
    assert smooth_probs_guided(probs, 0, flat, 0.1) is probs
    # floor 1: every neighbour keeps its full weight whatever its colour
    np.testing.assert_allclose(smooth_probs_guided(probs, 3, rng.random((13, 9, 3)).astype(np.float32), 0.1,
                                                   floor=1.0), smooth_probs(probs, 3), atol=2e-6)


def test_guided_smoothing_keeps_a_small_house_that_plain_smoothing_melts():
    # a 2 x 2-cell house of its own colour in a field: plain smoothing gives its cells to the field
    h = w = 12
    colours = np.full((h, w, 3), [0.3, 0.6, 0.2], np.float32)
    colours[5:7, 5:7] = [0.8, 0.3, 0.3]
    probs = np.empty((2, h, w), np.float32)
    probs[0], probs[1] = 0.9, 0.1
    probs[:, 5:7, 5:7] = np.array([0.4, 0.6], np.float32)[:, None, None]
    assert (smooth_probs(probs, 8).argmax(axis=0) == 0).all()
    guided = smooth_probs_guided(probs, 8, colours, 0.1).argmax(axis=0)
    house = np.zeros((h, w), bool)
    house[5:7, 5:7] = True
    np.testing.assert_array_equal(guided == 1, house)


def test_guided_labels_equal_the_argmax_of_the_guided_upsample():
    """With colour guidance the block shortcut and the guided blocks give exactly
    argmax(upsample4_guided), on random images, ties, one-cell rows and cropped blocks."""
    from runtime.model import labels_from_cell_proba

    rng = np.random.default_rng(3)
    for k, h, w, height, width in ((6, 40, 52, 160, 208), (2, 10, 7, 37, 26), (8, 1, 1, 3, 4),
                                   (5, 33, 1, 130, 2), (3, 2, 3, 5, 9), (4, 17, 23, 66, 91)):
        p = rng.random((k, h, w)).astype(np.float32) ** 6
        p = smooth_probs(p / p.sum(axis=0), 3)
        p[:, : h // 2, : w // 2] = np.float32(1.0 / k)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for sigma in (0.02, 0.05, 0.3):
            up = upsample4_guided(p, image, sigma)
            np.testing.assert_allclose(up.sum(axis=0), 1.0, atol=1e-5)
            np.testing.assert_array_equal(
                labels_from_cell_proba(p, height, width, band_cells=3, image=image, colour_sigma=sigma),
                np.argmax(up, axis=0))
        # far from every colour distance the guide is plain bilinear upsampling
        np.testing.assert_allclose(upsample4_guided(p, image, 1e4), upsample4(p, height, width), atol=1e-6)
    with pytest.raises(InputError, match="colour-guided labels need"):
        labels_from_cell_proba(p, height, width, image=image[:-1], colour_sigma=0.05)


def test_guided_labels_put_the_edge_where_the_image_has_it():
    # black left of column 10, white from it on; the cells' clusters follow the cells' majority
    # colour (cells 0-2 black-ish, 3-5 white), so plain bilinear labels put the edge half way
    # between the centres of cells 2 and 3 (column 12), the guided ones at the image's edge
    from runtime.model import labels_from_cell_proba

    image = np.zeros((8, 24, 3), np.uint8)
    image[:, 10:] = 255
    probs = np.empty((2, 2, 6), np.float32)
    probs[0], probs[1] = 0.9, 0.1
    probs[:, :, 3:] = np.array([0.1, 0.9], np.float32)[:, None, None]
    edge = np.broadcast_to(np.arange(24) >= 10, (8, 24))
    np.testing.assert_array_equal(labels_from_cell_proba(probs, 8, 24, image=image, colour_sigma=0.05), edge)
    np.testing.assert_array_equal(labels_from_cell_proba(probs, 8, 24), np.broadcast_to(np.arange(24) >= 12, (8, 24)))


def test_a_colour_guided_model_needs_the_image(tmp_path):
    enc = random_encoder(width=8, depth=0, embed_dim=6, seed=2)
    model = load_model(write_encoder_artifact(tmp_path / "m", enc, smooth_iters=2, smooth_colour_sigma=0.1))
    assert model.smooth_colour_sigma == 0.1
    rgb = synthetic_rgb(33, 21, seed=1)
    cells = model.embed_cells(rgb)
    centres = model.fit_centres([rgb], k=3, seed=0)
    with pytest.raises(InputError, match="needs image="):
        model.cell_proba(cells, centres)
    with pytest.raises(InputError, match="does not give the"):
        model.cell_proba(cells, centres, image=rgb[:20])
    guided = model.cell_proba(cells, centres, image=rgb)
    np.testing.assert_allclose(guided, smooth_probs_guided(model.cell_proba(cells, centres, smooth_iters=0), 2,
                                                           cell_colours(rgb), 0.1), atol=1e-6)
    # predict_labels passes its image itself
    labels = model.predict_labels(rgb, 3, centres=centres)
    np.testing.assert_array_equal(labels, model.labels_from_cells(cells, centres, 33, 21, image=rgb))

    # guided labels too: the labels are the argmax of the probabilities, and the image is needed
    model = load_model(write_encoder_artifact(tmp_path / "l", enc, smooth_iters=2, smooth_colour_sigma=0.1,
                                              label_colour_sigma=0.05))
    assert model.label_colour_sigma == 0.05
    with pytest.raises(InputError, match="label_colour_sigma"):
        model.labels_from_proba(model.cell_proba(cells, centres, image=rgb), 33, 21)
    labels = model.predict_labels(rgb, 3, centres=centres)
    np.testing.assert_array_equal(labels, model.predict_proba(rgb, 3, centres=centres).argmax(axis=0))
    np.testing.assert_array_equal(labels, model.labels_from_cells(cells, centres, 33, 21, image=rgb))
