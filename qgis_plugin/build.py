"""Build the QGIS plugin zip: `python qgis_plugin/build.py [--model model/best] [--out dist]`
(what `make plugin` runs) writes dist/landseg-qgis-<version>.zip, installable from QGIS's
"Plugins > Manage and Install Plugins > Install from ZIP".

The zip holds one folder, `landseg/`: the plugin's own modules, the runtime vendored as
`landseg.runtime` (so nothing named `runtime` lands on QGIS's shared sys.path) and the model folder
as `landseg/model/` (the pipeline's model/best by default). Entries are sorted and dated 1980-01-01,
so the same sources give the same bytes.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "qgis_plugin" / "landseg"
STAMP = (1980, 1, 1, 0, 0, 0)


def plugin_files(model: Path) -> dict[str, bytes]:
    """Archive name -> bytes of everything the plugin zip holds."""
    from runtime.artifact import artifact_files

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    files = {f"landseg/{p.name}": p.read_bytes() for p in sorted(PLUGIN.glob("*.py"))}
    files["landseg/metadata.txt"] = (PLUGIN / "metadata.txt").read_text().replace("VERSION", version).encode()
    files.update({f"landseg/runtime/{p.name}": p.read_bytes() for p in sorted((REPO / "runtime").glob("*.py"))})
    files.update({f"landseg/model/{path.name}": path.read_bytes() for path in artifact_files(model)})
    return files


def build(model: Path, out_dir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from runtime.artifact import load_artifact
    from runtime.destination import atomic_file
    from runtime.errors import LandsegError

    try:
        load_artifact(model)  # a truncated or foreign model folder is refused before anything is written
    except LandsegError as e:
        raise SystemExit(f"error: {e} (build the model first: make repro, or dvc pull)") from None
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"landseg-qgis-{version}.zip"
    with atomic_file(dst, overwrite=True, what="plugin zip") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in sorted(plugin_files(model).items()):
                info = zipfile.ZipInfo(name, STAMP)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                z.writestr(info, data)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build dist/landseg-qgis-<version>.zip (the QGIS plugin).")
    p.add_argument("--model", type=Path, default=REPO / "model" / "best", help="model folder to bundle")
    p.add_argument("--out", type=Path, default=REPO / "dist", help="folder of the zip (default: dist)")
    args = p.parse_args(argv)
    print(build(args.model, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
