"""The two OverLoCK blocks and the ContMix token mixer (ARCHITECTURE.md sections 3 and 4)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..archspec import BlockStage, FocusStage
from .layers import (
    GRN,
    ConvMLP,
    DilatedRepConv,
    DropPath,
    LayerScale,
    RegionPool,
    ResDWConv,
    SqueezeExcite,
    adaptive_avg_pool,
    block_norm,
    conv_bn,
    exporting,
)


def residual(
    skip: torch.Tensor, branch: torch.Tensor, scale: nn.Module | None, drop: DropPath, res_scale: bool
) -> torch.Tensor:
    """LS(skip) + drop(branch) with residual scaling (reference), else skip + drop(LS(branch))."""
    if scale is None:
        return skip + drop(branch)
    return scale(skip) + drop(branch) if res_scale else skip + drop(scale(branch))


class BasicBlock(nn.Module):
    """Base-Net / Overview-Net block: DilatedRepConv + SE, then a GRN MLP."""

    def __init__(
        self, stage: BlockStage, drop_path: float, *, norm: str, res_scale: bool, deploy: bool = False
    ) -> None:
        super().__init__()
        width = stage.width
        self.res_scale = res_scale
        self.dwconv = ResDWConv(width)
        self.norm = block_norm(norm, width)
        self.large_kernel = DilatedRepConv(width, stage.kernel_size, deploy)
        self.bn = nn.BatchNorm2d(width)
        self.se = SqueezeExcite(width)
        self.mlp = ConvMLP(width, int(width * stage.mlp_ratio), width)
        self.drop_path = DropPath(drop_path)
        self.layer_scale = LayerScale(width, stage.layer_scale) if stage.layer_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        y = self.mlp(self.se(self.bn(self.large_kernel(self.norm(x)))))
        return residual(x, y, self.layer_scale, self.drop_path, self.res_scale)


class ContMix(nn.Module):
    """Context-mixing dynamic convolution.

    Each token's kernels come from its affinity to SxS region centres of the context: queries from
    the feature part of the normed input, keys from the pooled context part; a shared 1x1 conv turns
    the S*S affinities into the logits of a small and a large kernel, which (with relative position
    biases, softmax) aggregate the value's neighbourhoods through `kernels.contmix`.
    """

    def __init__(self, width: int, context_width: int, stage: FocusStage) -> None:
        super().__init__()
        self.width = width
        self.kernel_size = stage.kernel_size
        self.small_kernel_size = stage.small_kernel_size
        self.heads = 2 * stage.groups
        self.scale = (width // self.heads) ** -0.5
        self.contmix_backend = "auto"
        self.query = conv_bn(width, width // 2)
        # Keys: the SxS region centres of the context part.
        self.key = nn.Sequential(
            OrderedDict(
                pool=RegionPool(stage.region_centers),
                **dict(conv_bn(context_width, width // 2).named_children()),
            )
        )
        self.kernel_proj = nn.Conv2d(stage.region_centers**2, self.small_kernel_size**2 + self.kernel_size**2, 1)
        self.rpb_small = nn.Parameter(
            torch.zeros(self.heads, 2 * self.small_kernel_size - 1, 2 * self.small_kernel_size - 1)
        )
        self.rpb_large = nn.Parameter(torch.zeros(self.heads, 2 * self.kernel_size - 1, 2 * self.kernel_size - 1))

    def mixing_size(self, height: int, width: int) -> tuple[int, int]:
        """Maps smaller than the large kernel are mixed at an upscaled size (reference behaviour).

        The reference: the short side becomes K and the long side int(K / short * long) when the
        short side is below K; otherwise the size is kept. Written branch-free, with 0/1 indicators
        from integer min/max, so that under torch.export (symbolic height and width) the choice is
        part of the graph, which then serves every input size, instead of a guard on the size.
        With plain ints it computes the same numbers (tests compare it with the reference formula).
        """
        k = self.kernel_size

        def step(n):  # 1 if n > 0 else 0, for integers
            return torch.sym_min(1, torch.sym_max(0, n))

        tall = step(height - width + 1) * step(k - width)  # width is the short side and below K
        wide = step(width - height) * step(k - height)  # height is the short side and below K
        up_height = torch.sym_int(k / width * height)
        up_width = torch.sym_int(k / height * width)
        return (
            torch.sym_max(height, torch.sym_max(k * wide, up_height * tall)),
            torch.sym_max(width, torch.sym_max(k * tall, up_width * wide)),
        )

    def forward(self, z: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """z: fused features (B, d, H, W) = the values; normed: LN(cat(x, P)) for queries and keys."""
        height, width = z.shape[-2:]
        if torch.jit.is_tracing():  # jit traces (TorchScript, fvcore's FLOP counter) see sizes as tensors
            height, width = int(height), int(width)
        size = self.mixing_size(height, width)
        # Exported graphs always take the resize path: at an unchanged size it is the identity, and
        # the graph then serves every input size (eager runs skip it when it is not needed).
        resize = exporting() or size != (height, width)
        if resize:
            z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            normed = F.interpolate(normed, size=size, mode="bilinear", align_corners=False)
        batch, d = z.shape[:2]
        h, w = size
        heads = self.heads
        query = self.query(normed[:, :d]) * self.scale
        key = self.key(normed[:, d:])
        query = query.reshape(batch, heads, -1, h * w)
        key = key.reshape(batch, heads, -1, key.shape[-2] * key.shape[-1])
        affinity = torch.einsum("bgcn,bgcl->bgnl", query, key)
        logits = self.kernel_proj(affinity.permute(0, 3, 1, 2))  # the S*S axis as channels
        logits = logits.permute(0, 2, 3, 1).reshape(batch, heads, h, w, -1)
        small, large = logits.split([self.small_kernel_size**2, self.kernel_size**2], dim=-1)
        value = z.reshape(batch, 2, heads, d // (2 * heads), h, w).permute(1, 0, 2, 4, 5, 3)
        out_small = kernels.contmix(
            small, self.rpb_small, value[0], self.small_kernel_size, backend=self.contmix_backend
        )
        out_large = kernels.contmix(large, self.rpb_large, value[1], self.kernel_size, backend=self.contmix_backend)
        out = torch.cat([out_small, out_large], dim=1).permute(0, 1, 4, 2, 3).reshape(batch, d, h, w)
        if exporting():
            out = adaptive_avg_pool(out, height, width)
        elif resize:
            out = F.adaptive_avg_pool2d(out, (height, width))
        return out


class DynamicBlock(nn.Module):
    """Focus-Net block: fuses features with the context prior P, mixes with ContMix, then an MLP.

    Returns cat(x, P) (width + context width channels); the stage splits it for the next block.
    """

    def __init__(
        self,
        stage: FocusStage,
        context_width: int,
        drop_path: float,
        *,
        reinject_prior: bool,
        gate: bool,
        norm: str,
        res_scale: bool,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        d, c = stage.width, context_width
        full = d + c
        self.res_scale = res_scale
        # P = alpha * P + beta * P0: re-injects the initial prior (absent on the first Focus-Net block).
        self.alpha = LayerScale(c, 1.0) if reinject_prior else None
        self.beta = LayerScale(c, 1.0) if reinject_prior else None
        self.dwconv1 = ResDWConv(full)
        self.norm1 = block_norm(norm, full)
        # "fusion": merges features and prior into z, the values of ContMix and input of gate and LePE.
        self.fusion = nn.Sequential(
            OrderedDict(
                dwconv=nn.Conv2d(full, full, 3, padding=1, groups=full),
                bn=nn.BatchNorm2d(full),
                act=nn.GELU(),
                proj=nn.Conv2d(full, d, 1),
                grn=GRN(d),
            )
        )
        self.gate = conv_bn(d, d) if gate else None  # SiLU(BN(conv1x1(z)))
        if self.gate is not None:
            self.gate.add_module("act", nn.SiLU())
        self.lepe = nn.Sequential(OrderedDict(conv=DilatedRepConv(d, stage.kernel_size, deploy), bn=nn.BatchNorm2d(d)))
        self.contmix = ContMix(d, c, stage)
        self.out_proj = conv_bn(d, d)
        self.se = SqueezeExcite(d)
        self.proj = nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(d), conv=nn.Conv2d(d, full, 1)))
        self.dwconv2 = ResDWConv(full)
        self.norm2 = block_norm(norm, full)
        self.mlp = ConvMLP(full, int(d * stage.mlp_ratio), full)
        self.ls1 = LayerScale(full, stage.layer_scale) if stage.layer_scale is not None else None
        self.ls2 = LayerScale(full, stage.layer_scale) if stage.layer_scale is not None else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, prior: torch.Tensor, prior0: torch.Tensor) -> torch.Tensor:
        if self.alpha is not None:
            prior = self.alpha(prior) + self.beta(prior0)
        f = self.dwconv1(torch.cat([x, prior], dim=1))
        identity = f
        normed = self.norm1(f)
        z = self.fusion(normed)
        gate = self.gate(z) if self.gate is not None else None
        lepe = self.lepe(z)
        out = self.out_proj(self.contmix(z, normed)) + lepe
        out = self.se(out)
        if gate is not None:
            out = gate * out
        out = self.proj(out)
        f = residual(identity, out, self.ls1, self.drop_path, self.res_scale)
        f = self.dwconv2(f)
        return residual(f, self.mlp(self.norm2(f)), self.ls2, self.drop_path, self.res_scale)
