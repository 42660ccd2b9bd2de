"""Every stage in dvc.yaml lists exactly the project's Python files its module can import (at the top
or inside a function, package `__init__`s included), so that a change to any of them reruns the
stage and a change to anything else does not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import REPO

import runtime

PACKAGES = ("stages", "runtime")
# imports by name at run time: the raster backend a stage gets in the project's environment, which
# has rasterio (`runtime.raster_io.backend`; GDAL's bindings are QGIS's)
DYNAMIC = {"runtime.raster_io": ("runtime.io_rasterio",)}


def _module_file(module: str) -> Path | None:
    path = REPO / Path(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _package_inits(module: str) -> list[Path]:
    parts = module.split(".")
    return [p for p in (_module_file(".".join(parts[:i])) for i in range(1, len(parts))) if p is not None]


def _imports(path: Path) -> set[str]:
    """Project modules named by the import statements of one file."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]  # of runtime/x.py: runtime; of runtime/__init__.py: runtime too
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            for alias in node.names:
                names.add(f"{prefix}.{alias.name}")  # `from pkg import module`
                if prefix == "runtime" and alias.name in runtime.EXPORTS:  # loaded on first use
                    names.add(f"runtime.{runtime.EXPORTS[alias.name]}")
    names.update(DYNAMIC.get(module, ()))
    return {n for n in names if n.split(".")[0] in PACKAGES and _module_file(n) is not None}


def import_closure(start: Path) -> set[str]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path):
            todo.append(_module_file(module))
            todo.extend(_package_inits(module))
    return {str(p.relative_to(REPO)).replace("\\", "/") for p in seen}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_exactly_its_imports(name):
    stage = STAGES[name]
    module = stage["cmd"].split()[2]  # python -m stages.<name>
    imported = import_closure(_module_file(module))
    listed = {d for d in stage["deps"] if d.endswith(".py")}
    assert listed == imported, (f"{name}: missing from dvc.yaml {sorted(imported - listed)}, "
                                f"listed but never imported {sorted(listed - imported)}")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_lock_records_the_code_in_the_tree(name):
    """dvc.lock holds the hash of every code dependency as it is in the tree, so the committed
    models and metrics are what this code computes (and `dvc status` lists no stage as changed by
    code). A code change is committed with the `dvc repro` that records it."""
    import hashlib

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert name in lock, f"dvc.lock has no stage {name!r}: run `dvc repro`"
    stale = [d["path"] for d in lock[name]["deps"] if d["path"].endswith(".py")
             and hashlib.md5((REPO / d["path"]).read_bytes()).hexdigest() != d["md5"]]
    assert not stale, f"{name}: dvc.lock records other versions of {stale}: run `dvc repro`"
