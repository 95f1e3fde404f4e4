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


class IdentityMixer(MixerConfig):
    """No token mixing (the block keeps its other parts): the ablation floor."""

    type: Literal["identity"]


# The registry's schema side: every mixer a spec may name. builder/mixers.py has one builder per entry.
MIXER_CONFIGS: tuple[type[MixerConfig], ...] = (DilatedRepConvMixer, DWConvMixer, ContMixConfig, IdentityMixer)
MIXER_TYPES: tuple[str, ...] = tuple(typing.get_args(cls.model_fields["type"].annotation)[0] for cls in MIXER_CONFIGS)

Mixer = Annotated[
    typing.Union[MIXER_CONFIGS],  # noqa: UP007 (a union built from the tuple above)
    Field(discriminator="type", description="The token mixer: `type` plus its own arguments."),
]
