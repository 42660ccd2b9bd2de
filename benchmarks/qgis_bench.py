"""The runtime inside QGIS against the project's environment, on the same raster, model and threads.

    python benchmarks/qgis_bench.py [--size 4096] [--repeats 3] [--model model/best]

Runs `segment` on one synthetic size x size RGB GeoTIFF, round-robin, best of --repeats each:
- `env`: `python -m runtime segment` in this environment (rasterio backend, numpy's OpenBLAS);
- `qgis_process`: `qgis_process.bin run landseg:segment` with the plugin zip installed in a fresh
  profile (GDAL backend, Debian's numpy); the runtime's matrix products routed to numpy's own BLAS
  (`runtime._blas`, as shipped);
- `qgis_process_gsl`: the same with LANDSEG_NO_BLAS_ROUTING=1, i.e. numpy's products on the GSL CBLAS
  that the QGIS executable links (what the runtime would get without the routing);
- `qgis_python`: Debian's Python with GDAL's bindings and rasterio, torch, scipy unimportable
  (tests/numpy_only_python.py), the GDAL backend outside QGIS.
Each figure is segment_raster's own time (read, fit centres, embed, label, smooth, write; the
process start-up excluded). Then the peak RSS of the GDAL backend on 2048^2 and 8192^2 rasters
(fresh processes), to show memory bounded by the tile size. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QGIS_PYTHON = "/usr/bin/python3"
SECONDS = re.compile(r"tile\(s\), ([0-9.]+) s")


def scene(size: int, seed: int, regions: int = 12) -> np.ndarray:
    """uint8 (size, size, 3): colour regions (nearest of seeded points) with texture and noise."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, size, (regions, 2))
    colours = rng.integers(20, 235, (regions, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    region = np.argmin([(yy - y) ** 2 + (xx - x) ** 2 for y, x in pts], axis=0)
    img = colours[region] + 12 * np.sin(xx / 3.0 + region)[..., None] + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_raster(path: Path, size: int) -> Path:
    """A size x size RGB GeoTIFF tiled from a 1024^2 synthetic scene (0.6 m, EPSG:32611)."""
    import rasterio
    from rasterio.transform import from_origin

    block = scene(1024, seed=7).transpose(2, 0, 1)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32611",
               "transform": from_origin(500000.0, 4000000.0, 0.6, 0.6), "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as ds:
        for r in range(0, size, 1024):
            for c in range(0, size, 1024):
                h, w = min(1024, size - r), min(1024, size - c)
                ds.write(block[:, :h, :w], window=rasterio.windows.Window(c, r, w, h))
    return path


def qgis_env(profile: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # QGIS's embedded Python takes its prefix from the first python3 on PATH: a virtual environment's
    # there (make puts .venv/bin first) gives it another Python's library, and qgis_process crashes
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin"] + [d for d in env.get("PATH", "").split(os.pathsep)
                                                          if d and not (Path(d) / "activate").exists()])
    env.update(QT_QPA_PLATFORM="offscreen", XDG_DATA_HOME=str(profile), XDG_RUNTIME_DIR=str(profile), **extra)
    return env


def seconds(done: subprocess.CompletedProcess) -> float:
    if done.returncode != 0:
        raise SystemExit(f"error: {done.args[:3]} failed:\n{done.stdout}\n{done.stderr}")
    found = SECONDS.findall(done.stdout + done.stderr)
    if not found:
        raise SystemExit(f"error: no timing in the output of {done.args[:3]}:\n{done.stdout}\n{done.stderr}")
    return float(found[-1])


def peak_rss_mb(src: Path, model: Path, out: Path) -> float:
    """VmHWM of the GDAL backend segmenting `src` in a fresh Debian Python."""
    code = (f"import resource, runpy, sys\nsys.argv = ['x', 'segment', {str(src)!r}, {str(out)!r}, '--k', '6', "
            f"'--model', {str(model)!r}, '--quiet', '--overwrite']\n"
            f"try:\n    runpy.run_path({str(REPO / 'tests' / 'numpy_only_python.py')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    done = subprocess.run([QGIS_PYTHON, "-c", code], capture_output=True, text=True, env=qgis_env(out.parent))
    if done.returncode != 0:
        raise SystemExit(f"error: peak RSS run failed:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", type=Path, default=REPO / "model" / "best")
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--skip-rss", action="store_true")
    args = p.parse_args(argv)

    import importlib.util

    spec = importlib.util.spec_from_file_location("build", REPO / "qgis_plugin" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = write_raster(tmp / "in.tif", args.size)
        zip_path = build.build(args.model, tmp / "dist")
        profile = tmp / "profile"
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(profile / "QGIS" / "QGIS3" / "profiles" / "default" / "python" / "plugins")
        subprocess.run(["qgis_process.bin", "plugins", "enable", "landseg"], env=qgis_env(profile),
                       capture_output=True, check=True)
        commands = {
            "env": ([sys.executable, "-m", "runtime", "segment", str(src), str(tmp / "env.tif"), "--k", str(args.k),
                     "--model", str(args.model), "--overwrite"], dict(os.environ)),
            "qgis_process": (["qgis_process.bin", "run", "landseg:segment", "--", f"INPUT={src}",
                              f"CLUSTERS={args.k}", f"OUTPUT={tmp / 'qgis.tif'}"], qgis_env(profile)),
            "qgis_process_gsl": (["qgis_process.bin", "run", "landseg:segment", "--", f"INPUT={src}",
                                  f"CLUSTERS={args.k}", f"OUTPUT={tmp / 'gsl.tif'}"],
                                 qgis_env(profile, LANDSEG_NO_BLAS_ROUTING="1")),
            "qgis_python": ([QGIS_PYTHON, str(REPO / "tests" / "numpy_only_python.py"), "segment", str(src),
                             str(tmp / "py.tif"), "--k", str(args.k), "--model", str(args.model), "--overwrite"],
                            qgis_env(profile)),
        }
        best = {name: float("inf") for name in commands}
        for _ in range(args.repeats):
            for name, (cmd, env) in commands.items():
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                best[name] = min(best[name], seconds(done))
        mpix = args.size * args.size / 1e6
        result = {"size": args.size, "k": args.k, "repeats": args.repeats,
                  "seconds": best, "mpix_per_s": {n: round(mpix / s, 2) for n, s in best.items()},
                  "ratio_to_env": {n: round(best["env"] / s, 3) for n, s in best.items()}}
        if not args.skip_rss:
            rss = {}
            for size in (2048, 8192):
                rss[size] = peak_rss_mb(write_raster(tmp / f"rss{size}.tif", size), args.model, tmp / f"rss{size}_out.tif")
            result["gdal_backend_peak_rss_mb"] = rss
            result["gdal_backend_rss_ratio_8192_over_2048"] = round(rss[8192] / rss[2048], 3)
    for name in best:
        print(f"{name:>18}: {result['mpix_per_s'][name]:7.2f} Mpix/s ({result['ratio_to_env'][name]:.2f}x env)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
