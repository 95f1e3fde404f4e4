"""The spec language: pydantic v2 models of a deep-stage-decomposition (DDS) ConvNet.

This module is the single source of truth for what a spec may say: field types, defaults, bounds
and docs live on the models; the JSON Schema (`overlock schema`), the CLI's validation and the
README's field tables all come from here. Pure data: no torch import.

Cross-field rules raise `PydanticCustomError` with a `field` in the context, so that the loader
can point at the exact field (and YAML line) even when the rule is checked on a parent model.
"""

from __future__ import annotations

from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# Branches (kernel, dilation) of UniRepLKNet's DilatedRepConv per large kernel size K, as the
# reference builds them (ARCHITECTURE.md section 3). The builder reads this table too; a kernel
# size missing here cannot be built, so the schema rejects it.
DILATED_REPCONV_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 1), (3, 2), (3, 3)),
    9: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (7, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    19: ((5, 1), (7, 1), (9, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}
SUPPORTED_LARGE_KERNELS = tuple(sorted(DILATED_REPCONV_BRANCHES))


def rule_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field violation located at `field` (dotted, relative to the model raising it)."""
    return PydanticCustomError("spec_rule", message, {"field": field})


def _check_odd_kernel(field: str, value: int, minimum: int = 3) -> None:
    if value < minimum:
        raise rule_error(field, f"{field}={value} is too small: kernels must be odd and at least {minimum}")
    if value % 2 == 0:
        raise rule_error(
            field, f"{field}={value} is even: kernels must be odd (centred), e.g. {value - 1} or {value + 1}"
        )


def _check_large_kernel(field: str, value: int) -> None:
    """Large kernels go through DilatedRepConv, which only knows the sizes of its branch table."""
    _check_odd_kernel(field, value)
    if value not in DILATED_REPCONV_BRANCHES:
        valid = ", ".join(map(str, SUPPORTED_LARGE_KERNELS))
        raise rule_error(field, f"{field}={value} has no DilatedRepConv branch table; supported: {valid}")


def _check_mlp(width: int, ratio: float) -> None:
    if width * ratio < 1:
        raise rule_error(
            "mlp_ratio", f"mlp_ratio={ratio} gives an empty MLP for width {width}: need width x mlp_ratio >= 1"
        )
    if width * ratio > MAX_SIZE:
        raise rule_error("mlp_ratio", f"mlp_ratio={ratio} gives an MLP wider than {MAX_SIZE:,} for width {width}")


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a spec must never be silently ignored.

    Strict types: a spec is typed data, so `true` is not the integer 1, '12' is not a number, and
    numbers must be finite (`.inf` and `.nan` are YAML floats, never a size or a ratio).
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)


# Far above any network that fits in memory (the builder checks that), far below where Python ints
# stop fitting torch's int64 sizes: widths, depths and class counts are bounded by it.
MAX_SIZE = 1 << 24
PosInt = Annotated[int, Field(gt=0, le=MAX_SIZE)]
LayerScale = Annotated[
    float | None,
    Field(gt=0, description="Initial value of the per-channel layer scale; null for none (plain residual)."),
]


class Stem(StrictModel):
    """Four 3x3 convs that bring the image to 1/4 resolution (ARCHITECTURE.md section 2)."""

    width: PosInt | None = Field(
        None, description="Width of the stem's first two convs; default: half of base.stages[0].width."
    )


class BlockStage(StrictModel):
    """A stage of basic blocks (DilatedRepConv + SE + GRN MLP), used by Base-Net and Overview-Net."""

    width: PosInt = Field(description="Channels of the stage.")
    depth: PosInt = Field(description="Number of basic blocks.")
    kernel_size: int = Field(description="Large kernel of the DilatedRepConv (odd, in the branch table).")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width = int(width x mlp_ratio).")
    layer_scale: LayerScale = None

    @model_validator(mode="after")
    def _rules(self) -> BlockStage:
        _check_large_kernel("kernel_size", self.kernel_size)
        _check_mlp(self.width, self.mlp_ratio)
        return self


class BaseNet(StrictModel):
    """Low/mid-level encoder. The stem feeds stage 1; each later stage halves the resolution."""

    stages: list[BlockStage] = Field(min_length=1, description="One entry per stage, shallow to deep.")


class FocusStage(StrictModel):
    """A stage of Dynamic blocks (ContMix) guided by the context prior."""

    width: PosInt = Field(description="Channels of the feature part (the context adds context.width more).")
    depth: PosInt = Field(description="Number of Dynamic blocks.")
    kernel_size: int = Field(description="Large dynamic ContMix kernel, also the DilatedRepConv kernel of the LePE.")
    small_kernel_size: int = Field(5, description="Small dynamic ContMix kernel (odd, >= 3).")
    groups: PosInt = Field(description="ContMix groups G: each kernel half gets 2G heads.")
    region_centers: PosInt = Field(7, description="S: the context is pooled to SxS region centres.")
    mlp_ratio: float = Field(3.0, gt=0, description="MLP hidden width = int(width x mlp_ratio).")
    layer_scale: LayerScale = 1.0

    @model_validator(mode="after")
    def _rules(self) -> FocusStage:
        _check_large_kernel("kernel_size", self.kernel_size)
        _check_odd_kernel("small_kernel_size", self.small_kernel_size)
        _check_mlp(self.width, self.mlp_ratio)
        step = 4 * self.groups
        if self.width % step:
            lower = max(step, self.width // step * step)
            raise rule_error(
                "width",
                f"width={self.width} is not divisible by 4 x groups = {step}: ContMix splits the width into "
                f"2 kernel halves of 2G={2 * self.groups} heads, and the queries (width/2) into 2G heads. "
                f"Valid nearby widths: {lower}, {lower + step}; or change groups.",
            )
        return self


class FocusNet(StrictModel):
    """Refines the mid-level features; stage 1 runs at Base-Net output resolution, later ones at /2 each."""

    stages: list[FocusStage] = Field(min_length=1, description="One entry per stage.")


class Context(StrictModel):
    """The context prior that flows from Overview-Net through Focus-Net (ARCHITECTURE.md sections 2, 4)."""

    width: PosInt | None = Field(None, description="Channels of the prior P; default overview.width / 4.")
    reinject_prior: bool = Field(
        True, description="Before every Dynamic block but the first: P = alpha * P + beta * P0 (learned scales)."
    )
    gate: bool = Field(True, description="Multiply the ContMix output by SiLU(BN(conv1x1(z))).")
    base_features: bool = Field(
        True,
        description="Feed the Base-Net's features to Focus-Net; if false, Focus-Net starts from the "
        "upsampled Overview-Net output (conv1x1 + BN to the first Focus-Net width).",
    )


class Head(StrictModel):
    """Classifier heads: main (on cat(x, P)) and the auxiliary one on the Overview-Net output."""

    num_classes: PosInt | None = Field(
        None, description="Classes; null leaves it open (training takes it from the data)."
    )
    projection: PosInt = Field(1024, description="Width of the conv1x1 + BN + SiLU before pooling.")
    aux_head: bool = Field(True, description="Auxiliary classifier on the Overview-Net output (training only).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the final classifier conv.")


class Norm(StrictModel):
    """Normalisation choices the reference exposes."""

    block: Literal["layernorm", "batchnorm"] = Field(
        "layernorm",
        description="Norm before the token mixer and the MLP of every block (reference: channels-only LayerNorm).",
    )


class Spec(StrictModel):
    """A whole DDS network: Base-Net -> Overview-Net -> context prior -> Focus-Net -> heads."""

    name: str | None = Field(None, description="Short name, shown in summaries.")
    description: str | None = Field(None, description="One line on what this spec is.")
    extends: str | None = Field(
        None, description="Preset name or path (relative to this file) to start from; this file overrides it."
    )
    in_channels: PosInt = Field(3, description="Channels of the input image.")
    stem: Stem = Field(default_factory=Stem, description="The /4 stem (see `stem`).")
    base: BaseNet = Field(description="Base-Net: `stages`, a list of at least one stage (see `base.stages[i]`).")
    overview: BlockStage = Field(description="Overview-Net: one /2 downsample then blocks; gives the context.")
    focus: FocusNet = Field(description="Focus-Net: `stages`, a list of at least one stage (see `focus.stages[i]`).")
    context: Context = Field(default_factory=Context, description="Context prior flow (see `context`).")
    head: Head = Field(default_factory=Head, description="Classifier heads (see `head`).")
    drop_path_rate: float = Field(
        0.0, ge=0, lt=1, description="Stochastic depth, linear over all blocks (Base, Overview, Focus in order)."
    )
    residual_scaling: bool = Field(True, description="Blocks compute LS(x) + f(x) (reference) instead of x + LS(f(x)).")
    norm: Norm = Field(default_factory=Norm, description="Normalisation choices (see `norm`).")

    @model_validator(mode="after")
    def _rules(self) -> Spec:
        if self.context.width is None and self.overview.width % 4:
            raise rule_error(
                "context.width",
                f"context.width defaults to overview.width / 4, but overview.width={self.overview.width} is not "
                "divisible by 4; set context.width explicitly or use a multiple of 4",
            )
        first, last_base = self.focus.stages[0].width, self.base.stages[-1].width
        if self.context.base_features and first != last_base:
            raise rule_error(
                "focus.stages[0].width",
                f"focus.stages[0].width={first} must equal base.stages[-1].width={last_base}: Focus-Net refines "
                "the Base-Net's features in place (or set context.base_features: false)",
            )
        return self

    def to_yaml(self) -> str:
        """The resolved spec as YAML in field order (readable top to bottom, like Table 1)."""
        data = self.model_dump(mode="json", exclude={"extends"})
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)

    # Derived values: computed here so that builder, summaries and checks agree on them.
    @property
    def context_width(self) -> int:
        return self.context.width if self.context.width is not None else self.overview.width // 4

    @property
    def stem_width(self) -> int:
        return self.stem.width if self.stem.width is not None else max(1, self.base.stages[0].width // 2)

    @property
    def total_blocks(self) -> int:
        stages = [*self.base.stages, self.overview, *self.focus.stages]
        return sum(stage.depth for stage in stages)
