"""Benchmark of the numpy runtime against torch, on the same weights and the same threads.

    python benchmarks/runtime_bench.py                  # student architecture of params.yaml
    python benchmarks/runtime_bench.py --arch teacher   # the teacher encoder instead
    python benchmarks/runtime_bench.py --skip-rss       # throughput only

Measures, in one process, round-robin (numpy, torch, sgemm, numpy, ...; best of --repeats each) so
that load from other processes hits all of them alike:
- embeddings of a size x size (2048) RGB image, from uint8 input (normalisation included) to unit
  embeddings in (D, h, w) layout: numpy `Model.embed` vs torch `Encoder` forward (eval, no_grad,
  batch norm unfolded as in training), both on --threads threads;
- the convolutions' GFLOP/s (2 FLOPs per multiply-add) and a square 2048^3 float32 numpy matmul
  (numpy's BLAS on all threads) as the sgemm reference: gemm_efficiency = gflops / sgemm_gflops;
- peak RSS of `segment_raster` on synthetic 2048^2 and 8192^2 GeoTIFFs, each in a fresh
  subprocess (VmHWM), to show that memory is bounded by the tile size, not the raster size.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SGEMM_SETTLE_S = 0.3  # pause after each round's multi-threaded sgemm (see main)
sys.path.insert(0, str(REPO))


def build_encoder(arch: str, seed: int = 0):
    """A random-weight encoder of the params.yaml architecture, with random batch-norm statistics
    (so the numpy side runs folded weights while torch runs conv + batch norm)."""
    import torch

    from stages.model import Encoder
    from stages.params import load_params

    params = load_params(REPO / "params.yaml")
    if arch == "student":
        s = params.student
        enc = Encoder(s.width, s.depth, s.embed_dim, s.norm, 0.0, dilation=s.dilation)
    else:
        m = params.model
        enc = Encoder(m.width, m.depth, m.embed_dim, "batch", 0.0, m.refine_head, m.dilation)
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
                      receptive_field=enc.receptive_field, git_commit="bench", params_hash="bench")
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


def rss_child(src: str, dst: str, model_dir: str, k: int) -> None:
    """Run segment_raster once and print its peak RSS (MB) and time as JSON."""
    from runtime import load_model, segment_raster

    t = time.perf_counter()
    res = segment_raster(src, dst, k, load_model(model_dir), overwrite=True)
    seconds = time.perf_counter() - t
    peak_mb = peak_rss_mb()
    print(json.dumps({"peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 2), "tiles": res.tiles}))


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


def measure_rss(size: int, model_dir: Path, workdir: Path, k: int) -> dict:
    src = synthetic_raster(workdir / f"bench_{size}.tif", size)
    res = subprocess.run([sys.executable, __file__, "--rss-child", str(src), str(workdir / f"out_{size}.tif"),
                          str(model_dir), str(k)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"segment_raster subprocess failed on {size}^2:\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    src.unlink()
    (workdir / f"out_{size}.tif").unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("student", "teacher"), default="student")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--band-bytes", type=int, default=None)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-child", nargs=4, metavar=("SRC", "DST", "MODEL", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        src, dst, model_dir, k = args.rss_child
        rss_child(src, dst, model_dir, int(k))
        return

    import torch

    from runtime.model import Model
    from runtime.network import DEFAULT_BAND_BYTES, default_threads
    from stages.model import normalise_rgb

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    enc, params = build_encoder(args.arch)
    with tempfile.TemporaryDirectory(prefix="runtime_bench_") as tmp:
        tmp = Path(tmp)
        model_dir = write_artifact_for(enc, params, tmp / "model")
        art_model = Model(*_layers_arrays_meta(model_dir), threads=threads,
                          band_bytes=args.band_bytes or DEFAULT_BAND_BYTES)
        rgb = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        x_torch = torch.from_numpy(rgb).permute(2, 0, 1)[None]

        def run_numpy():
            return art_model.embed(rgb)

        def run_torch():
            with torch.no_grad():
                return enc(normalise_rgb(x_torch))

        a = np.random.default_rng(1).standard_normal((2048, 2048), dtype=np.float32)

        def run_sgemm():
            return a @ a

        diff = float(np.abs(run_numpy() - run_torch()[0].numpy()).max())  # also warms up both
        run_sgemm()
        # round-robin, so that load from other processes hits all three alike; best of each
        t_np, t_torch, t_gemm = [], [], []
        for _ in range(args.repeats):
            for fn, acc in ((run_numpy, t_np), (run_torch, t_torch), (run_sgemm, t_gemm)):
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
            # OpenBLAS's worker threads keep spinning for a while after the multi-threaded sgemm and
            # would take a core from whatever is timed next (measured: numpy 15 % slower right
            # after it, unaffected 0.2 s later); let them go to sleep, outside the timing
            time.sleep(SGEMM_SETTLE_S)

        mpix = args.size * args.size / 1e6
        flops = art_model.network.flops(args.size, args.size)
        best_np, best_torch = min(t_np), min(t_torch)
        result = {
            "arch": args.arch, "size": args.size, "threads": threads,
            "numpy_mode": art_model.network.describe(),
            "numpy_mpix_s": round(mpix / best_np, 2), "torch_mpix_s": round(mpix / best_torch, 2),
            "ratio": round(best_torch / best_np, 3),
            "ratio_median": round(statistics.median(t_torch) / statistics.median(t_np), 3),
            "gflops": round(flops / best_np / 1e9, 1),
            "sgemm_gflops": round(2 * 2048 ** 3 / min(t_gemm) / 1e9, 1),
            "max_abs_diff_vs_torch": diff,
        }
        result["gemm_efficiency"] = round(result["gflops"] / result["sgemm_gflops"], 3)
        print(f"embed {args.size}^2 ({args.arch}): numpy {best_np:.3f}s, torch {best_torch:.3f}s, "
              f"{result['gflops']} GFLOP/s vs sgemm {result['sgemm_gflops']}", flush=True)
        if not args.skip_rss:
            k = min(6, params.model.max_k)
            for size in (2048, 8192):
                r = measure_rss(size, model_dir, tmp, k)
                result[f"peak_rss_mb_{size}"] = r["peak_rss_mb"]
                result[f"segment_seconds_{size}"] = r["seconds"]
                result[f"segment_mpix_s_{size}"] = round(size * size / 1e6 / r["seconds"], 2)
                print(f"segment_raster {size}^2: peak RSS {r['peak_rss_mb']} MB, {r['seconds']} s", flush=True)
            result["rss_ratio_8192_vs_2048"] = round(result["peak_rss_mb_8192"] / result["peak_rss_mb_2048"], 3)
    result["loadavg_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


def _layers_arrays_meta(model_dir: Path):
    from runtime.artifact import load_artifact

    art = load_artifact(model_dir)
    return art.layers, art.arrays, art.meta


if __name__ == "__main__":
    main()
