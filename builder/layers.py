"""Small layers shared by OverLoCK blocks (ARCHITECTURE.md sections 3 and 4).

Each layer computes exactly what the reference computes (same op order where rounding could
differ), because the presets must reproduce the published models' outputs for the same weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..archspec import DILATED_REPCONV_BRANCHES
from ..kernels.depthwise import depthwise_conv2d


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

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with GRN(x) = x * scale + shift; scale (B, C, 1, 1), shift (1, C, 1, 1)."""
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            energy = torch.linalg.vector_norm(x, ord=2, dim=(-1, -2), keepdim=True)
        else:
            # vector_norm over H, W of channels_last data is 3-25x slower than a sum of squares; the
            # floor keeps sqrt's gradient finite for an all-zero map (its energy stays ~1e-15, not 0).
            energy = x.square().sum(dim=(-1, -2), keepdim=True).clamp_min(1e-30).sqrt()
        normed = energy / (energy.mean(dim=1, keepdim=True) + 1e-6)
        return torch.addcmul(torch.ones_like(normed), self.gamma, normed), self.beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x + beta + gamma * x * normed, written as x * (1 + gamma * normed) + beta: one pass over x
        # instead of three (the per-channel factor is tiny).
        scale, shift = self.coefficients(x)
        return torch.addcmul(shift, x, scale)


class LayerScale(nn.Module):
    """Per-channel affine scale, w * x + b, stored as a depthwise 1x1 conv like the reference.

    The parameters keep the published checkpoints' shapes ((C, 1, 1, 1) and (C,)), but the forward
    is one element-wise multiply-add: PyTorch's CPU backend runs a depthwise 1x1 conv through a
    slow per-channel path (it cost 5-8% of an XT step). fvcore counts no element-wise op, so the
    FLOP count drops by C*H*W per layer scale (well under 0.1% of a preset).
    """

    def __init__(self, channels: int, init_value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class ResDWConv(nn.Conv2d):
    """x + depthwise conv(x): the cheap local mixing in front of every block and inside MLPs.

    In float32/float64 the identity is folded into the kernel's centre tap (one conv, no extra
    pass over x for the sum); in half precision (autocast) the sum stays outside, so the residual
    stream keeps full precision (1 + w in bf16 would round w away).
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = not x.is_meta and torch.is_autocast_enabled(x.device.type)  # meta: shapes only (estimates)
        if x.dtype not in (torch.float32, torch.float64) or autocast:
            return x + self._conv_forward(x, self.weight, self.bias)  # not super(): TorchScript lacks it
        centre = self.kernel_size[0] // 2
        weight = self.weight.clone()
        weight[:, :, centre, centre] += 1.0
        return self._conv_forward(x, weight, self.bias)


def exporting() -> bool:
    """True while torch.export / the ONNX exporter trace the model (sizes may be symbolic then).

    Eager runs (and fvcore's FLOP tracer) keep the plain kernels; the export paths below compute the
    same values with operations whose sizes follow the input instead of being frozen into the graph.
    """
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


_size_generic_trace = False


@contextmanager
def size_generic_trace() -> Iterator[None]:
    """While active, `torch.jit.trace` records sizes as computations on the input's shape.

    A plain trace (fvcore's FLOP counter) freezes every size-dependent choice at the traced size;
    inside this context ContMix computes its mixing size with tensor ops and always takes the
    resize path (the identity at an unchanged size), and resolution changes between levels are
    always recorded, so one TorchScript trace serves every input size (`overlock export --format
    torchscript --dynamic-size`, which checks this at other sizes).
    """
    global _size_generic_trace
    previous, _size_generic_trace = _size_generic_trace, True
    try:
        yield
    finally:
        _size_generic_trace = previous


def generic_trace() -> bool:
    """True while `size_generic_trace` is active and a jit trace is being recorded."""
    return _size_generic_trace and torch.jit.is_tracing()


def pooling_matrix(length: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, length) averaging weights of adaptive average pooling's bins along one axis.

    Bin i covers [floor(i * L / S), ceil((i + 1) * L / S)), exactly as `nn.AdaptiveAvgPool2d` splits
    it; built from `arange`s so that `length` may be a symbolic size.
    """
    index = torch.arange(bins, device=like.device)
    start = torch.div(index * length, bins, rounding_mode="floor")
    end = torch.div((index + 1) * length + bins - 1, bins, rounding_mode="floor")
    position = torch.arange(length, device=like.device)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def adaptive_avg_pool(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, (height, width))` as two matrix products (exports for any size).

    Equal to the pooling kernel within float rounding (each bin is a weighted sum instead of a sum
    divided once); both sizes of x and the output sizes may be symbolic.
    """
    rows = pooling_matrix(x.shape[-2], height, x)
    cols = pooling_matrix(x.shape[-1], width, x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class RegionPool(nn.Module):
    """ContMix's SxS region centres: adaptive average pooling that exports for every input size.

    `nn.AdaptiveAvgPool2d` exports to ONNX as a fixed AveragePool whose window is computed from the
    traced size, so the graph only fits that size. Eagerly this runs the pooling kernel; under
    torch.export / ONNX export it runs `adaptive_avg_pool`, whose bins follow the input. No
    parameters, so state dicts are unchanged.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():
            return adaptive_avg_pool(x, self.size, self.size)
        return F.adaptive_avg_pool2d(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


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
            return depthwise_conv2d(x, self.lk.weight, self.lk.bias)
        if not any(bn.training for bn in self._norms()) and not torch.jit.is_tracing():
            # Eval-mode BNs are affine maps: fold them and the branches on the fly (as reparameterize
            # does), so the training form infers at the cost of the deploy form. Not while tracing:
            # fvcore's FLOP count of the training form counts every branch, as the published one.
            kernel, bias = self.merged_kernel()
            return depthwise_conv2d(x, kernel, bias)
        out = self.lk_bn(depthwise_conv2d(x, self.lk.weight))
        for branch in self.branches.values():
            out = out + branch.bn(depthwise_conv2d(x, branch.conv.weight, dilation=branch.conv.dilation[0]))
        return out

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [self.lk_bn, *(branch.bn for branch in self.branches.values())]

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single KxK kernel and bias equal to the eval-mode training form (differentiable)."""
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
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every BN and every dilated branch into `lk` (in place)."""
        if self.deployed:
            return
        kernel, bias = self.merged_kernel()
        merged = nn.Conv2d(
            kernel.shape[0], kernel.shape[0], self.kernel_size, padding=self.kernel_size // 2, groups=kernel.shape[0]
        ).to(kernel.device, kernel.dtype)
        merged.weight.copy_(kernel)
        merged.bias.copy_(bias)
        self.lk = merged
        del self.lk_bn, self.branches
