"""Benchmark of the numpy runtime against onnxruntime and torch on the same weights and threads,
and of a whole raster against the network alone.

    python benchmarks/runtime_bench.py                  # everything (`make bench`)
    python benchmarks/runtime_bench.py --skip-rss       # network throughput only
    python benchmarks/runtime_bench.py --size 512 --repeats 1 --skip-rss --skip-other-kernel  # a smoke run
    python benchmarks/runtime_bench.py --profile        # where an 8192^2 raster's time goes, step by step
    python benchmarks/runtime_bench.py --layers         # each conv, numpy against onnxruntime's profile

Measures, in one process, for the student and the teacher architectures of params.yaml (random
weights, random batch-norm statistics so that the numpy side runs folded weights):
- embeddings of a size x size (2048) uint8 RGB image to unit embeddings in (D, h, w) layout:
  numpy `Model.embed`, onnxruntime (CPU execution provider, all graph optimisations, the same
  torch module exported to ONNX with the normalisation inside) and torch, all on --threads
  threads, timed round-robin (best of --repeats each); the ONNX graph's embeddings are checked
  against numpy's (max abs <= 1e-4) before timing;
- in a fresh subprocess per size (2048^2 and 8192^2 synthetic GeoTIFFs): `segment_raster` (read,
  fit centres, embed, label, smooth, write; its peak RSS, VmHWM) and then the network alone on the
  same number of pixels (`Model.embed_cells` on 2048^2 arrays, no I/O, no halo), so
  segment_over_network is the whole raster's throughput over the network's;
- the OpenBLAS kernel in use, and the network figures again in a subprocess under the other
  OpenBLAS setting: OPENBLAS_CORETYPE=Haswell when the environment does not force a kernel (then
  OpenBLAS picks its own, SkylakeX on an AVX-512 CPU), or with OPENBLAS_CORETYPE and
  OPENBLAS_L2_SIZE removed when it does.
onnxruntime and onnx are benchmark dependencies only: `pip install -e '.[bench]'`.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ORT_TOLERANCE = 1e-4


def build_encoder(arch: str, seed: int = 0):
    """A random-weight encoder of the params.yaml architecture, with random batch-norm statistics
    (so the numpy side runs folded weights while torch runs conv + batch norm)."""
    import torch

    from stages.model import Encoder
    from stages.params import load_params

    params = load_params(REPO / "params.yaml")
    if arch == "student":
        s = params.student
        enc = Encoder(s.width, s.depth, s.embed_dim, s.norm, 0.0)
    else:
        m = params.model
        enc = Encoder(m.width, m.depth, m.embed_dim, "batch", 0.0, m.refine_head)
    torch.manual_seed(seed)
    with torch.no_grad():
        for mod in enc.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return enc.eval(), params


def write_artifact_for(enc, params, dst: Path) -> Path:
    from runtime.artifact import build_meta, write_artifact
    from stages.model import INPUT_MEAN, INPUT_SCALE, INPUT_STD

    layers, arrays = enc.export_layers()
    m = params.model
    meta = build_meta(embed_dim=enc.embed_dim, max_k=m.max_k, temperature=m.temperature,
                      cluster_iters_default=m.cluster_iters, smooth_iters_default=m.smooth_iters,
                      input_mean=INPUT_MEAN, input_std=INPUT_STD, input_scale=INPUT_SCALE,
                      supports_learned_refine=enc.refine is not None,
                      receptive_field=enc.receptive_field, git_commit="bench", params_hash="bench",
                      fit_temperature=params.export.fit_temperature,
                      smooth_colour_sigma=params.export.smooth_colour_sigma,
                      smooth_colour_floor=params.export.smooth_colour_floor,
                      label_colour_sigma=params.export.label_colour_sigma)
    return write_artifact(dst, layers=layers, arrays=arrays, meta=meta, metrics={}, overwrite=True)


def synthetic_raster(path: Path, size: int, block_rows: int = 512) -> Path:
    """A size x size 3-band uint8 tiled GeoTIFF of smooth colour fields plus noise, written in
    row blocks (the parent's memory stays small)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32611", "transform": from_origin(500000, 4000000, 0.6, 0.6),
               "tiled": True, "blockxsize": 256, "blockysize": 256}
    xx = np.arange(size, dtype=np.float32)[None, :]
    with rasterio.open(path, "w", **profile) as ds:
        for r0 in range(0, size, block_rows):
            n = min(block_rows, size - r0)
            yy = np.arange(r0, r0 + n, dtype=np.float32)[:, None]
            bands = []
            for b, (fy, fx) in enumerate([(97.0, 131.0), (151.0, 89.0), (211.0, 173.0)]):
                field = 128 + 60 * np.sin(yy / fy + b) * np.cos(xx / fx - b) + 30 * np.sin((yy + xx) / 37.0)
                bands.append(field + rng.normal(0, 8, (n, size)).astype(np.float32))
            ds.write(np.clip(np.stack(bands), 0, 255).astype(np.uint8), window=Window(0, r0, size, n))
    return path


def segment_child(src: str, dst: str, model_dir: str, k: int, threads: int) -> None:
    """segment_raster once (peak RSS taken right after it), then the network alone on as many
    pixels, in this one process; prints JSON."""
    from runtime import load_model, segment_raster

    model = load_model(model_dir, threads=threads)
    t = time.perf_counter()
    res = segment_raster(src, dst, k, model, overwrite=True)
    seconds = time.perf_counter() - t
    peak_mb = peak_rss_mb()
    size = int(Path(src).stem.split("_")[-1])
    piece = min(size, 2048)
    rgb = np.random.default_rng(0).integers(0, 256, (piece, piece, 3), dtype=np.uint8)
    model.embed_cells(rgb)  # warm-up
    t = time.perf_counter()
    for _ in range((size // piece) ** 2):
        model.embed_cells(rgb)
    network_seconds = time.perf_counter() - t
    print(json.dumps({"peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 2), "tiles": res.tiles,
                      "network_seconds": round(network_seconds, 2)}))


# Where a whole raster's time goes: (step, the functions whose cumulative time it is). The
# tiles' embedding is embed_cells' time less what it spent called from sample_raster_cells
# (the sample windows, inside the fit's time).
PROFILE_STEPS = (
    ("fit the centres (sample windows embedded, balanced micro-clusters, k-means)", ("runtime/sampling.py", "fit_raster_centres")),
    ("  of which reading and embedding the sample windows", ("runtime/sampling.py", "sample_raster_cells")),
    ("embed the tiles (with their halo)", ("runtime/model.py", "embed_cells")),
    ("soft assignment", ("runtime/cluster.py", "soft_assign_columns")),
    ("cells' mean colours", ("runtime/model.py", "cell_colours")),
    ("smoothing", ("runtime/model.py", "smooth_probs_guided"), ("runtime/model.py", "smooth_probs")),
    ("labels (upsample, argmax)", ("runtime/model.py", "labels_from_cell_proba")),
    ("read (tiles and sample windows)", ("runtime/source.py", "read")),
    ("write", ("runtime/io_rasterio.py", "write"), ("runtime/io_gdal.py", "write")),
)


def profile_child(src: str, dst: str, model_dir: str, k: int, threads: int) -> None:
    """segment_raster once under cProfile: seconds per step of PROFILE_STEPS; prints JSON."""
    import cProfile
    import pstats

    from runtime import load_model, segment_raster

    model = load_model(model_dir, threads=threads)
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.runcall(segment_raster, src, dst, k, model, overwrite=True)
    total = time.perf_counter() - t
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, ..., tottime, cumtime, callers)
    cumulative = {}
    for (file, _, name), row in stats.items():
        for step, *functions in PROFILE_STEPS:
            if any(file.endswith(f) and name == n for f, n in functions):
                cumulative[step] = cumulative.get(step, 0.0) + row[3]
        if file.endswith("runtime/model.py") and name == "embed_cells":
            for (caller_file, _, caller), timing in row[4].items():
                if caller_file.endswith("runtime/sampling.py") and caller == "sample_raster_cells":
                    cumulative[PROFILE_STEPS[2][0]] -= timing[3]
    print(json.dumps({"total_s": round(total, 2),
                      **{step: round(cumulative.get(step, 0.0), 2) for step, *_ in PROFILE_STEPS}}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across execve,
    so a subprocess would report its parent's size at fork time."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 if sys.platform != "darwin" else 1024.0 ** 2)


def measure_segment(size: int, model_dir: Path, workdir: Path, k: int, threads: int, profile: bool = False) -> dict:
    src = synthetic_raster(workdir / f"bench_{size}.tif", size)
    child = "--profile-child" if profile else "--segment-child"
    res = subprocess.run([sys.executable, __file__, child, str(src), str(workdir / f"out_{size}.tif"),
                          str(model_dir), str(k), str(threads)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"segment_raster subprocess failed on {size}^2:\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    src.unlink()
    (workdir / f"out_{size}.tif").unlink()
    return out


def blas_kernel() -> str:
    """The kernel OpenBLAS chose (openblas_get_corename), or what numpy's BLAS is when it is not OpenBLAS."""
    from runtime._blas import _loaded_libraries, loaded_openblas

    np.dot(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))
    for _, lib in loaded_openblas():
        for name in ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return "OpenBLAS " + fn().decode()
    return "not OpenBLAS: " + ", ".join(_loaded_libraries("blas"))


def ort_session(enc, path: Path, threads: int, size: int):
    """onnxruntime session of `enc` exported with the normalisation inside: uint8 (1, H, W, 3) in,
    unit embeddings (1, D, h, w) out."""
    try:
        import onnxruntime as ort
        import torch
    except ImportError as e:
        raise SystemExit(f"{e.name} is needed for this benchmark: pip install -e '.[bench]'") from None
    from stages.model import normalise_rgb

    class FromUint8(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, rgb):
            return self.encoder(normalise_rgb(rgb.permute(0, 3, 1, 2)))

    example = torch.zeros((1, size, size, 3), dtype=torch.uint8)
    with warnings.catch_warnings():  # the exporter's tracer notes on constants
        warnings.simplefilter("ignore")
        torch.onnx.export(FromUint8(enc).eval(), (example,), str(path), input_names=["rgb"],
                          output_names=["embeddings"],
                          dynamic_axes={"rgb": {1: "height", 2: "width"}}, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def network_figures(arch: str, size: int, threads: int, repeats: int, workdir: Path):
    """numpy, onnxruntime and torch on one architecture's random weights, round-robin, best of
    repeats: (figures, the artifact directory, the params)."""
    import torch

    from runtime.artifact import load_artifact
    from runtime.model import Model
    from stages.model import normalise_rgb

    enc, params = build_encoder(arch)
    model_dir = write_artifact_for(enc, params, workdir / f"model_{arch}")
    art = load_artifact(model_dir)
    model = Model(art.layers, art.arrays, art.meta, threads=threads)
    session = ort_session(enc, workdir / f"{arch}.onnx", threads, size)
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    x_torch = torch.from_numpy(rgb).permute(2, 0, 1)[None]

    def run_numpy():
        return model.embed(rgb)

    def run_ort():
        return session.run(None, {"rgb": rgb[None]})[0][0]

    def run_torch():
        with torch.no_grad():
            return enc(normalise_rgb(x_torch))[0]

    ours = run_numpy()
    diff_ort = float(np.abs(ours - run_ort()).max())
    diff_torch = float(np.abs(ours - run_torch().numpy()).max())
    if diff_ort > ORT_TOLERANCE:
        raise SystemExit(f"{arch}: onnxruntime's embeddings differ from numpy's by {diff_ort:.2e} "
                         f"(> {ORT_TOLERANCE}): not the same network, nothing timed")
    times = {"numpy": [], "ort": [], "torch": []}
    for _ in range(repeats):  # round-robin, so that load from elsewhere hits all three alike
        for name, fn in (("numpy", run_numpy), ("ort", run_ort), ("torch", run_torch)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    mpix = size * size / 1e6
    best = {name: min(t) for name, t in times.items()}
    return {
        "numpy_mpix_s": round(mpix / best["numpy"], 2), "ort_mpix_s": round(mpix / best["ort"], 2),
        "torch_mpix_s": round(mpix / best["torch"], 2),
        "numpy_over_ort": round(best["ort"] / best["numpy"], 3),
        "numpy_over_ort_median": round(statistics.median(times["ort"]) / statistics.median(times["numpy"]), 3),
        "numpy_over_torch": round(best["torch"] / best["numpy"], 3),
        "max_abs_diff_ort": diff_ort, "max_abs_diff_torch": diff_torch,
        "numpy_mode": model.network.describe(),
    }, model_dir, params


def ort_conv_times(session_path: Path, threads: int, rgb: np.ndarray, repeats: int, workdir: Path) -> tuple[list, float]:
    """onnxruntime's own profile of `repeats` runs: (best ms of each Conv node in execution order,
    best ms of all other nodes together)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "ort_profile")
    session = ort.InferenceSession(str(session_path), options, providers=["CPUExecutionProvider"])
    for _ in range(repeats):
        session.run(None, {"rgb": rgb[None]})
    events = json.loads(Path(session.end_profiling()).read_text())
    convs, others = {}, {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            into = convs if e["args"].get("op_name") == "Conv" else others
            into.setdefault(e["name"], []).append(e["dur"] / 1e3)
    return [min(v) for v in convs.values()], sum(min(v) for v in others.values())


def layer_figures(arch: str, size: int, threads: int, repeats: int, workdir: Path) -> dict:
    """Each conv of one architecture timed on the numpy side (Network._conv, best of repeats) and
    in onnxruntime's own profile, with the FLOP rate of both; plus the single-threaded sgemm rate
    of the shifted convs' operand shape, which bounds what the numpy side can reach."""
    from runtime import network
    from runtime._blas import blas_threads
    from runtime.artifact import load_artifact
    from runtime.model import Model

    enc, params = build_encoder(arch)
    art = load_artifact(write_artifact_for(enc, params, workdir / f"model_{arch}"))
    model = Model(art.layers, art.arrays, art.meta, threads=threads)
    ort_session(enc, workdir / f"{arch}.onnx", threads, size)
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    conv_ms: dict[str, list] = {}
    shapes: dict[str, tuple] = {}
    timed = network.Network._conv

    def timing_conv(self, name, x, fresh_last, skip=None, act=None):
        t = time.perf_counter()
        y = timed(self, name, x, fresh_last, skip, act)
        conv_ms.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
        shapes[name] = (y.h, y.w)
        return y

    totals = []
    network.Network._conv = timing_conv
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            model.embed(rgb)
            totals.append((time.perf_counter() - t) * 1e3)
    finally:
        network.Network._conv = timed
    ort_convs, ort_rest = ort_conv_times(workdir / f"{arch}.onnx", threads, rgb, repeats, workdir)
    net = model.network
    if len(ort_convs) != len(conv_ms):
        raise SystemExit(f"{arch}: onnxruntime ran {len(ort_convs)} Conv nodes, numpy {len(conv_ms)} convs")
    rows = []
    for (name, ms), ort_ms in zip(conv_ms.items(), ort_convs):
        cw = net.convs[name]
        gflop = shapes[name][0] * shapes[name][1] * cw.flops_per_output / 1e9
        rows.append({"conv": name, "kernel": cw.kernel, "stride": cw.stride, "in": cw.cin, "out": cw.cout,
                     "form": "shifted" if name in net._shifted else ("pointwise" if cw.kernel == 1 else "row taps"),
                     "gflop": round(gflop, 3), "numpy_ms": round(min(ms), 2), "ort_ms": round(ort_ms, 2),
                     "numpy_gflop_s": round(gflop / min(ms) * 1e3, 1), "ort_gflop_s": round(gflop / ort_ms * 1e3, 1)})
    numpy_total = min(totals)
    # the shifted convs' sgemm: a band of pixels (C_in wide) by one tap's (C_in, C_out) matrix
    width = max(cw.cin for cw in net.convs.values())
    a = np.random.default_rng(1).random((16384, width), dtype=np.float32)
    b = np.random.default_rng(2).random((width, width), dtype=np.float32)
    out = np.empty((16384, width), np.float32)
    with blas_threads().single_threaded():
        best = min(_seconds(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return {"layers": rows, "numpy_total_ms": round(numpy_total, 1),
            "numpy_outside_convs_ms": round(numpy_total - sum(r["numpy_ms"] for r in rows), 1),
            "ort_convs_ms": round(sum(ort_convs), 1), "ort_other_nodes_ms": round(ort_rest, 1),
            f"sgemm_16384x{width}x{width}_gflop_s_per_thread": round(2 * 16384 * width * width / best / 1e9, 1)}


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def other_kernel_env() -> tuple[dict, str]:
    env = dict(os.environ)
    if env.get("OPENBLAS_CORETYPE"):
        env.pop("OPENBLAS_CORETYPE")
        env.pop("OPENBLAS_L2_SIZE", None)
        return env, "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset"
    env["OPENBLAS_CORETYPE"] = "Haswell"
    return env, "OPENBLAS_CORETYPE=Haswell"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-rss", action="store_true", help="no whole-raster runs")
    ap.add_argument("--skip-other-kernel", action="store_true", help="no run under the other OpenBLAS setting")
    ap.add_argument("--network-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true",
                    help="only: where a whole raster's time goes (segment_raster on --profile-size^2 under cProfile)")
    ap.add_argument("--profile-size", type=int, default=8192)
    ap.add_argument("--layers", action="store_true",
                    help="only: each conv's time and FLOP rate, numpy against onnxruntime's own profile")
    ap.add_argument("--segment-child", nargs=5, metavar=("SRC", "DST", "MODEL", "K", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", nargs=5, metavar=("SRC", "DST", "MODEL", "K", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    for child, run in ((args.segment_child, segment_child), (args.profile_child, profile_child)):
        if child:
            src, dst, model_dir, k, threads = child
            run(src, dst, model_dir, int(k), int(threads))
            return

    import torch

    from runtime.network import default_threads

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    result = {"size": args.size, "threads": threads, "blas_kernel": blas_kernel(),
              "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}}
    with tempfile.TemporaryDirectory(prefix="runtime_bench_") as tmp:
        tmp = Path(tmp)
        if args.profile:
            enc, params = build_encoder("student")
            model_dir = write_artifact_for(enc, params, tmp / "model_student")
            steps = measure_segment(args.profile_size, model_dir, tmp, min(6, params.model.max_k), threads,
                                    profile=True)
            for step, seconds in steps.items():
                print(f"{seconds:8.2f} s  {step}")
            print(json.dumps({**{k: v for k, v in result.items() if k != "size"}, "profile_size": args.profile_size,
                              **steps}))
            return
        if args.layers:
            for arch in ("student", "teacher"):
                figures = layer_figures(arch, args.size, threads, args.repeats, tmp)
                print(f"{arch}, {args.size}^2 on {threads} threads ({result['blas_kernel']}): "
                      "conv, form, numpy ms (GFLOP/s), onnxruntime ms (GFLOP/s)")
                for r in figures["layers"]:
                    print(f"  {r['conv']:16s} {r['kernel']}x{r['kernel']} s{r['stride']} {r['in']:3d}->{r['out']:<3d} "
                          f"{r['form']:9s} {r['numpy_ms']:7.1f} ({r['numpy_gflop_s']:5.1f})  "
                          f"{r['ort_ms']:7.1f} ({r['ort_gflop_s']:5.1f})")
                print(f"  outside the convs: numpy {figures['numpy_outside_convs_ms']} ms, onnxruntime "
                      f"{figures['ort_other_nodes_ms']} ms; whole pass numpy {figures['numpy_total_ms']} ms")
                result[arch] = figures
            print(json.dumps(result))
            return
        student, model_dir, params = network_figures("student", args.size, threads, args.repeats, tmp)
        teacher, _, _ = network_figures("teacher", args.size, threads, args.repeats, tmp)
        result.update(student)  # the student is what the plugin and the CLI run
        result["teacher"] = teacher
        print(f"embed {args.size}^2 on {threads} threads ({result['blas_kernel']}): student numpy "
              f"{student['numpy_mpix_s']} / onnxruntime {student['ort_mpix_s']} / torch {student['torch_mpix_s']} "
              f"Mpix/s; teacher {teacher['numpy_mpix_s']} / {teacher['ort_mpix_s']} / {teacher['torch_mpix_s']}",
              flush=True)
        if args.network_only:
            print(json.dumps(result))
            return
        if not args.skip_rss:
            k = min(6, params.model.max_k)
            for size in (2048, 8192):
                r = measure_segment(size, model_dir, tmp, k, threads)
                result[f"peak_rss_mb_{size}"] = r["peak_rss_mb"]
                result[f"segment_mpix_s_{size}"] = round(size * size / 1e6 / r["seconds"], 2)
                result[f"network_mpix_s_{size}"] = round(size * size / 1e6 / r["network_seconds"], 2)
                print(f"segment_raster {size}^2: {r['seconds']} s (network alone {r['network_seconds']} s), "
                      f"peak RSS {r['peak_rss_mb']} MB", flush=True)
            result["segment_over_network"] = round(result["segment_mpix_s_8192"] / result["network_mpix_s_8192"], 3)
            result["rss_ratio_8192_vs_2048"] = round(result["peak_rss_mb_8192"] / result["peak_rss_mb_2048"], 3)
    if not args.skip_other_kernel:
        env, how = other_kernel_env()
        res = subprocess.run([sys.executable, __file__, "--network-only", "--size", str(args.size), "--repeats",
                              str(args.repeats), "--threads", str(threads)], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"the run with {how} failed:\n{res.stderr[-2000:]}")
        other = json.loads(res.stdout.strip().splitlines()[-1])
        result["other_kernel"] = {"setting": how, "blas_kernel": other["blas_kernel"],
                                  **{k: other[k] for k in ("numpy_mpix_s", "ort_mpix_s", "torch_mpix_s", "numpy_over_ort")},
                                  "teacher_numpy_over_ort": other["teacher"]["numpy_over_ort"]}
        print(f"with {how} ({other['blas_kernel']}): numpy {other['numpy_mpix_s']} / onnxruntime "
              f"{other['ort_mpix_s']} Mpix/s", flush=True)
    result["loadavg_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
