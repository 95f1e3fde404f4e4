"""Token mixers a block can use: one config model per entry of the mixer registry.

A spec names a block's mixer with `block.mixer: {type: <name>, ...}`; the `type` selects one of
the models below (a pydantic discriminated union, so an unknown name is an error that lists the
valid ones). `builder/mixers.py` holds the matching builders, one small function per name.

Adding a mixer is two steps, each in one place:
1. here: a `MixerConfig` subclass with `type: Literal["<name>"]`, its arguments as fields (with
   descriptions), and `check()` for its rules; add it to `MIXER_CONFIGS`;
2. in builder/mixers.py: `@register_mixer("<name>")` on a function that returns the module.

Arguments a stage already has (`kernel_size` on every stage; `small_kernel_size`, `groups`,
`region_centers` on Focus-Net stages) may be left out (null): the mixer then takes the stage's
value, so `--set focus.stages.0.block.mixer.type=dilated_repconv` alone swaps a mixer.
"""

from __future__ import annotations

import typing
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from .rules import PosInt, StrictModel, check_large_kernel, check_odd_kernel, rule_error


class MixerConfig(StrictModel):
    """Common part of every mixer config."""

    # Fields that fall back to the stage's field of the same name, then to these defaults.
    INHERITED: ClassVar[tuple[str, ...]] = ()
    DEFAULTS: ClassVar[dict[str, object]] = {}
    type: str

    @property
    def guided(self) -> bool:
        """Whether the mixer needs the context prior (only a Focus-Net dynamic block has one)."""
        return False

    def check(self, width: int, where: dict[str, str]) -> None:
        """Rules on the resolved arguments. `width`: channels the mixer sees; `where`: field -> the
        spec path it came from (the stage's own field or `block.mixer.<field>`; `width`: the stage's
        width), so that an error points at the line the user wrote."""

    def describe(self) -> str:
        """Short form for summaries, e.g. 'dilated_repconv 13'."""
        return self.type


class DilatedRepConvMixer(MixerConfig):
    """UniRepLKNet's DilatedRepConv: depthwise KxK conv + dilated branches; folds into one conv for deploy."""

    INHERITED = ("kernel_size",)
    type: Literal["dilated_repconv"]
    kernel_size: int | None = Field(None, description="Large kernel (in the branch table); default: the stage's.")

    def check(self, width: int, where: dict[str, str]) -> None:
        check_large_kernel(where["kernel_size"], self.kernel_size)

    def describe(self) -> str:
        return f"dilated_repconv {self.kernel_size}"


class DWConvMixer(MixerConfig):
    """A plain depthwise KxK convolution (the 'vanilla depthwise conv' of the paper's baselines)."""

    INHERITED = ("kernel_size",)
    type: Literal["dwconv"]
    kernel_size: int | None = Field(None, description="Kernel (odd, >= 3); default: the stage's.")

    def check(self, width: int, where: dict[str, str]) -> None:
        check_odd_kernel(where["kernel_size"], self.kernel_size)

    def describe(self) -> str:
        return f"dwconv {self.kernel_size}"


class ContMixConfig(MixerConfig):
    """ContMix: dynamic kernels from each token's affinity to SxS region centres of a context."""

    INHERITED = ("kernel_size", "small_kernel_size", "groups", "region_centers")
    DEFAULTS = {"small_kernel_size": 5, "region_centers": 7}
    type: Literal["contmix"]
    kernel_size: int | None = Field(None, description="Large dynamic kernel (odd); default: the stage's.")
    small_kernel_size: int | None = Field(None, description="Small dynamic kernel (odd); default: the stage's, else 5.")
    groups: PosInt | None = Field(None, description="Groups G (2G heads per kernel half); default: the stage's.")
    region_centers: PosInt | None = Field(
        None, description="S of the SxS region centres; default: the stage's, else 7."
    )
    context: Literal["guided", "self"] | None = Field(
        None,
        description="`guided`: region centres of the context prior (Focus-Net dynamic blocks); `self`: of the "
        "block's own input (the stand-alone ContMix layer). Default: guided in dynamic blocks, else self.",
    )

    @property
    def guided(self) -> bool:
        return self.context == "guided"

    def check(self, width: int, where: dict[str, str]) -> None:
        check_odd_kernel(where["kernel_size"], self.kernel_size)
        check_odd_kernel(where["small_kernel_size"], self.small_kernel_size)
        step = 4 * self.groups
        if width % step:
            lower = max(step, width // step * step)
            # Point at the groups the user wrote on the mixer, else at the stage's width (the usual fix).
            field = where["groups"] if ".block.mixer." in where["groups"] else where["width"]
            raise rule_error(
                field,
                f"width={width} is not divisible by 4 x groups = {step}: ContMix splits the width into "
                f"2 kernel halves of 2G={2 * self.groups} heads, and the queries (width/2) into 2G heads. "
                f"Valid nearby widths: {lower}, {lower + step}; or change groups.",
            )

    def describe(self) -> str:
        return f"contmix {self.kernel_size}/{self.small_kernel_size} G{self.groups} S{self.region_centers}" + (
            "" if self.guided else " self"
        )


class ContMixBlockConfig(ContMixConfig):
    """ContMix inside the dynamic block's mixing branch (gate, LePE, projections), on the input alone.

    What the paper's Table 7 test bed most plausibly calls "ContMix": it has no Overview-Net, so no
    context prior; the region centres come from the block's own input, and the parts the Focus-Net
    dynamic block puts around ContMix stay (see builder/contmix.py `ContMixBlock`).
    """

    type: Literal["contmix_block"]
    context: Literal["self"] = Field(
        "self", description="Always `self`: queries and keys from the block's input (there is no prior here)."
    )
    fusion: bool = Field(
        False,
        description="The dynamic block's fusion (dwconv3x3, BN, GELU, conv1x1, GRN) in front, giving the values "
        "and the input of gate and LePE; in Focus-Net it merges the prior in, so without one it is off by default.",
    )
    gate: bool = Field(True, description="Multiply the output by SiLU(BN(conv1x1(z))).")
    lepe: bool = Field(True, description="Add BN(DilatedRepConv(kernel_size)(z)), the local positional encoding.")
    projections: bool = Field(True, description="BN(conv1x1) after ContMix and BN, conv1x1 at the end.")

    def check(self, width: int, where: dict[str, str]) -> None:
        super().check(width, where)
        if self.lepe:  # the LePE is a DilatedRepConv of the large kernel: only sizes of its branch table
            check_large_kernel(where["kernel_size"], self.kernel_size)

    def describe(self) -> str:
        parts = [name for name in ("fusion", "gate", "lepe", "projections") if getattr(self, name)]
        return f"contmix_block {self.kernel_size}/{self.small_kernel_size} G{self.groups} S{self.region_centers}" + (
            f" ({', '.join(parts)})" if parts else ""
        )


class IdentityMixer(MixerConfig):
    """No token mixing (the block keeps its other parts): the ablation floor."""

    type: Literal["identity"]


def _own_field(where: dict[str, str], name: str) -> str:
    """Spec path of one of the mixer's own (not inherited) fields, from the stage's width path."""
    return where["width"].rsplit(".", 1)[0] + f".block.mixer.{name}"


def _check_heads(width: int, where: dict[str, str], head_dim: int) -> None:
    if width % head_dim:
        lower = max(head_dim, width // head_dim * head_dim)
        raise rule_error(
            where["width"],
            f"width={width} is not divisible by head_dim={head_dim} (heads = width / head_dim). "
            f"Valid nearby widths: {lower}, {lower + head_dim}; or change block.mixer.head_dim.",
        )


def _check_divisor(width: int, where: dict[str, str], name: str, value: int) -> None:
    if width % value:
        raise rule_error(_own_field(where, name), f"{name}={value} does not divide the width {width}")


class NeighborhoodAttentionMixer(MixerConfig):
    """NAT's neighbourhood attention (clamped KxK windows, relative position bias) on overlock's kernel."""

    INHERITED = ("kernel_size",)
    type: Literal["neighborhood_attention"]
    kernel_size: int | None = Field(None, description="Window (odd, >= 3); default: the stage's.")
    head_dim: PosInt = Field(32, description="Channels per head; heads = width / head_dim.")
    dilation: PosInt = Field(1, description="Dilation (as in NAT): windows of every d-th position.")
    qkv_bias: bool = Field(True, description="Bias on the 1x1 qkv projection.")
    rel_pos_bias: bool = Field(True, description="Learned (heads, 2K-1, 2K-1) relative position bias.")

    def check(self, width: int, where: dict[str, str]) -> None:
        check_odd_kernel(where["kernel_size"], self.kernel_size)
        _check_heads(width, where, self.head_dim)

    def describe(self) -> str:
        return f"neighborhood_attention {self.kernel_size}" + (f" d{self.dilation}" if self.dilation > 1 else "")


class WindowAttentionMixer(MixerConfig):
    """Swin's window attention; with `shift`, windows shifted by half on every other block (odd indices)."""

    INHERITED = ("kernel_size",)
    type: Literal["window_attention"]
    kernel_size: int | None = Field(None, description="Window side (>= 2); default: the stage's.")
    head_dim: PosInt = Field(32, description="Channels per head; heads = width / head_dim.")
    shift: bool = Field(True, description="Shifted windows (and their attention mask) on every other block.")
    qkv_bias: bool = Field(True, description="Bias on the 1x1 qkv projection.")

    def check(self, width: int, where: dict[str, str]) -> None:
        if self.kernel_size < 2:
            raise rule_error(where["kernel_size"], f"kernel_size={self.kernel_size}: a window needs a side >= 2")
        _check_heads(width, where, self.head_dim)

    def describe(self) -> str:
        return f"window_attention {self.kernel_size}" + (" shifted" if self.shift else "")


class InvolutionMixer(MixerConfig):
    """Involution: a KxK kernel generated per position, shared by the channels of each group."""

    INHERITED = ("kernel_size",)
    type: Literal["involution"]
    kernel_size: int | None = Field(None, description="Kernel (odd, >= 3); default: the stage's.")
    group_channels: PosInt = Field(16, description="Channels sharing one generated kernel.")
    reduction: PosInt = Field(4, description="Channel reduction of the kernel generator.")
    projections: bool = Field(
        False,
        description="1x1 convs before and after the mixer, as attention mixers have (qkv, proj): how the "
        "paper's Table 7 test bed reads, by its parameter counts.",
    )

    def check(self, width: int, where: dict[str, str]) -> None:
        check_odd_kernel(where["kernel_size"], self.kernel_size)
        _check_divisor(width, where, "group_channels", self.group_channels)

    def describe(self) -> str:
        return f"involution {self.kernel_size}"


class DynamicConvMixer(MixerConfig):
    """DyConv, separable: per-sample softmax attention over a bank of depthwise kernels, then pointwise."""

    INHERITED = ("kernel_size",)
    type: Literal["dynamic_conv"]
    kernel_size: int | None = Field(None, description="Depthwise kernel (odd, >= 3); default: the stage's.")
    num_kernels: PosInt = Field(4, description="Kernels in the bank.")
    reduction: PosInt = Field(4, description="Channel reduction of the attention branch.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the kernel attention.")
    projections: bool = Field(
        False,
        description="1x1 convs before and after the mixer, as attention mixers have (qkv, proj): how the "
        "paper's Table 7 test bed reads, by its parameter counts.",
    )

    def check(self, width: int, where: dict[str, str]) -> None:
        check_odd_kernel(where["kernel_size"], self.kernel_size)

    def describe(self) -> str:
        return f"{self.type} {self.kernel_size} x{self.num_kernels}"


class ODConvMixer(DynamicConvMixer):
    """ODConv: DyConv plus attentions over the kernel's spatial positions and the channels."""

    type: Literal["odconv"]


class OutlookAttentionMixer(MixerConfig):
    """VOLO's outlook attention (own kernel, 3 in VOLO: not the stage's large kernel)."""

    type: Literal["outlook_attention"]
    kernel_size: int = Field(3, description="Window of the outlook attention (odd, >= 3).")
    head_dim: PosInt = Field(32, description="Channels per head; heads = width / head_dim.")
    stride: PosInt = Field(1, description="Stride of the attention grid (VOLO's first stage: 2).")

    def check(self, width: int, where: dict[str, str]) -> None:
        check_odd_kernel(_own_field(where, "kernel_size"), self.kernel_size)
        _check_heads(width, where, self.head_dim)

    def describe(self) -> str:
        return f"outlook_attention {self.kernel_size}"


# The registry's schema side: every mixer a spec may name. builder/mixers.py has one builder per entry.
MIXER_CONFIGS: tuple[type[MixerConfig], ...] = (
    DilatedRepConvMixer,
    DWConvMixer,
    ContMixConfig,
    ContMixBlockConfig,
    IdentityMixer,
    NeighborhoodAttentionMixer,
    WindowAttentionMixer,
    InvolutionMixer,
    DynamicConvMixer,
    ODConvMixer,
    OutlookAttentionMixer,
)
MIXER_TYPES: tuple[str, ...] = tuple(typing.get_args(cls.model_fields["type"].annotation)[0] for cls in MIXER_CONFIGS)

Mixer = Annotated[
    typing.Union[MIXER_CONFIGS],  # noqa: UP007 (a union built from the tuple above)
    Field(discriminator="type", description="The token mixer: `type` plus its own arguments."),
]
