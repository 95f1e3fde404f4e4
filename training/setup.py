"""Everything decided and checked before a run writes its first byte.

`plan_training` loads the spec and the data, reconciles them (channels, number of classes) and
works out the step counts; every problem surfaces here as an `OverlockError`, before the run
directory exists, so a bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import archspec
from ..archspec import Spec
from ..builder.estimate import check_fits
from .checkpoint import check_run_checkpoint, is_run_checkpoint
from .config import RUNTIME_FIELDS, TrainConfig, validated
from .data import DataSplits, default_workers, load_data
from .distributed import Dist
from .errors import ConfigError, DataError, RunDirError


@dataclass
class Plan:
    """A validated training run: spec fitted to the data, and how many steps it takes."""

    config: TrainConfig
    spec: Spec
    data: DataSplits
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int
    workers: int


def fit_spec_to_data(spec: Spec, data: DataSplits, origin: str) -> Spec:
    """The spec with the data's class count filled in; errors when the two cannot agree."""
    if spec.in_channels != data.channels:
        raise DataError(
            f"the spec {origin} expects in_channels={spec.in_channels} but the data gives {data.channels}-channel images; "
            f"pass --channels {spec.in_channels} or set in_channels: {data.channels} in the spec (or --set in_channels={data.channels})"
        )
    if spec.head.num_classes is None:
        return archspec.load(spec, [f"head.num_classes={data.num_classes}"])
    if spec.head.num_classes != data.num_classes:
        raise DataError(
            f"the spec {origin} fixes head.num_classes={spec.head.num_classes} but the data {data.name!r} has "
            f"{data.num_classes} classes; pass --set head.num_classes={data.num_classes} or leave num_classes open (null) in the spec"
        )
    return spec


def load_spec(config: TrainConfig) -> Spec:
    """The spec from --spec, --set and --drop-path (which wins over the spec's drop_path_rate)."""
    overrides = list(config.overrides)
    if config.drop_path is not None:
        overrides.append(f"drop_path_rate={config.drop_path}")
    return archspec.load(config.spec, overrides)


def plan_training(config: TrainConfig, dist: Dist, spec: Spec | None = None, data: DataSplits | None = None) -> Plan:
    """Load and check spec and data, and derive the step counts (`spec` given when resuming; `data`
    when the caller already loaded `config.data` and checks many specs against it, as `compare` does)."""
    if config.sync_bn and dist.device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA (torch's SyncBatchNorm does not run on CPU); drop it for CPU training")
    data = data if data is not None else load_data(config.data, config.img_size, config.channels)
    spec = fit_spec_to_data(spec if spec is not None else load_spec(config), data, config.spec)
    per_rank = len(data.train) // dist.world_size
    if config.batch_size > per_rank:
        where = f" per process ({dist.world_size} processes share {len(data.train)})" if dist.distributed else ""
        raise DataError(
            f"--batch-size {config.batch_size} is larger than the training set: {per_rank} images{where}; "
            f"use a batch size of at most {per_rank}"
        )
    if len(data.val) < dist.world_size:
        raise DataError(f"the validation split has {len(data.val)} images, fewer than the {dist.world_size} processes")
    check_fits(
        spec,
        f"training {spec.name or config.spec} at batch size {config.batch_size}"
        + (" with gradient checkpointing" if config.grad_checkpoint else ""),
        image_size=(data.img_size, data.img_size),
        batch=config.batch_size,
        training=True,
        grad_checkpoint=config.grad_checkpoint,
        device=dist.device,
    )
    steps_per_epoch = per_rank // config.batch_size
    if config.steps is not None:
        total_steps = config.steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = config.resolved_epochs or 1
        total_steps = epochs * steps_per_epoch
    # Warm-up is asked for in epochs; a run shorter than that (--steps below an epoch) would end at
    # the peak learning rate without ever decaying. At most half the run warms up.
    warmup_steps = min(total_steps // 2, round(config.warmup * steps_per_epoch))
    workers = config.workers if config.workers is not None else default_workers(data)
    return Plan(config, spec, data, steps_per_epoch, total_steps, epochs, warmup_steps, workers)


def resume_config(state: Any, given: dict[str, Any], source: str) -> tuple[TrainConfig, Spec]:
    """The stored options and spec of a run, with only runtime options (`RUNTIME_FIELDS`) changeable.

    Changing anything else (lr, batch size, data, ...) would make the resumed run a different
    experiment than the one its metrics and checkpoints describe.
    """
    if not is_run_checkpoint(state):
        raise RunDirError(f"{source} is not a checkpoint written by `overlock train`; it cannot be resumed")
    check_run_checkpoint(state, source)
    stored = dict(state["config"])
    changed = sorted(
        key
        for key, value in given.items()
        if key not in RUNTIME_FIELDS and key in stored and stored[key] != _plain(value)
    )
    if changed:
        flags = ", ".join("--" + key.replace("_", "-") for key in changed)
        raise ConfigError(
            f"cannot change {flags} when resuming {source}: the run was started with other values. "
            f"Only {', '.join('--' + f.replace('_', '-') for f in sorted(RUNTIME_FIELDS))} may change; "
            "start a new run (--out) to train differently"
        )
    stored["stop_after"] = None  # a stop request belongs to the invocation that made it
    stored.update({key: value for key, value in given.items() if key in RUNTIME_FIELDS})
    config = validated(TrainConfig, stored)
    return config, archspec.loads(state["spec"], f"the spec recorded in {source}")


def _plain(value: Any) -> Any:
    """A CLI value as it appears in the stored JSON config (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value
