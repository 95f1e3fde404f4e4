"""Training and evaluation options as pydantic models: the one place for defaults, bounds and docs.

The CLI (`commands.py`) reads its help texts from these fields and passes only the options a user
actually typed, so a default lives here and nowhere else. A run checkpoint stores the
`TrainConfig` it was started with; `--resume` rebuilds the run from it, which is why it holds
only plain values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

#: Epochs when neither --epochs nor --steps is given: enough for pico on digits to pass 95%.
DEFAULT_EPOCHS = 6

#: Options that may differ between an interrupted run and its resumption: they change how the run
#: is executed or where it stops, not what it computes.
RUNTIME_FIELDS = frozenset({"workers", "stop_after", "compile", "device", "contmix_backend", "grad_checkpoint"})


class TrainConfig(BaseModel):
    """Everything `overlock train` needs besides the run directory bookkeeping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(description="Preset name (pico, xt, t, s, b) or path to a spec YAML file.")
    overrides: list[str] = Field(
        default_factory=list, description="Spec overrides KEY=VALUE (dotted keys), repeatable."
    )
    data: str = Field(
        "digits",
        description="Data source: 'digits' (scikit-learn's bundled 8x8 digits, resized), 'synthetic' "
        "(deterministic; options as synthetic:classes=4,train=64,val=32), or a directory with train/ and "
        "val/ holding one folder per class.",
    )
    channels: Literal[1, 3] = Field(
        3, description="Image channels the data gives (1: grayscale, 3: RGB); must match the spec's in_channels."
    )
    img_size: int | None = Field(
        None,
        ge=32,
        le=1024,
        description="Training and evaluation image size (default: 32 for digits/synthetic, 224 for directories).",
    )
    epochs: int | None = Field(
        None, ge=1, description=f"Epochs to train (default {DEFAULT_EPOCHS} unless --steps is given)."
    )
    steps: int | None = Field(None, ge=1, description="Optimizer steps to train instead of --epochs.")
    batch_size: int = Field(
        32, ge=1, description="Images per step and process (global batch = this x number of processes)."
    )
    lr: float = Field(2e-3, gt=0, le=10, description="Peak learning rate of AdamW (after warm-up).")
    min_lr: float = Field(1e-6, ge=0, description="Learning rate at the end of the cosine decay.")
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW weight decay (never applied to norms, biases, layer scales, position biases)."
    )
    warmup: float = Field(1.0, ge=0, description="Linear warm-up length in epochs (fractions allowed).")
    aux_weight: float = Field(0.4, ge=0, description="Weight of the auxiliary (Overview-Net) head's cross-entropy.")
    drop_path: float | None = Field(
        None, ge=0, lt=1, description="Stochastic depth rate; overrides the spec's drop_path_rate."
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of both cross-entropies.")
    clip_grad: float = Field(5.0, ge=0, description="Clip the gradient norm to this value (0 = off).")
    ema: float | None = Field(
        None, gt=0, lt=1, description="Keep an EMA of the weights with this decay (e.g. 0.999) and evaluate it too."
    )
    amp: bool = Field(
        False, description="Mixed precision: bfloat16 autocast on CPU, float16 with loss scaling on CUDA."
    )
    compile: bool = Field(False, description="Run the training and evaluation forward through torch.compile.")
    grad_checkpoint: bool = Field(
        False,
        description="Recompute each block's activations in the backward instead of storing them: less memory "
        "for large inputs, same gradients, about one more forward of compute.",
    )
    sync_bn: bool = Field(False, description="Synchronise BatchNorm statistics across processes (CUDA only).")
    seed: int = Field(0, ge=0, description="Seed of weights, data order, augmentation and stochastic depth.")
    deterministic: bool = Field(
        False, description="Use deterministic algorithms only (slower on GPU; CPU runs are deterministic anyway)."
    )
    workers: int | None = Field(
        None,
        ge=0,
        description="Data loading processes per training process (default: 0 for in-memory data, 2 for directories).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto picks CUDA when available."
    )
    contmix_backend: str = Field(
        "auto",
        description="ContMix implementation (auto, or one of overlock.kernels.BACKENDS, e.g. reference) for speed comparisons.",
    )
    eval_every: int = Field(
        1, ge=1, description="Evaluate on the validation split every N epochs (and always at the end)."
    )
    log_every: int = Field(1, ge=1, description="Write a step record to metrics.jsonl every N steps.")
    stop_after: int | None = Field(
        None,
        ge=1,
        description="Stop after N steps of this invocation and save last.pt, as if interrupted (for time-limited jobs); resume later with --resume.",
    )

    @model_validator(mode="after")
    def _rules(self) -> TrainConfig:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give either --epochs or --steps, not both")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        return self

    @property
    def resolved_epochs(self) -> int | None:
        """Epochs to train, or None when the run is measured in steps."""
        if self.steps is not None:
            return None
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS


class EvalConfig(BaseModel):
    """Everything `overlock eval` needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(description="Preset name or spec YAML file the weights belong to.")
    weights: str = Field(description="Checkpoint: a run's last.pt/best.pt or a plain state dict file.")
    overrides: list[str] = Field(
        default_factory=list, description="Spec overrides KEY=VALUE (dotted keys), repeatable."
    )
    data: str | None = Field(
        None,
        description="Data source whose validation split is evaluated, as for train (default: the run's, else digits).",
    )
    channels: Literal[1, 3] | None = Field(
        None, description="Image channels the data gives (1 or 3; default: the run's, else 3)."
    )
    img_size: int | None = Field(
        None, ge=32, le=1024, description="Evaluation image size (default: the run's, else the source's)."
    )
    batch_size: int = Field(128, ge=1, description="Images per forward pass.")
    ema: bool = Field(False, description="Evaluate the EMA weights of a run checkpoint instead of the raw ones.")
    amp: bool = Field(False, description="Mixed precision (bfloat16 on CPU, float16 on CUDA).")
    workers: int | None = Field(
        None, ge=0, description="Data loading processes (default: 0 for in-memory data, 2 for directories)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to evaluate.")
    contmix_backend: str = Field(
        "auto", description="ContMix implementation (auto, or one of overlock.kernels.BACKENDS)."
    )


def _option_name(loc: tuple[Any, ...]) -> str:
    return "--" + str(loc[0]).replace("_", "-") if loc else "options"


def validated(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """`model(**values)` with pydantic's errors turned into one readable `ConfigError`.

    Messages name the CLI flag (`--batch-size`), not the Python field, because that is what the
    user typed.
    """
    try:
        return model(**values)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            where = _option_name(item["loc"])
            lines.append(f"  {where}: {message}" if item["loc"] else f"  {message}")
        raise ConfigError("invalid options:\n" + "\n".join(lines)) from None


def option_help(model: type[BaseModel], field: str) -> str:
    """The help text of a CLI option, with the default the model applies."""
    info = model.model_fields[field]
    text = info.description or ""
    if info.is_required():
        return text
    default = info.get_default(call_default_factory=True)
    if isinstance(default, bool) or default in (None, []):
        return text
    return f"{text} (default: {default})"
