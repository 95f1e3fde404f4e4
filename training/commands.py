"""`overlock train` and `overlock eval`: thin typer commands over `training.runner`.

Every option defaults to None ("not given") and takes its help text from the pydantic field in
`config.py`, where the real default lives; `runner` fills in defaults, which is also how
`--resume` can tell an option the user typed from one they left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import exit_on_user_error
from .config import EvalConfig, TrainConfig, option_help
from .errors import ConfigError
from .progress import HelpCommand, make_console


def _train_opt(field: str, *flags: str, **extra: Any) -> Any:
    return typer.Option(None, *flags, help=option_help(TrainConfig, field), show_default=False, **extra)


def _eval_opt(field: str, *flags: str, **extra: Any) -> Any:
    return typer.Option(None, *flags, help=option_help(EvalConfig, field), show_default=False, **extra)


TRAIN_HELP = (
    "Train SPEC (a preset name or a spec YAML file) on a data source.\n\n"
    "Writes a run directory: resolved spec, metrics.jsonl, last.pt and best.pt (run checkpoints: what --resume "
    "reads), best.safetensors (best.pt's weights as a model file with the spec in its metadata: what eval, export "
    "and load_file take and what you ship), curves.png. Without options it "
    "trains on scikit-learn's bundled digits for a few minutes on CPU. Under "
    "`torchrun --nproc-per-node N -m overlock.cli train ...` it trains with DistributedDataParallel."
)

EVAL_HELP = "Evaluate weights (a run's last.pt/best.pt/best.safetensors, a model file or a plain state dict, .pt or .safetensors) on a source's validation split: top-1, top-5, loss."


def train_command(
    spec: str | None = typer.Argument(
        None, help="Preset name (pico, xt, t, s, b) or spec YAML file; optional with --resume.", show_default=False
    ),
    data: str | None = _train_opt("data", "--data"),
    epochs: int | None = _train_opt("epochs", "--epochs"),
    steps: int | None = _train_opt("steps", "--steps"),
    batch_size: int | None = _train_opt("batch_size", "--batch-size", "-b"),
    img_size: int | None = _train_opt("img_size", "--img-size"),
    channels: int | None = _train_opt("channels", "--channels"),
    lr: float | None = _train_opt("lr", "--lr"),
    min_lr: float | None = _train_opt("min_lr", "--min-lr"),
    weight_decay: float | None = _train_opt("weight_decay", "--weight-decay"),
    warmup: float | None = _train_opt("warmup", "--warmup"),
    aux_weight: float | None = _train_opt("aux_weight", "--aux-weight"),
    drop_path: float | None = _train_opt("drop_path", "--drop-path"),
    label_smoothing: float | None = _train_opt("label_smoothing", "--label-smoothing"),
    clip_grad: float | None = _train_opt("clip_grad", "--clip-grad"),
    ema: float | None = _train_opt("ema", "--ema"),
    amp: bool | None = _train_opt("amp", "--amp/--no-amp"),
    compile: bool | None = _train_opt("compile", "--compile/--no-compile"),
    grad_checkpoint: bool | None = _train_opt("grad_checkpoint", "--grad-checkpoint/--no-grad-checkpoint"),
    sync_bn: bool | None = _train_opt("sync_bn", "--sync-bn/--no-sync-bn"),
    seed: int | None = _train_opt("seed", "--seed"),
    deterministic: bool | None = _train_opt("deterministic", "--deterministic/--no-deterministic"),
    workers: int | None = _train_opt("workers", "--workers"),
    device: str | None = _train_opt("device", "--device"),
    contmix_backend: str | None = _train_opt("contmix_backend", "--contmix-backend"),
    eval_every: int | None = _train_opt("eval_every", "--eval-every"),
    log_every: int | None = _train_opt("log_every", "--log-every"),
    stop_after: int | None = _train_opt("stop_after", "--stop-after"),
    overrides: list[str] | None = _train_opt("overrides", "--set", metavar="KEY=VALUE"),
    # str, not Path: typer turns an empty string into Path("."), and --out "" must not mean "here".
    out: str | None = typer.Option(
        None, "--out", "-o", help="Run directory (default: runs/<spec name>-<date-time>).", show_default=False
    ),
    resume: str | None = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last.pt.", show_default=False
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out instead of refusing."),
) -> None:
    options = {key: value for key, value in locals().items() if key not in ("out", "resume", "overwrite")}
    options["overrides"] = overrides or None
    from .runner import train

    train(
        options,
        out=_directory(out, "--out"),
        resume=_directory(resume, "--resume"),
        overwrite=overwrite,
        console=make_console(),
    )


def eval_command(
    spec: str = typer.Argument(..., help="Preset name or spec YAML file the weights belong to.", show_default=False),
    weights: str = typer.Option(..., "--weights", "-w", help=option_help(EvalConfig, "weights"), show_default=False),
    data: str | None = _eval_opt("data", "--data"),
    img_size: int | None = _eval_opt("img_size", "--img-size"),
    channels: int | None = _eval_opt("channels", "--channels"),
    batch_size: int | None = _eval_opt("batch_size", "--batch-size", "-b"),
    ema: bool | None = _eval_opt("ema", "--ema/--no-ema"),
    amp: bool | None = _eval_opt("amp", "--amp/--no-amp"),
    workers: int | None = _eval_opt("workers", "--workers"),
    device: str | None = _eval_opt("device", "--device"),
    contmix_backend: str | None = _eval_opt("contmix_backend", "--contmix-backend"),
    overrides: list[str] | None = _eval_opt("overrides", "--set", metavar="KEY=VALUE"),
) -> None:
    options = dict(locals())
    options["overrides"] = overrides or None
    from .runner import evaluate_weights

    evaluate_weights(options, console=make_console())


def _directory(value: str | None, flag: str) -> Path | None:
    if value is not None and not value.strip():
        raise ConfigError(f"{flag} is empty; give a directory")
    return None if value is None else Path(value)


def register(app: typer.Typer) -> None:
    """Add the training commands to `app`."""
    app.command("train", help=TRAIN_HELP, cls=HelpCommand)(exit_on_user_error(train_command))
    app.command("eval", help=EVAL_HELP, cls=HelpCommand)(exit_on_user_error(eval_command))
