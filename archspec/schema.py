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
from pydantic import Field, model_validator

from .mixers import MIXER_TYPES, Mixer, MixerConfig
from .rules import (
    DILATED_REPCONV_BRANCHES,
    SUPPORTED_LARGE_KERNELS,
    PosInt,
    StrictModel,
    check_large_kernel,
    check_mlp,
    check_odd_kernel,
    rule_error,
)

__all__ = ["DILATED_REPCONV_BRANCHES", "SUPPORTED_LARGE_KERNELS", "MIXER_TYPES", "StrictModel", "rule_error"]

LayerScale = Annotated[
    float | None,
    Field(gt=0, description="Initial value of the per-channel layer scale; null for none (plain residual)."),
]
NormKind = Literal["layernorm", "batchnorm"]


class Block(StrictModel):
    """What a stage's blocks are made of. Every part left out is the OverLoCK block of its place:
    Base-Net / Overview-Net / pyramid stages get the basic block, Focus-Net stages the dynamic block."""

    kind: Literal["basic", "dynamic"] | None = Field(
        None,
        description="`basic`: local conv, norm, mixer, BN, SE, FFN in one residual branch; `dynamic`: the Focus-Net "
        "block (fuses features and context prior, gate, LePE, mixer, then FFN). Default: dynamic in Focus-Net, "
        "else basic. In Focus-Net, `basic` blocks (static) see cat(features, prior).",
    )
    mixer: Mixer | None = Field(
        None,
        description="Token mixer, `{type: NAME, ...args}`; types: " + ", ".join(f"`{t}`" for t in MIXER_TYPES) + ". "
        "Default: `dilated_repconv` in basic blocks, `contmix` in dynamic blocks.",
    )
    ffn: Literal["conv_ffn", "mlp"] = Field(
        "conv_ffn",
        description="`conv_ffn`: conv1x1-GELU-(y + dwconv3x3 y)-GRN-conv1x1 (OverLoCK); `mlp`: conv1x1-GELU-conv1x1.",
    )
    se: bool = Field(True, description="Squeeze-and-excitation after the mixer.")
    local_conv: bool = Field(True, description="Residual 3x3 depthwise conv (x + dwconv3x3 x) in front of the block.")
    norm: NormKind | None = Field(None, description="Norm before mixer and FFN; default: the spec's `norm.block`.")

    def describe(self) -> str:
        parts = [self.mixer.describe() if self.mixer else "?", self.ffn]
        if self.se:
            parts.append("se")
        if self.local_conv:
            parts.append("local")
        return ", ".join(parts)


DEFAULT_MIXER = {"basic": "dilated_repconv", "dynamic": "contmix"}


def _fill_mixer_type(data: object, place_kind: str) -> object:
    """`block.mixer` without a `type` means the block's default mixer with these arguments, so that
    `--set focus.stages.0.block.mixer.groups=8` works like `--set focus.stages.0.groups=8`."""
    block = data.get("block") if isinstance(data, dict) else None
    mixer = block.get("mixer") if isinstance(block, dict) else None
    if isinstance(mixer, dict) and "type" not in mixer:
        kind = block.get("kind") or place_kind
        if kind in DEFAULT_MIXER:
            data = {**data, "block": {**block, "mixer": {"type": DEFAULT_MIXER[kind], **mixer}}}
    return data


class Stem(StrictModel):
    """The /4 stem (ARCHITECTURE.md section 2): four 3x3 convs (`conv`), or a 4x4 patch embedding (`patch`)."""

    type: Literal["conv", "patch"] = Field(
        "conv",
        description="`conv`: conv3x3 s2, conv3x3, conv3x3 s2, conv3x3 with BN and GELU (OverLoCK); "
        "`patch`: non-overlapping 4x4 conv (kernel = stride) + norm.",
    )
    width: PosInt | None = Field(
        None,
        description="Width of the `conv` stem's first two convs; default: half of the first stage's width.",
    )


class Downsample(StrictModel):
    """How every /2 transition between stages is made."""

    type: Literal["conv", "patch"] = Field(
        "conv",
        description="`conv`: conv3x3 s2 + BN (OverLoCK); `patch`: norm + non-overlapping 2x2 conv s2 (patch merging).",
    )


class BlockStage(StrictModel):
    """A stage of blocks, basic blocks by default (DilatedRepConv + SE + ConvFFN): Base-Net, Overview-Net
    and pyramid stages."""

    width: PosInt = Field(description="Channels of the stage.")
    depth: PosInt = Field(description="Number of blocks.")
    kernel_size: int | None = Field(
        None, description="Kernel of the stage's mixer (DilatedRepConv: odd, in the branch table)."
    )
    mlp_ratio: float = Field(4.0, gt=0, description="FFN hidden width = int(width x mlp_ratio).")
    layer_scale: LayerScale = None
    block: Block = Field(default_factory=Block, description="What the blocks are made of (see `block`).")

    _default_mixer_type = model_validator(mode="before")(lambda data: _fill_mixer_type(data, "basic"))

    @model_validator(mode="after")
    def _rules(self) -> BlockStage:
        check_mlp(self.width, self.mlp_ratio)
        if self.block.kind == "dynamic":
            raise rule_error(
                "block.kind",
                "dynamic blocks need the context prior, which only Focus-Net stages have; use kind: basic here",
            )
        return self


class BaseNet(StrictModel):
    """Low/mid-level encoder. The stem feeds stage 1; each later stage halves the resolution."""

    stages: list[BlockStage] = Field(min_length=1, description="One entry per stage, shallow to deep.")


class FocusStage(StrictModel):
    """A Focus-Net stage: dynamic blocks (ContMix guided by the context prior) by default, or static ones."""

    width: PosInt = Field(description="Channels of the feature part (the context adds context.width more).")
    depth: PosInt = Field(description="Number of blocks.")
    kernel_size: int = Field(
        description="Large ContMix kernel, also the DilatedRepConv kernel of the LePE (dynamic blocks)."
    )
    small_kernel_size: int = Field(5, description="Small dynamic ContMix kernel (odd, >= 3).")
    groups: PosInt | None = Field(None, description="ContMix groups G: each kernel half gets 2G heads.")
    region_centers: PosInt = Field(7, description="S: the context is pooled to SxS region centres.")
    mlp_ratio: float = Field(3.0, gt=0, description="FFN hidden width = int(width x mlp_ratio).")
    layer_scale: LayerScale = 1.0
    block: Block = Field(default_factory=Block, description="What the blocks are made of (see `block`).")

    _default_mixer_type = model_validator(mode="before")(lambda data: _fill_mixer_type(data, "dynamic"))

    @model_validator(mode="after")
    def _rules(self) -> FocusStage:
        if self.block.kind != "basic":  # the LePE of a dynamic block is a DilatedRepConv of kernel_size
            check_large_kernel("kernel_size", self.kernel_size)
        check_odd_kernel("small_kernel_size", self.small_kernel_size)
        check_mlp(self.width, self.mlp_ratio)
        return self


class FocusNet(StrictModel):
    """Refines the mid-level features; stage 1 runs at Base-Net output resolution, later ones at /2 each."""

    stages: list[FocusStage] = Field(min_length=1, description="One entry per stage.")


class Context(StrictModel):
    """The context prior that flows from Overview-Net through Focus-Net (ARCHITECTURE.md sections 2, 4)."""

    width: PosInt | None = Field(None, description="Channels of the prior P; default overview.width / 4.")
    reinject_prior: bool = Field(
        True, description="Before every Focus-Net block but the first: P = alpha * P + beta * P0 (learned scales)."
    )
    gate: bool = Field(True, description="Dynamic blocks multiply the mixer output by SiLU(BN(conv1x1(z))).")
    base_features: bool = Field(
        True,
        description="Feed the Base-Net's features to Focus-Net; if false, Focus-Net starts from the "
        "upsampled Overview-Net output (conv1x1 + BN to the first Focus-Net width).",
    )


class PyramidHead(StrictModel):
    """Classifier head: conv1x1 + BN + SiLU projection (or a norm), global pooling, classifier."""

    num_classes: PosInt | None = Field(
        None, description="Classes; null leaves it open (training takes it from the data)."
    )
    projection: PosInt | None = Field(
        1024,
        description="Width of the conv1x1 + BN + SiLU before pooling; null: norm, pool, classifier (Swin/ConvNeXt).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the final classifier conv.")


class Head(PyramidHead):
    """Classifier heads: main (on cat(x, P)) and the auxiliary one on the Overview-Net output."""

    aux_head: bool = Field(True, description="Auxiliary classifier on the Overview-Net output (training only).")


class Norm(StrictModel):
    """Normalisation choices the reference exposes."""

    block: NormKind = Field(
        "layernorm",
        description="Norm before the token mixer and the FFN of every block (reference: channels-only LayerNorm); "
        "a block's `norm` overrides it.",
    )


class Feedback(StrictModel):
    """Top-down feedback in a pyramid: the paper's "recurrent" alternative to deep-stage decomposition."""

    source: int = Field(ge=0, description="Stage (0-based) whose output is fed back, upsampled.")
    target: int = Field(
        ge=0,
        description="Earlier stage (0-based) whose input gets cat(input, upsampled source output) through a "
        "conv1x1 + BN back to its width; it and the stages after it then run again.",
    )


class _SpecBase(StrictModel):
    """Fields every topology has."""

    name: str | None = Field(None, description="Short name, shown in summaries.")
    description: str | None = Field(None, description="One line on what this spec is.")
    extends: str | None = Field(
        None, description="Preset name or path (relative to this file) to start from; this file overrides it."
    )
    topology: Literal["dds", "pyramid"] = Field(
        "dds",
        description="`dds`: Base-Net -> Overview-Net -> Focus-Net (OverLoCK); `pyramid`: a stem and `stages`, "
        "each halving the resolution, one head.",
    )
    in_channels: PosInt = Field(3, description="Channels of the input image.")
    stem: Stem = Field(default_factory=Stem, description="The /4 stem (see `stem`).")
    downsample: Downsample = Field(default_factory=Downsample, description="The /2 transitions (see `downsample`).")

    def to_yaml(self) -> str:
        """The resolved spec as YAML in field order (readable top to bottom, like Table 1)."""
        data = self.model_dump(mode="json", exclude={"extends"}, exclude_defaults=False)
        _drop_default_blocks(data)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)

    @property
    def stem_width(self) -> int:
        first = self.stages_in_order()[0][1].width
        return self.stem.width if self.stem.width is not None else max(1, first // 2)

    @property
    def total_blocks(self) -> int:
        return sum(stage.depth for _, stage, _ in self.stages_in_order())

    # Blocks: every stage's block with every default filled in, as the builder builds it.
    def stages_in_order(self) -> list[tuple[str, BlockStage | FocusStage, int]]:
        """(path, stage, channels its blocks see), in stochastic-depth order."""
        raise NotImplementedError

    def resolved_block(self, path: str) -> Block:
        """The block of the stage at `path` ('base.stages.0', 'overview', 'focus.stages.1', 'stages.2')."""
        for here, stage, channels in self.stages_in_order():
            if here == path:
                return _resolve_block(stage, path, channels, self.norm.block)
        raise KeyError(path)

    def _check_blocks(self) -> None:
        for path, stage, channels in self.stages_in_order():
            _resolve_block(stage, path, channels, self.norm.block)


def _place_prefix(path: str) -> str:
    return "".join(f"[{p}]" if p.isdigit() else (f".{p}" if i else p) for i, p in enumerate(path.split(".")))


def _resolve_block(stage: BlockStage | FocusStage, path: str, channels: int, norm: str) -> Block:
    """Fill every left-out part of a stage's block and check the mixer against its place."""
    block = stage.block
    prefix = _place_prefix(path)
    kind = block.kind or ("dynamic" if isinstance(stage, FocusStage) else "basic")
    mixer: MixerConfig = block.mixer or _default_mixer(kind)
    filled: dict[str, object] = {}
    where: dict[str, str] = {}
    for name in mixer.INHERITED:
        if getattr(mixer, name) is not None:
            where[name] = f"{prefix}.block.mixer.{name}"
            continue
        value = getattr(stage, name, None)
        value = mixer.DEFAULTS.get(name) if value is None else value
        if value is None:
            raise rule_error(
                f"{prefix}.block.mixer.{name}",
                f"mixer {mixer.type!r} needs {name}: set it on the stage or in block.mixer",
            )
        filled[name] = value
        where[name] = f"{prefix}.{name}" if getattr(stage, name, None) is not None else f"{prefix}.block.mixer.{name}"
    if "context" in type(mixer).model_fields and mixer.context is None:
        filled["context"] = "guided" if kind == "dynamic" else "self"
    mixer = mixer.model_copy(update=filled)
    if mixer.guided and kind != "dynamic":
        raise rule_error(
            f"{prefix}.block.mixer.context",
            "a context-guided contmix needs the context prior, which only Focus-Net dynamic blocks have; "
            "use context: self here (region centres of the block's own input)",
        )
    # A dynamic block mixes its d feature channels; a static Focus-Net block sees cat(x, P).
    width = stage.width if kind == "dynamic" else channels
    mixer.check(width, {**where, "width": f"{prefix}.width"})
    return block.model_copy(update={"kind": kind, "mixer": mixer, "norm": block.norm or norm})


def _default_mixer(kind: str) -> MixerConfig:
    from .mixers import MIXER_CONFIGS

    name = DEFAULT_MIXER[kind]
    return next(cls for cls in MIXER_CONFIGS if cls.model_fields["type"].annotation.__args__ == (name,))(type=name)


def _drop_default_blocks(data: object) -> None:
    """Keep `block: {}` (all defaults) out of written specs: they read like the paper's table."""
    if isinstance(data, dict):
        if data.get("block") == Block().model_dump(mode="json"):
            del data["block"]
        for value in data.values():
            _drop_default_blocks(value)
    elif isinstance(data, list):
        for value in data:
            _drop_default_blocks(value)


class DDSSpec(_SpecBase):
    """A whole DDS network: Base-Net -> Overview-Net -> context prior -> Focus-Net -> heads."""

    topology: Literal["dds"] = Field("dds", description="`dds` (this table) or `pyramid` (see below).")
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
    def _rules(self) -> DDSSpec:
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
        self._check_blocks()
        return self

    @property
    def context_width(self) -> int:
        return self.context.width if self.context.width is not None else self.overview.width // 4

    def stages_in_order(self) -> list[tuple[str, BlockStage | FocusStage, int]]:
        c = self.context_width
        return [
            *((f"base.stages.{i}", s, s.width) for i, s in enumerate(self.base.stages)),
            ("overview", self.overview, self.overview.width),
            *((f"focus.stages.{i}", s, s.width + c) for i, s in enumerate(self.focus.stages)),
        ]


class PyramidSpec(_SpecBase):
    """A plain pyramid: stem (/4), then stages that each halve the resolution, then one head."""

    topology: Literal["pyramid"] = Field(description="`pyramid`.")
    stages: list[BlockStage] = Field(
        min_length=1, description="One entry per stage, shallow to deep (see `stages[i]`)."
    )
    feedback: Feedback | None = Field(None, description="Optional top-down feedback (see `feedback`).")
    head: PyramidHead = Field(default_factory=PyramidHead, description="Classifier head (see `head`, no aux head).")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth, linear over all blocks.")
    residual_scaling: bool = Field(True, description="Blocks compute LS(x) + f(x) (reference) instead of x + LS(f(x)).")
    norm: Norm = Field(default_factory=Norm, description="Normalisation choices (see `norm`).")

    @model_validator(mode="after")
    def _rules(self) -> PyramidSpec:
        if self.feedback is not None:
            n = len(self.stages)
            source, target = self.feedback.source, self.feedback.target
            if source >= n:
                raise rule_error("feedback.source", f"feedback.source={source}: there are only stages 0 to {n - 1}")
            if target >= source:
                raise rule_error(
                    "feedback.target",
                    f"feedback.target={target} must be an earlier stage than feedback.source={source} (0 to {source - 1})",
                )
        self._check_blocks()
        return self

    def stages_in_order(self) -> list[tuple[str, BlockStage | FocusStage, int]]:
        return [(f"stages.{i}", s, s.width) for i, s in enumerate(self.stages)]


# Topology name -> spec model. The loader picks the model by the spec's `topology` key.
TOPOLOGIES: dict[str, type[_SpecBase]] = {"dds": DDSSpec, "pyramid": PyramidSpec}

# Any validated spec (isinstance checks and annotations).
Spec = DDSSpec | PyramidSpec
