"""overlock's own model files: written atomically, read with `torch.load(weights_only=True)`.

A model file is a plain dict of tensors and strings, {"format": "overlock-model", "version": 1,
"spec": <resolved spec YAML>, "deploy": bool, "state_dict": {...}}, so it can always be loaded
with `weights_only=True` and rebuilt without the YAML it came from.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .archspec import preset_dir
from .errors import CheckpointError, OverlockError

MODEL_FORMAT = "overlock-model"


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through a temporary file in the same folder, then an atomic rename.

    Everything overlock writes that a user owns (checkpoints, model files, a run's text files)
    goes through here: a crash or a full disk while writing leaves the previous file untouched,
    and readers never see a partial file. A path that cannot be written (a directory, a parent
    that is a file, no permission) is an `OverlockError` naming it, not a traceback.

    A symlink is written through: its target gets the new content (atomically) and the link stays.
    What is not a regular file cannot be replaced by a rename without destroying it: `-` means
    standard output; character devices and FIFOs (`/dev/stdout`, `/dev/null`, a pipe) are written
    directly, as a shell redirection would; anything else (a socket, a block device) is refused.
    """
    if str(path) == "-":
        write(_Unclosable(sys.stdout.buffer))
        sys.stdout.flush()
        return Path("-")
    path = Path(path)
    try:
        target = Path(os.path.realpath(path)) if path.is_symlink() else path
        if target.is_symlink():  # realpath stops at a loop
            raise OverlockError(f"cannot write {path}: its symlinks form a loop")
        existing = target.stat() if target.exists() else None
    except OSError as exc:  # a symlink loop, a name too long
        raise OverlockError(f"cannot write {path}: {_os_reason(path, exc)}") from None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        return _write_special(path, target, existing.st_mode, write)
    if existing is not None and target.resolve().parent == preset_dir().resolve():
        raise OverlockError(
            f"cannot write {path}: it is a shipped preset file of overlock; give a file name outside {target.parent}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A short prefix: the temporary name must fit NAME_MAX wherever the target's name does.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:40]}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OverlockError(f"cannot write {path}: {_os_reason(target, exc)}") from None
    try:
        if existing is not None:
            mode = stat.S_IMODE(existing.st_mode)  # replacing a file keeps its permissions
        else:  # mkstemp creates 0600; a new file gets what a plain open() would give (umask applies)
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OverlockError(
                f"cannot write {path}: {_os_reason(target, exc)} (a previous {path.name}, if any, is unchanged)"
            ) from None
        raise
    return path


def _write_special(path: Path, target: Path, mode: int, write: Callable[[BinaryIO], None]) -> Path:
    if stat.S_ISDIR(mode):
        raise OverlockError(f"cannot write {path}: it is a directory; give a file path")
    if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        kind = "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file"
        raise OverlockError(f"cannot write {path}: it is {kind}; give a regular file path")
    try:
        with open(target, "wb") as handle:
            write(handle)
    except OSError as exc:
        raise OverlockError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


class _Unclosable:
    """Standard output handed to a writer, which must not close it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()


def _os_reason(path: Path, exc: OSError) -> str:
    """Why `path` cannot be written, in words (a parent that is a file says more than errno 17)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            break
    return exc.strerror or str(exc)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save through `write_atomic`; a dict gets a checksum of its contents (see `checksum`)."""
    if isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != CHECKSUM_KEY}, CHECKSUM_KEY: checksum(obj)}
    return write_atomic(path, lambda handle: torch.save(obj, handle))


CHECKSUM_KEY = "sha256"


def checksum(obj: Any) -> str:
    """SHA-256 of a checkpoint's contents: every key, value and tensor byte, in order.

    torch's zip reader does not check its CRCs, so a block of a checkpoint zeroed or flipped on disk
    would load silently as different weights; `load_file` recomputes this and refuses a mismatch.
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                if value is obj and key == CHECKSUM_KEY:
                    continue
                feed(key)
                feed(item)
            digest.update(b"}")
        elif isinstance(value, list | tuple):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(obj)
    return digest.hexdigest()


def load_file(path: str | Path) -> Any:
    """torch.load with weights_only=True, turning unreadable files into a clear error."""
    if str(path).strip() == "":
        raise CheckpointError("no checkpoint given: the path is empty")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with path.open("rb") as handle:
            magic = handle.read(9)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if _looks_like_safetensors(magic):
        return load_safetensors(path)
    # torch.save writes a zip archive (legacy files: a pickle, protocol 2+ starts with 0x80).
    if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"\x80")):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (a file written by torch.save, e.g. .pt or .pth) "
            "nor a safetensors file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(f"cannot read {path}: the file is corrupt ({_first_line(exc)})") from None
        found = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\n|$)", str(exc))
        detail = f" ({found.group(1).rstrip('.')})" if found else ""
        raise CheckpointError(
            f"{path} holds Python objects that overlock does not load{detail}: checkpoints are read with "
            "torch.load(weights_only=True), which constructs only tensors, numbers, strings, lists and dicts, so "
            "no code from a file ever runs. Re-save it as a plain state dict (name -> tensor), or check that "
            "the file is complete."
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file, not our bug
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({_first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get(CHECKSUM_KEY), str):
        if checksum(state) != state[CHECKSUM_KEY]:
            raise CheckpointError(
                f"{path} is corrupt: its contents do not match the checksum written with them (damaged on disk "
                "or in a copy); use another copy, or best.pt/last.pt of the run"
            )
        state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    return state


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception message (torch's run on for several lines)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def model_file(model: torch.nn.Module, deploy: bool) -> dict[str, Any]:
    """The dict written by `overlock build --save` and `overlock convert`."""
    return {
        "format": MODEL_FORMAT,
        "version": 1,
        "spec": model.spec.to_yaml(),
        "deploy": deploy,
        "state_dict": model.state_dict(),
    }


# ---------------------------------------------------------------------------------------------
# safetensors: the same model files, without pickle
#
# A safetensors file holds only tensors plus a str -> str metadata table. A model file keeps its
# tensors (the state dict) as they are and its other entries (format, version, spec YAML, deploy)
# in the metadata, so `load_file` returns the same dict for both formats. A plain state dict
# (no "format" in the metadata) loads as a plain state dict.

SAFETENSORS_SUFFIX = ".safetensors"


def is_safetensors_path(path: str | Path) -> bool:
    """Files named *.safetensors are written in that format; everything else with torch.save."""
    return Path(path).suffix.lower() == SAFETENSORS_SUFFIX


def _looks_like_safetensors(head: bytes) -> bool:
    """8 bytes of little-endian header length, then the JSON header's opening brace."""
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _safetensors_module():
    try:
        import safetensors.torch
    except ImportError:
        raise OverlockError(
            "safetensors files need the safetensors package: pip install safetensors (or 'overlock[train]')"
        ) from None
    return safetensors.torch


def save_model_file(model: torch.nn.Module, deploy: bool, path: str | Path) -> Path:
    """Write `model_file(model, deploy)` to `path`: safetensors for *.safetensors, else torch.save."""
    return write_model_file(model_file(model, deploy), path)


def write_model_file(content: dict[str, Any], path: str | Path) -> Path:
    """A model-file dict (see `model_file`) to `path`, atomically: safetensors for *.safetensors
    (the state dict as tensors, the other entries as metadata), else torch.save."""
    if not is_safetensors_path(path):
        return save_atomic(content, path)
    metadata = {key: str(value) for key, value in content.items() if key != "state_dict"}
    return save_safetensors(content["state_dict"], path, metadata)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """A state dict (plus str metadata) as a safetensors file, through `write_atomic`."""
    module = _safetensors_module()
    # safetensors refuses views and tensors that share storage: store compact copies.
    plain = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    data = module.save(plain, metadata=metadata)
    return write_atomic(path, lambda handle: handle.write(data))


def load_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors file as `load_file` returns it: a model-file dict or a plain state dict."""
    module = _safetensors_module()
    try:
        data = Path(path).read_bytes()
        tensors = module.load(data)
        from safetensors import safe_open  # the metadata is only reachable through safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file is the user's, not our bug
        raise CheckpointError(
            f"cannot read {path}: the safetensors file is truncated or corrupt ({_first_line(exc)})"
        ) from None
    if metadata.get("format") != MODEL_FORMAT:
        return tensors
    return {
        "format": MODEL_FORMAT,
        "version": int(metadata.get("version", 1)),
        "spec": metadata.get("spec", ""),
        "deploy": metadata.get("deploy") == "True",
        "state_dict": tensors,
    }
