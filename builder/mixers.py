"""The registries of block parts: token mixers, FFNs, stems and downsampling, one small builder each.

A spec names parts by string (`block.mixer.type`, `block.ffn`, `stem.type`, `downsample.type`);
archspec validates the names and arguments (`archspec/mixers.py` for mixers), and the functions
here turn a validated config into a module. To add a token mixer: a config class in
archspec/mixers.py, then

    @register_mixer("my_mixer")
    def _my_mixer(config: MyMixerConfig, place: MixerPlace) -> nn.Module:
        return MyMixer(place.width, config.kernel_size)

A mixer module maps (B, C, H, W) to the same shape, for any H, W (maps smaller than its kernel
included). A context-guided mixer (`config.guided`) is called as `mixer(z, normed)` inside a
Focus-Net dynamic block (see `blocks.ContMix`); every other mixer as `mixer(x)`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..archspec import MixerConfig
from .contmix import ContMix, ContMixBlock
from .layers import GELU, ConvMLP, DilatedRepConv, FoldingSequential, Mlp, block_norm, conv_bn, exporting
from .mixers_attention import (
    DynamicConv,
    Involution,
    NeighborhoodAttention,
    ODConv,
    OutlookAttention,
    WindowAttention,
    with_projections,
)


@dataclass(frozen=True)
class MixerPlace:
    """Where a mixer is built: what a builder may need beyond its own config."""

    width: int  # channels the mixer maps (C of its input and output)
    context_width: int = 0  # channels of the context prior (guided mixers in Focus-Net only)
    deploy: bool = False  # build the re-parameterised form where a mixer has one
    index: int = 0  # the block's index within its stage (e.g. shifted windows on odd blocks)


MixerBuilder = Callable[[MixerConfig, MixerPlace], nn.Module]
MIXERS: dict[str, MixerBuilder] = {}


def register_mixer(name: str) -> Callable[[MixerBuilder], MixerBuilder]:
    """Decorator: the builder of the mixer a spec names `name` (archspec/mixers.py validates it)."""

    def add(builder: MixerBuilder) -> MixerBuilder:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is registered twice")
        MIXERS[name] = builder
        return builder

    return add


def build_mixer(config: MixerConfig, place: MixerPlace) -> nn.Module:
    return MIXERS[config.type](config, place)


@register_mixer("dilated_repconv")
def _dilated_repconv(config: MixerConfig, place: MixerPlace) -> nn.Module:
    return DilatedRepConv(place.width, config.kernel_size, place.deploy)


@register_mixer("dwconv")
def _dwconv(config: MixerConfig, place: MixerPlace) -> nn.Module:
    # No bias: every block follows its mixer with a BN (basic) or a conv + BN (dynamic).
    k = config.kernel_size
    return nn.Conv2d(place.width, place.width, k, padding=k // 2, groups=place.width, bias=False)


@register_mixer("contmix")
def _contmix(config: MixerConfig, place: MixerPlace) -> nn.Module:
    key_width = place.context_width if config.guided else place.width
    return ContMix(
        place.width, key_width, config.kernel_size, config.small_kernel_size, config.groups, config.region_centers
    )


@register_mixer("contmix_block")
def _contmix_block(config: MixerConfig, place: MixerPlace) -> nn.Module:
    parts = {name: getattr(config, name) for name in ("fusion", "gate", "lepe", "projections")}
    args = (config.kernel_size, config.small_kernel_size, config.groups, config.region_centers)
    return ContMixBlock(place.width, *args, **parts, deploy=place.deploy)


@register_mixer("identity")
def _identity(config: MixerConfig, place: MixerPlace) -> nn.Module:
    return nn.Identity()


# The dynamic token mixers of the paper's Table 7 (builder/mixers_attention.py).
@register_mixer("neighborhood_attention")
def _neighborhood_attention(config: MixerConfig, place: MixerPlace) -> nn.Module:
    heads = place.width // config.head_dim
    return NeighborhoodAttention(
        place.width,
        kernel_size=config.kernel_size,
        heads=heads,
        dilation=config.dilation,
        qkv_bias=config.qkv_bias,
        rel_pos_bias=config.rel_pos_bias,
    )


@register_mixer("window_attention")
def _window_attention(config: MixerConfig, place: MixerPlace) -> nn.Module:
    shift = config.shift and place.index % 2 == 1  # Swin: regular, then shifted windows
    heads = place.width // config.head_dim
    return WindowAttention(
        place.width, window_size=config.kernel_size, heads=heads, shift=shift, qkv_bias=config.qkv_bias
    )


@register_mixer("involution")
def _involution(config: MixerConfig, place: MixerPlace) -> nn.Module:
    mixer = Involution(
        place.width, kernel_size=config.kernel_size, group_channels=config.group_channels, reduction=config.reduction
    )
    return with_projections(mixer, place.width) if config.projections else mixer


@register_mixer("dynamic_conv")
def _dynamic_conv(config: MixerConfig, place: MixerPlace) -> nn.Module:
    args = dict(num_kernels=config.num_kernels, reduction=config.reduction, temperature=config.temperature)
    mixer = DynamicConv(place.width, kernel_size=config.kernel_size, **args)
    return with_projections(mixer, place.width) if config.projections else mixer


@register_mixer("odconv")
def _odconv(config: MixerConfig, place: MixerPlace) -> nn.Module:
    args = dict(num_kernels=config.num_kernels, reduction=config.reduction, temperature=config.temperature)
    mixer = ODConv(place.width, kernel_size=config.kernel_size, **args)
    return with_projections(mixer, place.width) if config.projections else mixer


@register_mixer("outlook_attention")
def _outlook_attention(config: MixerConfig, place: MixerPlace) -> nn.Module:
    heads = place.width // config.head_dim
    return OutlookAttention(place.width, kernel_size=config.kernel_size, heads=heads, stride=config.stride)


# FFNs: (in channels, hidden, out channels) -> module.
FFNS: dict[str, Callable[[int, int, int], nn.Module]] = {"conv_ffn": ConvMLP, "mlp": Mlp}


# Stems: (in channels, hidden width, out channels, norm) -> module at 1/4 resolution.
class Stem(FoldingSequential):
    """The stem's layers in order; on CPU the input first goes to channels_last memory layout.

    Every later layer keeps the layout it is given, and PyTorch's CPU convolutions (oneDNN) are
    much faster on channels_last data for the depthwise and full 3x3 convs of this family (a 3x3
    depthwise conv on 224 x 56 x 56 maps: ~7x; the stem's convs 1.4-4x), while the 1x1 convs and
    element-wise ops run at the same speed either way. With an NCHW image the network starts in
    NCHW, and every concatenation, upsampling and reshape that meets an NCHW tensor drops back
    to it. The copy costs one pass over a 3-channel image. Measured on XT, batch 8, 224, one
    thread (`benchmarks/layers_ab.py`, round 3 of benchmarks/results/issue10_speed.md): inference
    and training step 1.04x each.
    The values are the same convolutions', within float rounding. Not on other devices (nothing
    measured there), nor while a graph is traced or exported (a layout is no part of the model).
    Same module names and state dict as the plain `nn.Sequential` it replaces; in eval mode its
    BNs fold into the convs (`FoldingSequential`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4 and not (torch.jit.is_tracing() or exporting()):
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def conv_stem(in_channels: int, hidden: int, out_channels: int, norm: str) -> nn.Sequential:
    """Four 3x3 convs (two of stride 2) to 1/4 resolution (OverLoCK)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    plan = [(in_channels, hidden, 2), (hidden, hidden, 1), (hidden, out_channels, 2), (out_channels, out_channels, 1)]
    for i, (cin, cout, stride) in enumerate(plan, start=1):
        layers[f"conv{i}"] = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(cout)
        if i < len(plan):
            layers[f"act{i}"] = GELU()
    return Stem(layers)


def patch_stem(in_channels: int, hidden: int, out_channels: int, norm: str) -> nn.Sequential:
    """Non-overlapping 4x4 patch embedding (kernel = stride) + norm (Swin, ConvNeXt)."""
    return Stem(OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 4, 4), norm=block_norm(norm, out_channels)))


STEMS: dict[str, Callable[[int, int, int, str], nn.Module]] = {"conv": conv_stem, "patch": patch_stem}


# Downsampling: (in channels, out channels, norm) -> module at 1/2 resolution.
def conv_downsample(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """conv3x3 s2 (no bias) + BN (OverLoCK)."""
    return conv_bn(in_channels, out_channels, 3, 2)


def patch_downsample(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """norm + non-overlapping 2x2 conv s2: patch merging."""
    return nn.Sequential(
        OrderedDict(norm=block_norm(norm, in_channels), conv=nn.Conv2d(in_channels, out_channels, 2, 2))
    )


DOWNSAMPLES: dict[str, Callable[[int, int, str], nn.Module]] = {"conv": conv_downsample, "patch": patch_downsample}
