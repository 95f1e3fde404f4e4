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
    ConvMLP,
    DropPath,
    LayerNorm2d,
    LayerScale,
    RecomputedOnce,
    ResDWConv,
    SqueezeExcite,
    block_norm,
    called_with_recipe,
    conv_again,
    conv_bn,
    excited,
    hooked,
    keeping,
    keeping_each,
    large_kernel_batch_normed,
    recording,
)
from .mixers import FFNS, MixerPlace, build_mixer

__all__ = ["BasicBlock", "ContMix", "DynamicBlock", "StaticFocusBlock"]


def residual(
    skip: torch.Tensor,
    branch: torch.Tensor,
    scale: nn.Module | None,
    drop: DropPath,
    res_scale: bool,
    remade: RecomputedOnce | None = None,
) -> torch.Tensor:
    """LS(skip) + drop(branch) with residual scaling (reference), else skip + drop(LS(branch)).

    `remade`: the recipe of `skip` (`local_conv`), for the LayerScale that keeps it."""
    if scale is None:
        return skip + drop(branch)
    if not res_scale:
        return skip + drop(scale(branch))
    with keeping(skip, remade):
        scaled = scale(skip)
    # scale(skip) is a fresh tensor that no backward needs: the sum goes into it in place.
    return scaled.add_(drop(branch))


def local_conv(
    conv: nn.Module | None, x: torch.Tensor, input_recipe: RecomputedOnce | None = None
) -> tuple[torch.Tensor, RecomputedOnce | None]:
    """conv(x) (x itself without a local conv), and the recipe that remakes it in the backward.

    The output is the block's input to its norm and its skip: the norm and the LayerScale on the
    skip both keep it for their backward, a full map per block held from forward to backward.
    The conv keeps its own input anyway (for its weight gradient), so the backward remakes the
    output from that: one 3x3 depthwise conv per block, once for both (`RecomputedOnce`), the
    same op on the same input, so bit for bit the same gradients. Not when hooks watch the conv
    (one may have changed its output), nor in traced or compiled graphs. `input_recipe`: x's,
    where the caller remakes x too (the conv then keeps that instead of x).
    """
    if conv is None:
        return x, input_recipe
    with keeping(x, input_recipe):
        out = conv(x)
    if hooked(conv) or recording() or not torch.is_grad_enabled():  # without a graph nothing is kept
        return out, None
    return out, conv_again(conv, x, input_recipe)


def normed_recipe(norm: nn.Module, x: torch.Tensor, remade: RecomputedOnce | None) -> RecomputedOnce | None:
    """The recipe of norm(x), for a norm without running state whose output the ops after it keep
    (the large kernel; the FFN's first 1x1 conv; the fusion's conv and ContMix's query and key
    projections): a LayerNorm more in the backward for one map fewer held. It reads x's recipe
    where x is remade (`remade`), else x, which the norm keeps anyway."""
    if not isinstance(norm, LayerNorm2d) or hooked(norm) or recording() or not torch.is_grad_enabled():
        return None
    source = remade if remade is not None else (lambda: x)
    return RecomputedOnce(lambda: norm.forward(source()))


def feed_forward(mlp: nn.Module, x: torch.Tensor, recipe: RecomputedOnce | None) -> torch.Tensor:
    """mlp(x), telling a ConvMLP the recipe of x (its hidden map's recipe then reads x through it)."""
    if recipe is not None and isinstance(mlp, ConvMLP):
        return mlp(x, input_recipe=recipe)
    return mlp(x)


def _sum_again(a: RecomputedOnce | None, b: RecomputedOnce | None) -> RecomputedOnce | None:
    """The recipe of a + b from theirs (None unless both have one)."""
    return None if a is None or b is None else RecomputedOnce(lambda: a() + b())


def _product_again(
    factor: torch.Tensor, factor_again: RecomputedOnce | None, recipe: RecomputedOnce | None
) -> RecomputedOnce | None:
    """The recipe of factor * x from x's, and factor's where it has one (else factor itself, which
    the product keeps then)."""
    if recipe is None:
        return None
    if factor_again is None:
        return RecomputedOnce(lambda: factor * recipe())
    return RecomputedOnce(lambda: factor_again() * recipe())


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
        x, remade = local_conv(self.dwconv, x)
        with keeping(x, remade):
            normed = self.norm(x)
        # The norm's output, BN(mixer) and SE's output, each kept by the op after it (the large
        # kernel, SE's product, the FFN's first 1x1 conv), are remade in the backward: the norm's
        # and the BN's from their inputs, which they keep anyway, SE's from its input and gate,
        # both kept by the product (the first two: 12 MiB per image of a T training step at 224).
        renormed = normed_recipe(self.norm, x, remade)
        with keeping(normed, renormed):
            mixed, again = large_kernel_batch_normed(self.large_kernel, self.bn, normed)
        if self.se is not None:
            mixed, again = excited(self.se, mixed, again)
        with keeping(mixed, again):
            y = feed_forward(self.mlp, mixed, again)
        return residual(x, y, self.layer_scale, self.drop_path, self.res_scale, remade)


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
        identity, remade = local_conv(self.dwconv1, *self._with_prior(x, prior, prior0))
        with keeping(identity, remade):
            normed = self.norm1(identity)
        renormed = normed_recipe(self.norm1, identity, remade)  # kept by the fusion's conv, the query and key (slices)
        # z (the fusion's GRN output) and the gate (its SiLU output) are remade in the backward too:
        # z from GRN's input and scale, kept by GRN, for the gate's conv, the LePE and ContMix; the
        # gate from its BN's input, for the gate's product.
        z, z_again = called_with_recipe(self.fusion, normed, renormed)
        gate, gate_again = (None, None) if self.gate is None else called_with_recipe(self.gate, z, z_again)
        lepe, lepe_again = called_with_recipe(self.lepe, z, z_again)
        with keeping_each((normed, renormed), (z, z_again)):
            mixed = self.contmix(z, normed) if self.guided else self.contmix(z)
        out = self._projected(mixed, lepe, lepe_again, gate, gate_again)
        f = residual(identity, out, self.ls1, self.drop_path, self.res_scale, remade)
        f, remade = local_conv(self.dwconv2, f)
        with keeping(f, remade):
            normed = self.norm2(f)
        renormed = normed_recipe(self.norm2, f, remade)
        with keeping(normed, renormed):
            y = feed_forward(self.mlp, normed, renormed)
        return residual(f, y, self.ls2, self.drop_path, self.res_scale, remade)

    def _projected(
        self,
        mixed: torch.Tensor,
        lepe: torch.Tensor,
        lepe_again: RecomputedOnce | None,
        gate: torch.Tensor | None,
        gate_again: RecomputedOnce | None,
    ) -> torch.Tensor:
        """proj(gate * SE(out_proj(mixed) + lepe)), the maps in between remade in the backward.

        The sum, SE's output and the gated map are each kept by the op after them (SE's product,
        the gate's, proj's BN), and each is an element-wise pass or two from maps the graph keeps
        anyway (the two BNs' inputs, SE's and the gate's other factors); proj's BN output, kept by
        its conv, is remade from its input. Four maps per block fewer held, a few element-wise
        passes more in the backward.
        """
        projected, again = called_with_recipe(self.out_proj, mixed)
        out, again = projected + lepe, _sum_again(again, lepe_again)
        if self.se is not None:
            out, again = excited(self.se, out, again)
        if gate is not None:
            with keeping_each((gate, gate_again), (out, again)):
                out, again = gate * out, _product_again(gate, gate_again, again)
        return called_with_recipe(self.proj, out, again)[0]

    def _with_prior(
        self, x: torch.Tensor, prior: torch.Tensor, prior0: torch.Tensor
    ) -> tuple[torch.Tensor, RecomputedOnce | None]:
        """cat(x, P), P re-injected where the block does (P = alpha * P + beta * P0), and then the
        recipe of it: x and P are views of the previous block's output, which alpha keeps anyway
        (for its weight gradient), so the local conv keeps the recipe, not a second map of that
        size (a cat and two multiply-adds in the backward; 3.3 MiB per image of a T training step)."""
        if self.alpha is None:
            return torch.cat([x, prior], dim=1), None
        fused = torch.cat([x, self.alpha(prior) + self.beta(prior0)], dim=1)
        if hooked(self.alpha) or hooked(self.beta) or recording() or not torch.is_grad_enabled():
            return fused, None
        return fused, RecomputedOnce(
            lambda: torch.cat([x, self.alpha.forward(prior) + self.beta.forward(prior0)], dim=1)
        )
