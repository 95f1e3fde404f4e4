"""The run directory: what a training run leaves behind, and the rules for reusing one.

RUN/spec.yaml      resolved spec (stands alone: presets, `extends` and --set applied)
RUN/config.json    the training options
RUN/metrics.jsonl  one JSON object per logged step ("kind": "step") and per epoch ("kind": "epoch")
RUN/last.pt        checkpoint after the latest epoch (or interruption): what --resume reads
RUN/best.pt        checkpoint with the best validation top-1 so far
RUN/best.safetensors  best.pt's model weights as a model file (spec in its metadata): for eval,
                   export, load_file / load_backbone and shipping; written with best.pt
RUN/curves.png     loss and accuracy curves
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..checkpoint import write_atomic
from .errors import RunDirError

RUN_FILES = ("spec.yaml", "config.json", "metrics.jsonl", "last.pt", "best.pt", "best.safetensors", "curves.png")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step (readers never see a partial file)."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


class RunDir:
    """Paths and files of one run."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    spec = property(lambda self: self.root / "spec.yaml")
    config = property(lambda self: self.root / "config.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    last = property(lambda self: self.root / "last.pt")
    best = property(lambda self: self.root / "best.pt")
    best_model = property(lambda self: self.root / "best.safetensors")
    plot = property(lambda self: self.root / "curves.png")

    def existing_run_files(self) -> list[str]:
        return [name for name in RUN_FILES if (self.root / name).exists()]

    def check_new(self, overwrite: bool) -> None:
        """Refuse to start a new run on top of an old one unless told to (checked before writing)."""
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"--out {self.root} is a file; give a directory")
        for parent in (self.root, *self.root.parents):  # the deepest part that exists must take a new directory
            if parent.exists():
                if not parent.is_dir():
                    raise RunDirError(f"--out {self.root}: {parent} is a file, not a directory")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise RunDirError(f"--out {self.root}: no permission to write in {parent}; choose another --out")
                break
        found = self.existing_run_files()
        if found and not overwrite:
            if self.last.exists():
                hint = f"Continue it with --resume {self.root}, replace it with --overwrite, or choose another --out."
            else:
                hint = "It stopped before its first checkpoint (no last.pt), so there is nothing to resume: replace it with --overwrite, or choose another --out."
            raise RunDirError(f"{self.root} already holds a run ({', '.join(found)}).\n{hint}")

    def create(self, overwrite: bool) -> None:
        """Make the directory; with `overwrite`, remove the previous run's files (and only those).

        Temporaries of killed saves are removed either way: they are ours, and nothing else writes here yet.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if overwrite:
                for name in RUN_FILES:
                    (self.root / name).unlink(missing_ok=True)
            self.remove_stale_temporaries()
        except OSError as exc:
            raise RunDirError(f"cannot create the run directory {self.root}: {exc.strerror or exc}") from None

    def check_resumable(self) -> None:
        """--resume needs a run directory with a last.pt (checked before anything is read or written)."""
        if not self.root.exists():
            raise RunDirError(f"nothing to resume: {self.root} does not exist (--resume takes a run directory)")
        if self.root.is_file():
            hint = f"; use --resume {self.root.parent}" if self.root.suffix in (".pt", ".pth") else ""
            raise RunDirError(f"--resume takes a run directory, not a file ({self.root}){hint}")
        if not self.last.is_file():
            raise RunDirError(f"nothing to resume in {self.root}: no last.pt there (a run writes it after each epoch)")

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporary files of saves that were killed (`.last.pt.<random>.tmp`, see write_atomic).

        Called when a run (re)starts, when no other process writes into the directory.
        """
        removed = []
        for name in RUN_FILES:
            for stale in self.root.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
                removed.append(stale.name)
        return removed

    def discard(self) -> None:
        """Remove a run that never wrote a checkpoint: its files, and the directory if nothing else is in it."""
        self.remove_stale_temporaries()
        for name in RUN_FILES:
            (self.root / name).unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:
            pass  # the user's own files are in it: keep them

    def write_header(self, spec_yaml: str, config: dict[str, Any]) -> None:
        write_text_atomic(self.spec, spec_yaml)
        write_text_atomic(self.config, json.dumps(config, indent=2) + "\n")


class MetricsLog:
    """Append-only JSON lines, one record per logged step or epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Forget records beyond `step` (logged after the checkpoint a resume starts from).

        Without this, steps between the last checkpoint and a crash would appear twice.
        """
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
