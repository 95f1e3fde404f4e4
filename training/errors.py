"""Errors of `overlock train` / `overlock eval` that the CLI shows as one-screen messages.

All derive from `overlock.errors.OverlockError`, so `cli.main` prints them without a traceback
and exits with status 2. Each message says what is wrong and what would be valid.
"""

from __future__ import annotations

from ..errors import OverlockError


class DataError(OverlockError, ValueError):
    """The data source is missing, malformed or does not fit the spec or the batch size."""


class RunDirError(OverlockError):
    """The output directory cannot be used: it already holds a run, or a resume source is missing."""


class ConfigError(OverlockError, ValueError):
    """Training options that are out of range or contradict each other."""


class DivergenceError(OverlockError):
    """Training produced a non-finite loss or weights; the last good checkpoint was kept."""
