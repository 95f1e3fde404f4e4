"""Small layers shared by OverLoCK blocks (ARCHITECTURE.md sections 3 and 4).

Each layer computes exactly what the reference computes (same op order where rounding could
differ), because the presets must reproduce the published models' outputs for the same weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..archspec import DILATED_REPCONV_BRANCHES


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels only, on NCHW tensors (eps 1e-6 as in the reference)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def block_norm(kind: str, channels: int) -> nn.Module:
    """The norm in front of token mixers and MLPs: `norm.block` of the spec."""
    return LayerNorm2d(channels) if kind == "layernorm" else nn.BatchNorm2d(channels)


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2): rescales channels by their relative L2 energy."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = torch.norm(x, p=2, dim=(-1, -2), keepdim=True)
        normed = energy / (energy.mean(dim=1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.beta, self.gamma, x * normed)


class LayerScale(nn.Module):
    """Per-channel affine scale, w * x + b, stored as a depthwise 1x1 conv like the reference.

    The conv form keeps the published checkpoints' parameter shapes ((C, 1, 1, 1) and (C,)) and
    is what fvcore counts in the reference FLOPs.
    """

    def __init__(self, channels: int, init_value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, groups=x.shape[1])


class ResDWConv(nn.Conv2d):
    """x + depthwise conv(x): the cheap local mixing in front of every block and inside MLPs."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class SqueezeExcite(nn.Module):
    """Channel attention: sigmoid(fc2(GELU(fc1(avgpool(x))))) * x, hidden width max(16, C // 8)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(16, channels // 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(self.pool(x)))))


class ConvMLP(nn.Module):
    """conv1x1 -> GELU -> (y + dwconv3x3 y) -> GRN -> conv1x1: the MLP of every OverLoCK block."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_channels, hidden, 1)
        self.act = nn.GELU()
        self.dwconv = ResDWConv(hidden)
        self.grn = GRN(hidden)
        self.fc2 = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.grn(self.dwconv(self.act(self.fc1(x)))))


class Mlp(nn.Module):
    """conv1x1 -> GELU -> conv1x1: the vanilla FFN of the paper's baselines (ViT/ConvNeXt style)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_channels, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> nn.Sequential:
    """conv (no bias) + BN, the reference's downsampling and projection unit."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels)))


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN into the conv in front of it (conv without bias)."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class DilatedRepConv(nn.Module):
    """UniRepLKNet's dilated re-parameterisable depthwise large-kernel conv.

    Training form: a KxK depthwise conv + BN plus parallel dilated small depthwise convs, each with
    its own BN, summed. `reparameterize()` folds it into one KxK depthwise conv with bias whose
    eval output is identical; `deploy=True` builds that form directly.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.lk = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=deploy)
        if deploy:
            return
        self.lk_bn = nn.BatchNorm2d(channels)
        self.branches = nn.ModuleDict()
        for k, dilation in DILATED_REPCONV_BRANCHES[kernel_size]:
            padding = (dilation * (k - 1) + 1) // 2
            conv = nn.Conv2d(channels, channels, k, padding=padding, dilation=dilation, groups=channels, bias=False)
            self.branches[f"k{k}_d{dilation}"] = nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(channels)))

    @property
    def deployed(self) -> bool:
        return not hasattr(self, "branches")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.lk(x)
        out = self.lk_bn(self.lk(x))
        for branch in self.branches.values():
            out = out + branch(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every BN and every dilated branch into `lk` (in place)."""
        if self.deployed:
            return
        kernel, bias = fuse_bn(self.lk.weight, self.lk_bn)
        for branch in self.branches.values():
            small, small_bias = fuse_bn(branch.conv.weight, branch.bn)
            dilation = branch.conv.dilation[0]
            span = dilation * (small.shape[-1] - 1) + 1
            spread = small.new_zeros(small.shape[0], 1, span, span)
            spread[:, :, ::dilation, ::dilation] = small
            pad = (self.kernel_size - span) // 2
            kernel = kernel + F.pad(spread, [pad] * 4)
            bias = bias + small_bias
        merged = nn.Conv2d(
            kernel.shape[0], kernel.shape[0], self.kernel_size, padding=self.kernel_size // 2, groups=kernel.shape[0]
        ).to(kernel.device, kernel.dtype)
        merged.weight.copy_(kernel)
        merged.bias.copy_(bias)
        self.lk = merged
        del self.lk_bn, self.branches
