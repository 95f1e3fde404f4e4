"""Run checkpoints: what they hold, how to find the weights in one, and the random state of a run.

A run checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)` (no pickled code runs when a file from elsewhere is opened).
Writing and reading go through `overlock.checkpoint.save_atomic` / `load_file` (temporary file in
the same directory, then `os.replace`: a save killed half-way leaves the previous file intact).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import MODEL_FORMAT, load_file, save_atomic
from ..errors import CheckpointError
from .config import RUNTIME_FIELDS

__all__ = [
    "best_problem",
    "capture_rng",
    "check_run_checkpoint",
    "is_run_checkpoint",
    "load_file",
    "model_file_of",
    "model_state",
    "restore_rng",
    "save_atomic",
]

#: Marks our run checkpoints (as opposed to a bare state dict); bump when the layout changes.
FORMAT = "overlock-run"
FORMAT_VERSION = 1


#: What a run checkpoint holds (`Trainer.state_dict`); a file missing any of them cannot be used.
RUN_KEYS = (
    "config",
    "spec",
    "classes",
    "img_size",
    "channels",
    "world_size",
    "model",
    "optimizer",
    "scaler",
    "ema",
    "progress",
    "rng",
)


def is_run_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and state.get("format") == FORMAT


def check_run_checkpoint(state: dict[str, Any], source: str) -> None:
    """A clear error for a run checkpoint of another format version or with parts missing."""
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} is a run checkpoint of format version {state.get('version')!r}; this overlock reads version {FORMAT_VERSION}"
        )
    missing = [key for key in RUN_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{source} is an incomplete run checkpoint (no {', '.join(missing)}); it cannot be used")
    types = {"config": dict, "spec": str, "classes": list, "img_size": int, "channels": int, "world_size": int}
    wrong = [
        f"{key} is a {type(state[key]).__name__}" for key, kind in types.items() if not isinstance(state[key], kind)
    ]
    if wrong or not isinstance(state["config"].get("data"), str):
        wrong = wrong or ["config.data is not text"]
        raise CheckpointError(f"{source} is a damaged run checkpoint ({'; '.join(wrong)}); it cannot be used")


def model_state(state: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights in a run checkpoint or a plain state dict (also {'state_dict': ...} wrappers)."""
    if is_run_checkpoint(state):
        if use_ema:
            if state.get("ema") is None:
                raise CheckpointError(
                    "--ema: this run was trained without --ema, so its checkpoint holds no EMA weights"
                )
            return state["ema"]["module"]
        return state["model"]
    if use_ema:
        raise CheckpointError(
            "--ema needs a checkpoint written by `overlock train --ema`; this file is a plain state dict"
        )
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        if state and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    raise CheckpointError("the file holds neither an overlock run checkpoint nor a state dict (name -> tensor)")


def model_file_of(state: dict[str, Any]) -> dict[str, Any]:
    """A run checkpoint's model weights and spec as a model file (what `overlock build --save` writes).

    `overlock train` writes this next to best.pt as best.safetensors: the file to evaluate, export or
    ship, without optimizer state and without pickle.
    """
    return {"format": MODEL_FORMAT, "version": 1, "spec": state["spec"], "deploy": False, "state_dict": state["model"]}


# ---------------------------------------------------------------------------------------------
# best.pt against the record in last.pt


def describe_best(epoch: int, top1: float) -> str:
    return f"epoch {epoch} (val top-1 {100 * top1:.2f}%)"


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two checkpoints of one run: same spec, classes and options (runtime options such as --workers may differ)."""

    def fixed(state: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state["config"].items() if k not in RUNTIME_FIELDS}

    return a["spec"] == b["spec"] and a["classes"] == b["classes"] and fixed(a) == fixed(b)


def best_problem(last: dict[str, Any], best_path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """What is wrong with best.pt given what last.pt records as the run's best (None: nothing).

    Returns the problem (a phrase: "holds epoch 2 ...", "is missing", ...) and best.pt's contents when
    they are a readable checkpoint of this run. best.pt *ahead* of last.pt is not a problem: a kill
    between the two saves of an epoch (best.pt is written first) leaves it, and the resumed run redoes
    that epoch and writes it again.
    """
    progress = last["progress"]
    epoch, top1 = progress["best_epoch"], progress["best_top1"]
    if not best_path.exists():
        return (None, None) if epoch == 0 else ("is missing", None)
    try:
        best = load_file(best_path)
        if not is_run_checkpoint(best):
            return "is not a run checkpoint", None
        check_run_checkpoint(best, str(best_path))
        if not _same_run(best, last):
            return "belongs to another run (its spec or options differ from last.pt's)", None
        held = best["progress"]
        held_epoch, held_top1, held_step = held["epoch"], held["best_top1"], held["step"]
        if not (isinstance(held_epoch, int) and isinstance(held_step, int) and isinstance(held_top1, float)):
            raise TypeError("its progress is not a pair of counts and a top-1")
    except (CheckpointError, KeyError, TypeError) as exc:
        return f"cannot be read ({str(exc).splitlines()[0][:200]})", None
    if held_step > progress["step"]:
        return None, best  # written just before a kill; the resumed run rewrites it
    if held_epoch == epoch and held["best_epoch"] == epoch and held_top1 == top1:
        return None, best
    return f"holds {describe_best(held_epoch, held_top1)}", best


# ---------------------------------------------------------------------------------------------
# Random state: everything that draws random numbers in the training process


def capture_rng() -> dict[str, Any]:
    """The state of torch (CPU and CUDA), numpy and Python's `random`, as weights_only-safe values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
