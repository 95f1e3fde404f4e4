"""The OverLoCK blocks, assembled from the parts a spec's `block` names (ARCHITECTURE.md sections 3, 4).

Two block structures exist, as in the paper: the basic block (Base-Net, Overview-Net, pyramid
stages, static Focus-Net stages) and the dynamic block (Focus-Net). Which token mixer, FFN, norm,
SE and local conv fill them comes from the spec through the registries in `mixers.py`; with the
defaults they are exactly the published blocks (same parameters, same names, same outputs).
"""

from __future__ import annotations

import torch
from torch import nn

from ..archspec import Block
from .contmix import ContMix, fusion_layer, gate_layer, lepe_layer, output_projection
from .layers import (
    DropPath,
    LayerScale,
    ResDWConv,
    SqueezeExcite,
    block_norm,
    conv_bn,
    exporting,
    hooked,
    large_kernel_bn,
    recompute_saved,
)
from .mixers import FFNS, MixerPlace, build_mixer

__all__ = ["BasicBlock", "ContMix", "DynamicBlock", "StaticFocusBlock"]


def residual(
    skip: torch.Tensor, branch: torch.Tensor, scale: nn.Module | None, drop: DropPath, res_scale: bool
) -> torch.Tensor:
    """LS(skip) + drop(branch) with residual scaling (reference), else skip + drop(LS(branch))."""
    if scale is None:
        return skip + drop(branch)
    # scale(skip) is a fresh tensor that no backward needs: the sum goes into it in place.
    return scale(skip).add_(drop(branch)) if res_scale else skip + drop(scale(branch))


def _maybe(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if module is None else module(x)


class BasicBlock(nn.Module):
    """x = local_conv(x); x = LS(x) + FFN(SE(BN(mixer(norm(x))))): Base-Net / Overview-Net block.

    With the default parts: DilatedRepConv + SE, then the ConvFFN (conv1x1, GELU, residual dwconv3x3,
    GRN, conv1x1). The mixer keeps the module name `large_kernel` (its name in saved models).
    """

    def __init__(
        self,
        width: int,
        hidden: int,
        block: Block,
        layer_scale: float | None,
        drop_path: float,
        *,
        res_scale: bool,
        deploy: bool = False,
        index: int = 0,
    ) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.dwconv = ResDWConv(width) if block.local_conv else None
        self.norm = block_norm(block.norm, width)
        self.large_kernel = build_mixer(block.mixer, MixerPlace(width, deploy=deploy, index=index))
        self.bn = nn.BatchNorm2d(width)
        self.se = SqueezeExcite(width) if block.se else None
        self.mlp = FFNS[block.ffn](width, hidden, width)
        self.drop_path = DropPath(drop_path)
        self.layer_scale = LayerScale(width, layer_scale) if layer_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _maybe(self.dwconv, x)
        mixed = large_kernel_bn(self.large_kernel, self.bn, self.norm(x))
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing() or exporting()
        if self.se is None or hooked(self.se) or traced:
            y = self.mlp(_maybe(self.se, mixed))
        else:
            # SE's output, the FFN's input, is SE's input times its gate, both kept for the
            # product's backward: recomputed in the backward instead of kept a third time.
            excited, recipe = self.se(mixed, with_recipe=True)
            with recompute_saved(excited, recipe):
                y = self.mlp(excited)
        return residual(x, y, self.layer_scale, self.drop_path, self.res_scale)


class StaticFocusBlock(BasicBlock):
    """A basic block in Focus-Net (the paper's static DDS model): runs on cat(x, P), returns it.

    The prior is re-injected in front of it as in a dynamic block (P = alpha * P + beta * P0); it
    has no gate and no LePE.
    """

    def __init__(
        self, width: int, context_width: int, hidden: int, block: Block, *args, reinject_prior: bool, **kwargs
    ) -> None:
        super().__init__(width + context_width, hidden, block, *args, **kwargs)
        self.alpha = LayerScale(context_width, 1.0) if reinject_prior else None
        self.beta = LayerScale(context_width, 1.0) if reinject_prior else None

    def forward(self, x: torch.Tensor, prior: torch.Tensor, prior0: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.alpha is not None:
            prior = self.alpha(prior) + self.beta(prior0)
        return super().forward(torch.cat([x, prior], dim=1))


class DynamicBlock(nn.Module):
    """Focus-Net block: fuses features with the context prior P, mixes (ContMix by default), then an FFN.

    Returns cat(x, P) (width + context width channels); the stage splits it for the next block.
    The mixer keeps the module name `contmix` (its name in saved models), whatever its type.
    """

    def __init__(
        self,
        width: int,
        context_width: int,
        hidden: int,
        block: Block,
        lepe_kernel: int,
        layer_scale: float | None,
        drop_path: float,
        *,
        reinject_prior: bool,
        gate: bool,
        res_scale: bool,
        deploy: bool = False,
        index: int = 0,
    ) -> None:
        super().__init__()
        d, c = width, context_width
        full = d + c
        self.res_scale = res_scale
        # P = alpha * P + beta * P0 (absent on the first Focus-Net block); names as in saved models.
        self.alpha = LayerScale(c, 1.0) if reinject_prior else None
        self.beta = LayerScale(c, 1.0) if reinject_prior else None
        self.dwconv1 = ResDWConv(full) if block.local_conv else None
        self.norm1 = block_norm(block.norm, full)
        # "fusion": merges features and prior into z, the values of the mixer and input of gate and LePE.
        self.fusion = fusion_layer(full, d)
        self.gate = gate_layer(d) if gate else None  # SiLU(BN(conv1x1(z)))
        self.lepe = lepe_layer(d, lepe_kernel, deploy)
        self.guided = block.mixer.guided
        self.contmix = build_mixer(block.mixer, MixerPlace(d, c, deploy=deploy, index=index))
        self.out_proj = conv_bn(d, d)
        self.se = SqueezeExcite(d) if block.se else None
        self.proj = output_projection(d, full)
        self.dwconv2 = ResDWConv(full) if block.local_conv else None
        self.norm2 = block_norm(block.norm, full)
        self.mlp = FFNS[block.ffn](full, hidden, full)
        self.ls1 = LayerScale(full, layer_scale) if layer_scale is not None else None
        self.ls2 = LayerScale(full, layer_scale) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, prior: torch.Tensor, prior0: torch.Tensor) -> torch.Tensor:
        if self.alpha is not None:
            prior = self.alpha(prior) + self.beta(prior0)
        f = _maybe(self.dwconv1, torch.cat([x, prior], dim=1))
        identity = f
        normed = self.norm1(f)
        z = self.fusion(normed)
        gate = self.gate(z) if self.gate is not None else None
        lepe = self.lepe(z)
        mixed = self.contmix(z, normed) if self.guided else self.contmix(z)
        out = _maybe(self.se, self.out_proj(mixed) + lepe)
        if gate is not None:
            out = gate * out
        out = self.proj(out)
        f = residual(identity, out, self.ls1, self.drop_path, self.res_scale)
        f = _maybe(self.dwconv2, f)
        return residual(f, self.mlp(self.norm2(f)), self.ls2, self.drop_path, self.res_scale)
