"""Exceptions raised by the runtime. All derive from `LandsegError`, so a caller (the CLI, a QGIS
plugin) can catch one type and show its message, which always names the file, key or value at fault
and what was expected."""

from __future__ import annotations


class LandsegError(Exception):
    """Base class of every error the runtime raises on bad input."""


class ArtifactError(LandsegError):
    """A model artifact directory is missing, truncated, of an unknown format or inconsistent."""


class InputError(LandsegError, ValueError):
    """An argument or input array/raster is not what the runtime accepts (k out of range, not RGB...)."""


class RasterReadError(LandsegError):
    """GDAL could not open or read a raster."""


class OutputExistsError(LandsegError, FileExistsError):
    """The destination exists and overwriting was not asked for."""


class Cancelled(LandsegError):
    """The caller's cancel check returned True; nothing was written to the destination."""
