"""Where landseg writes: the one rule every writer follows (runtime outputs, centres files, model
artifacts, stage outputs, evaluation overlays, the QGIS plugin's outputs).

- A file destination is a path in an existing directory that is a regular file or nothing: never
  a directory, a device, a FIFO or a socket, and never one of the command's inputs (compared by
  file identity, so another name or a symlink for an input is caught too). An existing file is
  replaced only when the caller asked to overwrite it. `check_file`.
- A folder destination (a stage's output folder) is a directory or nothing. `check_folder`.
- A name that comes from data (an item id in a manifest or a shard index, a file stem) is one plain
  path component before it is joined to a folder: not empty, not '.' or '..', no '/', '\\', NUL
  or control characters; the joined path is checked to lie in that folder. `child`. A relative path
  read from a data file resolves inside the folder it belongs to. `inside`.
- Everything is written under a temporary sibling `.<name>.<kind>-<pid>` and renamed onto the
  destination when complete (`atomic_file`, `atomic_folder`): an error or an interruption leaves
  the destination as it was. Removing temporaries never raises, so that a read-only file system
  reports its first error, not a second one from the clean-up.
- A writer first removes the temporaries of its destination that processes no longer running left
  behind (a kill -9, a power cut): `remove_stale` recognises them by that exact name pattern and
  the liveness of the process id in it, and removes nothing else.

Standard library only: the runtime's import stays numpy-only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from .command import check_signals
from .errors import OutputError, OutputExistsError, UnsafePathError

# kinds of temporaries: a file or folder being written, a resampled working grid, the previous
# folder moved aside while the new one is renamed into place
KINDS = ("partial", "working", "old")
# files GDAL may write beside a raster it creates
SIDECARS = (".aux.xml", ".ovr", ".msk")
NAME_MAX = 200  # characters of a data-derived name: room for suffixes and temporaries within 255 bytes
_STALE = re.compile(r"\.(?P<name>.+)\.(?P<kind>" + "|".join(KINDS) + r")-(?P<pid>\d+)"
                    r"(?P<sidecar>" + "|".join(re.escape(s) for s in SIDECARS) + r")?")


def check_name(name: object, what: str) -> str:
    """`name` when it is one plain path component; else UnsafePathError naming `what`."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what}: expected a non-empty name, got {name!r}")
    bad = [c for c in name if c in "/\\" or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad or name in (".", ".."):
        raise UnsafePathError(f"{what}: {name!r} is not a plain file name (no '/', '\\', control "
                              "characters, '.' or '..'); rejected, not used as a path")
    if len(name) > NAME_MAX:
        raise UnsafePathError(f"{what}: {name[:40]!r}... is {len(name)} characters long; at most "
                              f"{NAME_MAX} are allowed in a file name")
    return name


def child(folder: Path, name: object, what: str, suffix: str = "") -> Path:
    """`folder / (name + suffix)` for a data-derived `name` (`check_name`): a path in `folder` itself."""
    return Path(folder) / (check_name(name, what) + suffix)


def inside(root: Path, rel: object, where: str, base: Path | None = None, root_name: str = "folder") -> Path:
    """The resolved path of `rel`, a relative path read from a data file, joined to `base` (default
    `root`); UnsafePathError when it is absolute or leads outside `root` ('..' steps or a symlink)."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"{where}: expected a relative path string, got {rel!r}")
    if os.path.isabs(rel) or "\0" in rel or (os.name == "nt" and os.path.splitdrive(rel)[0]):
        raise UnsafePathError(f"{where}: path {rel!r} is absolute; paths in data files are relative to "
                              "their folder (rejected, not followed)")
    root = Path(root).resolve()
    path = ((Path(base).resolve() if base is not None else root) / rel).resolve()
    if not path.is_relative_to(root):
        raise UnsafePathError(f"{where}: path {rel!r} points outside the {root_name} {root} (rejected, not followed)")
    return path


def _same_file(a: Path, b: os.PathLike | str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # b missing, or not a local path (a /vsicurl/ URL)
        return False


def check_file(dst: os.PathLike | str, *, overwrite: bool, inputs: Iterable = (), what: str = "output") -> Path:
    """`dst` as a Path when it may be written (module docstring); else OutputError /
    OutputExistsError naming it. `inputs`: paths the command reads, which `dst` must not be."""
    dst = Path(dst)
    if dst.name in ("", ".", ".."):
        raise OutputError(f"{dst}: {what} must be a file path, not a folder")
    if os.path.lexists(dst):
        try:
            mode = os.stat(dst).st_mode
        except OSError:
            mode = None  # a dangling symlink: renaming onto it replaces the link itself
        if mode is not None and stat.S_ISDIR(mode):
            raise OutputError(f"{dst}: is a directory; {what} must be a file path")
        if mode is not None and not stat.S_ISREG(mode):
            raise OutputError(f"{dst}: is not a regular file (a device, FIFO or socket); landseg writes "
                              f"its {what} only to regular files")
        for src in inputs:
            if src is not None and _same_file(dst, src):
                raise OutputError(f"{dst}: is the input {src}; write the {what} to another path")
        if not overwrite:
            raise OutputExistsError(f"{dst}: {what} exists (pass overwrite=True / --overwrite to replace it)")
    if not dst.parent.is_dir():
        raise OutputError(f"{dst.parent}: folder of the {what} does not exist")
    return dst


def check_folder(dst: os.PathLike | str, what: str = "output folder") -> Path:
    """`dst` as a Path when it is a directory or nothing; else OutputError."""
    dst = Path(dst)
    if os.path.lexists(dst) and not dst.is_dir():
        raise OutputError(f"{dst}: exists and is not a directory; the {what} must be a folder")
    return dst


def temporary(dst: Path, kind: str = "partial") -> Path:
    """The temporary sibling of `dst` of one of KINDS for this process (same file system as `dst`,
    so the final rename is atomic)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dst = Path(dst)
    return dst.with_name(f".{dst.name}.{kind}-{os.getpid()}")


def discard(*paths: Path) -> None:
    """Remove temporaries (files with their GDAL sidecars, or folders); never raises."""
    for path in paths:
        path = Path(path)
        for p in (path, *(path.with_name(path.name + s) for s in SIDECARS)):
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only file system: the error that matters was raised already


def process_alive(pid: int) -> bool:
    """True when a process with this id runs (or may: one we may not signal counts as running)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has exited but was not yet reaped by its parent (on Linux: state Z in
    /proc/<pid>/stat). A killed worker whose parent was killed with it stays one until init reaps
    it, and signalling it still succeeds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def remove_stale(dst: Path) -> list[Path]:
    """Remove the temporaries of `dst` left by processes that no longer run; returns them."""
    dst = Path(dst)
    removed = []
    try:
        names = os.listdir(dst.parent)
    except OSError:
        return removed
    for name in names:
        m = _STALE.fullmatch(name)
        if m is None or m["name"] != dst.name or process_alive(int(m["pid"])):
            continue
        path = dst.parent / name
        discard(path)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _rename(src: Path, dst: Path, what: str) -> None:
    check_signals()  # a stop asked for on the way is honoured here, before the output is in place
    try:
        os.replace(src, dst)
    except OSError as e:
        raise OutputError(f"{dst}: cannot write the {what}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_file(dst: os.PathLike | str, *, overwrite: bool, inputs: Iterable = (), what: str = "output",
                kind: str = "partial") -> Iterator[Path]:
    """Yield the temporary path to write `dst` at (created empty, so an unwritable folder fails here,
    before any work); renamed onto `dst` when the block completes, removed when it raises."""
    dst = check_file(dst, overwrite=overwrite, inputs=inputs, what=what)
    remove_stale(dst)
    tmp = temporary(dst, kind)
    discard(tmp)
    try:
        with open(tmp, "xb"):
            pass
    except OSError as e:
        raise OutputError(f"{dst}: cannot write the {what} in {dst.parent}: {e.strerror or e}") from None
    try:
        yield tmp
        _rename(tmp, dst, what)
    finally:
        discard(tmp)


@contextlib.contextmanager
def atomic_folder(dst: os.PathLike | str, *, what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary folder beside `dst` to write into; when the block completes it
    replaces `dst` (the previous folder is removed only after the new one is in place); when it
    raises, `dst` stays as it was. The parent folder is created if needed."""
    dst = check_folder(dst, what)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{dst.parent}: cannot create the folder of the {what}: {e.strerror or e}") from None
    remove_stale(dst)
    tmp, old = temporary(dst, "partial"), temporary(dst, "old")
    discard(tmp, old)
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{dst}: cannot write the {what} in {dst.parent}: {e.strerror or e}") from None
    try:
        yield tmp
        if os.path.lexists(dst):
            _rename(dst, old, what)
        try:
            _rename(tmp, dst, what)
        except BaseException:
            if os.path.lexists(old) and not os.path.lexists(dst):
                os.replace(old, dst)
            raise
    finally:
        discard(tmp, old)
