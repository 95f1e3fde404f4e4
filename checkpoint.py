"""overlock's own model files: written atomically, read with `torch.load(weights_only=True)`.

A model file is a plain dict of tensors and strings, {"format": "overlock-model", "version": 1,
"spec": <resolved spec YAML>, "deploy": bool, "state_dict": {...}}, so it can always be loaded
with `weights_only=True` and rebuilt without the YAML it came from.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError

MODEL_FORMAT = "overlock-model"


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through a temporary file in the same folder, then an atomic rename.

    Everything overlock writes that a user owns (checkpoints, model files, a run's text files)
    goes through here: a crash or a full disk while writing leaves the previous file untouched,
    and readers never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save through `write_atomic`."""
    return write_atomic(path, lambda handle: torch.save(obj, handle))


def load_file(path: str | Path) -> Any:
    """torch.load with weights_only=True, turning unreadable files into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file, not our bug
        raise CheckpointError(
            f"cannot read {path} as a weights-only torch checkpoint: {str(exc).splitlines()[0]}"
        ) from None


def model_file(model: torch.nn.Module, deploy: bool) -> dict[str, Any]:
    """The dict written by `overlock build --save` and `overlock convert`."""
    return {
        "format": MODEL_FORMAT,
        "version": 1,
        "spec": model.spec.to_yaml(),
        "deploy": deploy,
        "state_dict": model.state_dict(),
    }
