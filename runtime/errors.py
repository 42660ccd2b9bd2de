"""Exceptions raised by the runtime. Errors of input derive from `LandsegError`, so a caller (the CLI,
a QGIS plugin) can catch one type and show its message, which always names the file, key or value at
fault and what was expected; `Cancelled` (the caller asked to stop) stands apart."""

from __future__ import annotations


class LandsegError(Exception):
    """Base class of every error the runtime raises on bad input."""


class ArtifactError(LandsegError):
    """A model artifact directory is missing, truncated, of an unknown format or inconsistent."""


class InputError(LandsegError, ValueError):
    """An argument or input array/raster is not what the runtime accepts (k out of range, not RGB...)."""


class RasterReadError(LandsegError):
    """GDAL could not open or read a raster."""


class UnsafePathError(InputError):
    """A name or path read from data (an item id, a manifest or index path) is not a plain file name
    or leads outside its folder; it is rejected, never used as a path."""


class OutputError(LandsegError):
    """The destination cannot be written: a directory, a device, one of the inputs, a missing folder,
    a read-only file system (`runtime.destination`)."""


class OutputExistsError(OutputError, FileExistsError):
    """The destination exists and overwriting was not asked for."""


class MissingDependencyError(LandsegError, ImportError):
    """An optional package a feature needs is not installed; the message names it and the command
    that installs it."""


class Cancelled(Exception):
    """The caller's cancel check returned True; nothing was written to the destination. Not a
    `LandsegError`: a cancel is the user's choice, not bad input, so a caller that reports input
    errors as failures (a QGIS task, a batch script) can tell the two apart."""


def error_text(e: BaseException) -> str:
    """The message of `e` with those of the errors it was raised from, so that GDAL's own words
    reach the user: rasterio raises "Read failed. See previous exception for details." from the
    GDAL error that says what failed (e.g. "IReadBlock failed at X offset 1, Y offset 0:
    TIFFReadEncodedTile() failed")."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip()
        if text and "See previous exception" not in text and text not in parts:
            parts.append(text)
        e = e.__cause__ or e.__context__
    return "; ".join(reversed(parts)) or "unknown error"
