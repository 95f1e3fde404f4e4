"""Depthwise convolution with a fast CPU backward, for the large and dilated kernels of DilatedRepConv.

Why. PyTorch's CPU backward of a depthwise convolution runs at under 1 GFLOP/s at one thread for
the large kernels OverLoCK uses (17x17 at 56x56: ~1.3 s for forward+backward at batch 8, against
~30 ms for the forward), and its forward is fast only in some layouts (channels_last for 56- and
112-channel maps, NCHW for 14x14 maps). This operator computes the same three results with fast
primitives:
- forward: `F.conv2d`, on channels_last data for maps of 28x28 and larger (oneDNN's NCHW depthwise
  path is the slow one there);
- input gradient: the same depthwise convolution of the output gradient with the flipped kernel
  (a correlation's adjoint is the convolution with the mirrored kernel);
- weight gradient: per channel, the correlation of the padded input with the output gradient,
  summed over the batch, read at lags 0, d, 2d, ... (d = dilation). Done in the frequency domain:
  one real FFT of the padded input and of the gradient, a product summed over the batch, one
  inverse FFT per channel. Its float32 rounding error is about that of the direct sum (tests
  compare both with a float64 reference).
Only the stride-1, "same"-padded, odd-kernel case OverLoCK uses is covered; `depthwise_conv2d`
falls back to `F.conv2d` (plain autograd) everywhere else: other devices, half dtypes, no grad.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Maps with at least this many positions run in channels_last (measured: 28x28 and 56x56 maps are
# 10-30x faster there at one thread; 14x14 and 7x7 maps are faster in NCHW).
CHANNELS_LAST_MIN_POSITIONS = 28 * 28
# The custom backward is used from this kernel size on (on maps of CHANNELS_LAST_MIN_POSITIONS or
# more): measured at one thread, batch 8, 17x17 at 56x56 forward+backward 2.2 s -> 0.36 s, 15x15 at
# 28x28 0.95 s -> 0.20 s, 13x13 at 14x14 a tie; kernels up to 7x7 (also dilated) lose 1.2-3x, as
# the FFT's cost does not shrink with the kernel while PyTorch's direct backward does.
CUSTOM_BACKWARD_MIN_KERNEL = 13


@functools.lru_cache(maxsize=128)
def fast_fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (pocketfft is fastest on such sizes)."""
    size = n
    while True:
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 1


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] * x.shape[-2] >= CHANNELS_LAST_MIN_POSITIONS:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    padding = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(_fast_layout(x), weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])


def weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """d loss / d weight of a same-padded depthwise conv: (C, 1, K, K), by FFT correlation.

    grad_w[c, i, j] = sum_{b, y, x} grad[b, c, y, x] * xpad[b, c, y + d*i, x + d*j].
    """
    height, width = x.shape[-2:]
    pad = dilation * (kernel_size - 1) // 2
    span = dilation * (kernel_size - 1) + 1
    # Circular correlation of length >= the padded map has no wrap-around for lags < span.
    size = (fast_fft_size(height + 2 * pad), fast_fft_size(width + 2 * pad))
    spectrum_x = torch.fft.rfft2(F.pad(x, [pad] * 4), s=size)
    spectrum_g = torch.fft.rfft2(grad, s=size)
    cross = torch.einsum("bchw,bchw->chw", spectrum_x, spectrum_g.conj())
    del spectrum_x, spectrum_g
    corr = torch.fft.irfft2(cross, s=size)
    return corr[:, :span:dilation, :span:dilation].unsqueeze(1).contiguous()


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dilation):
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        ctx.has_bias = bias is not None
        return _conv(x, weight, bias, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv(grad, weight.flip(-1, -2), None, ctx.dilation)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad, weight.shape[-1], ctx.dilation).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dilation: int = 1
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=dilation*(K-1)//2, dilation=dilation, groups=C), faster on CPU.

    weight (C, 1, K, K) with odd K; the output has x's spatial size.
    """
    if weight.shape[-1] % 2 == 0 or weight.shape[-1] != weight.shape[-2] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d needs a (C, 1, K, K) weight with odd K, got {tuple(weight.shape)}")
    fast = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    # Tracers (fvcore's FLOP count, torch.jit) must see the plain convolution.
    if not fast or torch.is_autocast_enabled("cpu") or torch.jit.is_tracing():
        padding = dilation * (weight.shape[-1] - 1) // 2
        return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _conv(x, weight, bias, dilation)
    large_map = x.shape[-1] * x.shape[-2] >= CHANNELS_LAST_MIN_POSITIONS
    if weight.shape[-1] >= CUSTOM_BACKWARD_MIN_KERNEL and large_map:
        return _DepthwiseConv.apply(x, weight, bias, dilation)
    padding = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])
