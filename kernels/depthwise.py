"""Depthwise convolution with a fast CPU backward, for the large and dilated kernels of DilatedRepConv.

Why. PyTorch's CPU backward of a depthwise convolution is 10-50x slower than its forward at one
thread for the kernels OverLoCK uses (17x17 at 56x56: ~1.3 s for forward+backward at batch 8,
against ~30 ms for the forward; a 7x7 dilation-2 branch on a 14x14 map: ~35 ms against ~1 ms), and
its forward is fast only in some layouts (channels_last for 56- and 112-channel maps). This
operator computes the same three results with fast primitives:
- forward: `F.conv2d`, on channels_last data for maps of 28x28 and larger (oneDNN's NCHW depthwise
  path is the slow one there); large dilated kernels as undilated convs of the map's sub-lattices
  (`polyphase_conv`: oneDNN's dilated path is slow for them); in C (`conv_native`,
  kernels/csrc/depthwise_conv.c) where oneDNN has a weak spot: 11x11 and 13x13 kernels (13x13
  1.4-2.7x slower than the C loop, and slower than its own 15x15) and dilated kernels that pad by
  7 or more (3x3 dilation 7 and 9x9 dilation 2 of the 15x15 to 19x19 DilatedRepConvs: 1.8-9x);
- input gradient: the same depthwise convolution of the output gradient with the flipped kernel
  (a correlation's adjoint is the convolution with the mirrored kernel). PyTorch's own input
  gradient is as fast for undilated kernels but 10-40x slower for dilated ones;
- weight gradient: per channel, the correlation of the padded input with the output gradient,
  summed over the batch, read at lags 0, d, 2d, ... (d = dilation). For float32 maps, where a C
  compiler is at hand, the direct sum in C (`weight_grad_native`, kernels/csrc/
  depthwise_weight_grad.c: 2-6x faster than the methods below for the presets' kernels, as fast
  for the two largest); otherwise one of four methods, picked by shape (`weight_grad_method`,
  measured at one thread, batch 8):
  * "fft": in the frequency domain, one real FFT of the padded input and of the gradient, a
    product summed over the batch, one inverse FFT per channel; its cost does not grow with the
    kernel, so it wins for spans of 13 and more on maps of 28x28 and larger;
  * "batch_channels": the correlation is itself a depthwise convolution, with the batch folded
    into the channels: the input as (1, B*C, H, W) images, the gradient as (B*C, 1, H, W)
    kernels, stride d; then a sum over the batch. It runs on oneDNN's fast forward path and wins
    for kernels of 5 and more on maps up to 28x28 (13x13 at 14x14: ~60 ms -> ~10 ms);
  * "polyphase": for the other dilated kernels (3x3 and 5x5 with d >= 2), PyTorch's undilated
    weight gradient of the d*d sub-lattices (`weight_grad_polyphase`), 1.1-1.8x faster than its
    dilated one;
  * "aten": PyTorch's own weight gradient (weight only), for the rest (undilated 3x3 kernels,
    56x56 maps with small kernels), where it is the fastest.
  All four round like the direct sum (tests compare them with a float64 reference).
On CUDA the same three results come from PyTorch (cuDNN) or from Triton kernels
(`triton_depthwise.py`), chosen per operation and shape by timing both on first use (see
`_cuda_pick`): cuDNN's direct grouped kernels are the GPU's weak spot for large depthwise kernels.
There the operator is a custom op, `overlock::depthwise_conv2d`, which torch.compile keeps whole.
Also here, for DilatedRepConv's training form: `batch_normed_sum`, the sum of several such convs of
one input, each through a BN normalising by the batch, as one autograd op on the CPU.
Only the stride-1, "same"-padded, odd-kernel case OverLoCK uses is covered; `depthwise_conv2d`
falls back to `F.conv2d` (plain autograd) everywhere else: other devices, half dtypes on the CPU,
tracing and export. The backward is once-differentiable (no gradient of a gradient through this op).
"""

from __future__ import annotations

import functools
import importlib
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
import torch.nn.functional as F

from . import grn, native
from .autocast import autocast_input

NATIVE_LIBRARY = "depthwise_weight_grad"
FORWARD_LIBRARY = "depthwise_conv"
# Kernel sizes whose forward (and input gradient) runs in C where it can. Measured against oneDNN's
# channels_last depthwise forward, batch 8, one thread (`python benchmarks/depthwise_forward.py`):
# 13x13 is oneDNN's weak size: 1.4-2.7x slower than the C loop on maps from 7x7 to 80x80, and slower
# than its own 15x15 on the same map; 11x11 1.1-1.3x (0.9-1.1x on 7x7 maps). For 3x3 to 9x9 and for
# 15x15 and 17x17 oneDNN is as fast or faster (0.5-0.95x; 1.3x only for 17x17 on XT's 56-channel
# 56x56 maps): the C loop pays for copying each image into zero-bordered channel-block planes.
NATIVE_FORWARD_KERNELS = frozenset({11, 13})
# Dilated kernels that pad the map by this many pixels or more run in C as well. oneDNN's dilated
# depthwise forward leaves its fast path there (padding 7 and up: 3x3 dilation 7 2.2-9x, 5x5
# dilation 4 4-18x, 7x7 dilation 3 5-23x slower than the C loop; padding 6, 3x3 dilation 6 and 5x5
# dilation 3, oneDNN is still 1.2-2.5x faster), and the polyphase form below of 9x9 dilation 2
# (padding 8) is 1.8-6.7x slower than the C loop. On every preset map, 56 channels at 56x56 to 336
# at 7x7, batch 8, one thread (`python benchmarks/depthwise_forward.py`).
NATIVE_DILATED_MIN_PADDING = 7

# Maps with at least this many positions run in channels_last (measured: 28x28 and 56x56 maps are
# 10-30x faster there at one thread; 14x14 and 7x7 maps are about as fast in either layout).
CHANNELS_LAST_MIN_POSITIONS = 28 * 28
# Weight-gradient method by shape (one thread, batch 8, channels_last data, load-noisy medians).
# The FFT's cost does not grow with the kernel, the others' grows with its K*K taps: the FFT from
# FFT_MIN_KERNEL on maps of FFT_MIN_POSITIONS or more (17x17 at 56x56 ~1 s -> ~0.1 s, 15x15 at
# 28x28 0.44 -> 0.10 s, 9x9 dilation 2 at 56x56 146 -> 97 ms; 7x7 kernels and 3-tap dilated ones
# lose). The batch-folded convolution for kernels of BATCH_CHANNELS_MIN_KERNEL or more on maps up
# to BATCH_CHANNELS_MAX_POSITIONS (13x13 at 14x14 60 -> 8-16 ms, 7x7 at 7x7 9 -> 1.2 ms, 7x7
# dilation 2 at 28x28 43 -> 18 ms; on 56x56 maps and for 3x3 kernels dilated by 4 or more it is
# 2-10x slower). PyTorch's own otherwise (3x3 kernels, small kernels on 56x56 maps).
FFT_MIN_KERNEL = 9
FFT_MIN_POSITIONS = 28 * 28
BATCH_CHANNELS_MIN_KERNEL = 5
BATCH_CHANNELS_MAX_POSITIONS = 28 * 28
# Dilated kernels of this size or more run as d*d undilated convolutions on the sub-lattices of the
# padded map (measured: oneDNN's dilated depthwise forward, 9x9 dilation 2 at 56x56, 107-123 ms ->
# 31-33 ms; 3x3 and 7x7 dilated kernels are fast as they are and lose to the reshuffling), where
# the C loop is not at hand (no C compiler; torch.compile and tracers).
POLYPHASE_MIN_KERNEL = 9


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


def polyphase_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """A same-padded dilated depthwise conv as one undilated valid conv of the d*d sub-lattices.

    out[y, x] = sum_ij w[i, j] xpad[y + d*i, x + d*j]: for y = d*m + r, x = d*n + s only the
    sub-lattice xpad[r::d, s::d] is read, with an undilated kernel. The d*d sub-lattices go through
    one conv as a batch of d*d*B images (channels innermost, so that each copy moves whole channel
    vectors); the outputs are interleaved back.
    """
    batch, channels, height, width = x.shape
    d = dilation
    pad = d * (weight.shape[-1] - 1) // 2
    rows, cols = -(-(height + 2 * pad) // d), -(-(width + 2 * pad) // d)  # per sub-lattice
    out = F.conv2d(sub_lattices(x, d, rows, cols, pad), weight, bias, groups=channels)
    out_rows, out_cols = out.shape[-2:]
    merged = x.new_empty(batch, out_rows, d, out_cols, d, channels)
    merged.permute(2, 4, 0, 1, 3, 5).copy_(out.permute(0, 2, 3, 1).view(d, d, batch, out_rows, out_cols, channels))
    merged = merged.view(batch, out_rows * d, out_cols * d, channels)[:, :height, :width]
    return merged.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def sub_lattices(x: torch.Tensor, d: int, rows: int, cols: int, offset: int) -> torch.Tensor:
    """The d*d sub-lattices [r::d, s::d] of x placed at (offset, offset) in a zero map of rows*d x cols*d.

    (B, C, H, W) -> (d*d*B, C, rows, cols), channels_last, lattice (r, s) of image b at r*d*B + s*B + b.
    """
    batch, channels, height, width = x.shape
    padded = x.new_zeros(batch, rows * d, cols * d, channels)
    padded[:, offset : offset + height, offset : offset + width] = x.permute(0, 2, 3, 1)
    lattices = padded.view(batch, rows, d, cols, d, channels).permute(2, 4, 0, 1, 3, 5)
    return lattices.reshape(d * d * batch, rows, cols, channels).permute(0, 3, 1, 2)


def conv_native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """The same-padded depthwise conv in C (kernels/csrc/depthwise_conv.c): float32 CPU maps, channels_last out.

    Images are split between torch's threads, as for the weight gradient.
    """
    if not native_forward_applies(x, weight, bias):
        raise ValueError(
            f"conv_native needs float32 CPU tensors and the compiled kernel "
            f"(got {x.dtype} on {x.device}; {native.status(FORWARD_LIBRARY)})"
        )
    batch, channels, height, width = x.shape
    kernel_size = weight.shape[-1]
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    taps = weight.reshape(channels, kernel_size * kernel_size).t().contiguous()  # (K*K, C), tap-major
    bias = bias.contiguous() if bias is not None else None
    pointers = (native.pointer(x), native.pointer(taps), native.pointer(bias) if bias is not None else None)
    native.run(
        FORWARD_LIBRARY,
        "overlock_depthwise_conv_forward",
        native.image_ranges(batch, native.workers()),
        (*pointers, native.pointer(out), height, width, channels, kernel_size, dilation),
    )
    return out


def native_forward_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """float32 CPU tensors and a C compiler, eagerly (torch.compile and tracers see `F.conv2d`)."""
    return (
        not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() > 0
        and native.library(FORWARD_LIBRARY) is not None
    )


def native_forward_wins(kernel_size: int, dilation: int) -> bool:
    """Whether the C loop beats PyTorch's forward for this kernel (the measured rule above)."""
    padding = dilation * (kernel_size - 1) // 2
    return kernel_size in NATIVE_FORWARD_KERNELS or (dilation > 1 and padding >= NATIVE_DILATED_MIN_PADDING)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    if native_forward_wins(weight.shape[-1], dilation) and native_forward_applies(x, weight, bias):
        return conv_native(x, weight, bias, dilation)
    return conv_pytorch(x, weight, bias, dilation)


def conv_pytorch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """The same-padded depthwise conv through PyTorch's ops, in the layout or formulation they run fastest."""
    if dilation > 1 and weight.shape[-1] >= POLYPHASE_MIN_KERNEL:
        return polyphase_conv(x, weight, bias, dilation)
    padding = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(_fast_layout(x), weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])


def weight_grad_fft(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
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


def weight_grad_batch_channels(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """The same weight gradient as one depthwise conv: batch folded into channels, gradient as kernels.

    Image b*C + c is x[b, c] (zero-padded by d*(K-1)/2), its kernel grad[b, c] (H x W); with stride
    d the output's (i, j) position is exactly the lag (d*i, d*j), so the (1, B*C, K, K) result
    summed over the batch is grad_w.
    """
    batch, channels, height, width = x.shape
    pad = dilation * (kernel_size - 1) // 2
    images = x.reshape(1, batch * channels, height, width)
    kernels = grad.reshape(batch * channels, 1, height, width)
    corr = F.conv2d(images, kernels, stride=dilation, padding=pad, groups=batch * channels)
    return corr.view(batch, channels, kernel_size, kernel_size).sum(0).unsqueeze(1)


def weight_grad_aten(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """PyTorch's own depthwise weight gradient (its input gradient is not computed)."""
    return _aten_weight_grad(x, grad, kernel_size, dilation * (kernel_size - 1) // 2, dilation)


def _aten_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, padding: int, dilation: int):
    """PyTorch's weight gradient alone of a stride-1 depthwise conv of x with this padding and dilation."""
    channels = x.shape[1]
    weight = x.new_empty(channels, 1, kernel_size, kernel_size)  # only its shape is read
    mask = [False, True, False]
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [padding] * 2, [dilation] * 2, False, [0, 0], channels, mask
    )[1]


def weight_grad_polyphase(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """The weight gradient of a dilated conv as that of one undilated valid conv of the d*d sub-lattices.

    With y = d*m + r, x = d*n + s: grad[y, x] * xpad[y + d*i, x + d*j] only pairs sub-lattice (r, s)
    of the gradient with sub-lattice (r, s) of the padded input, lag (i, j) undilated. So the
    lattices go through PyTorch's undilated weight gradient as a batch of d*d*B images, which sums
    over them: 1.3-1.8x faster than its dilated one for 3x3 kernels (one thread, batch 8).
    """
    height, width = x.shape[-2:]
    d, pad = dilation, dilation * (kernel_size - 1) // 2
    rows, cols = -(-height // d), -(-width // d)  # gradient rows and columns per sub-lattice
    images = sub_lattices(x, d, rows + kernel_size - 1, cols + kernel_size - 1, pad)
    return _aten_weight_grad(images, sub_lattices(grad, d, rows, cols, 0), kernel_size, padding=0, dilation=1)


def weight_grad_native(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """The direct sum in C (kernels/csrc/depthwise_weight_grad.c), channels vectorised: float32 CPU maps.

    2-6x faster than the other methods for every kernel of the presets but the 17x17 on 56x56 maps
    (as fast as the FFT there) and 13x13 on 14x14 (as fast as the batch-folded conv); measured by
    `python benchmarks/depthwise_weight_grad.py`. Images are split between torch's threads.
    """
    if not native_weight_grad_applies(x, grad):
        raise ValueError(
            f"weight_grad_native needs float32 CPU tensors and the compiled kernel "
            f"(got {x.dtype} on {x.device}; {native.status(NATIVE_LIBRARY)})"
        )
    batch, channels, height, width = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    ranges = native.image_ranges(batch, native.workers())
    sums = x.new_zeros(len(ranges), kernel_size * kernel_size, channels)
    pointers = (native.pointer(x), native.pointer(grad))
    native.run(
        NATIVE_LIBRARY,
        "overlock_depthwise_weight_grad",
        ranges,
        (*pointers, native.pointer(sums), sums.stride(0), height, width, channels, kernel_size, dilation),
    )
    return sums.sum(dim=0).t().reshape(channels, 1, kernel_size, kernel_size)


def native_weight_grad_applies(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """float32 CPU tensors and a C compiler (kernels/native.py), eagerly (torch.compile traces this op's
    backward: it gets the PyTorch methods); else the PyTorch methods below."""
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == grad.dtype == torch.float32
        and x.numel() > 0
        and native.library(NATIVE_LIBRARY) is not None
    )


WEIGHT_GRAD_METHODS = {
    "native": weight_grad_native,
    "fft": weight_grad_fft,
    "batch_channels": weight_grad_batch_channels,
    "polyphase": weight_grad_polyphase,
    "aten": weight_grad_aten,
}


def weight_grad_method(height: int, width: int, kernel_size: int, dilation: int = 1) -> str:
    """Which of the PyTorch methods of WEIGHT_GRAD_METHODS is fastest for this shape (measured; see the
    constants above). `weight_grad` takes the C kernel before any of them where it applies."""
    positions = height * width
    if kernel_size >= FFT_MIN_KERNEL and positions >= FFT_MIN_POSITIONS:
        return "fft"
    if kernel_size >= BATCH_CHANNELS_MIN_KERNEL and positions <= BATCH_CHANNELS_MAX_POSITIONS:
        return "batch_channels"
    return "polyphase" if dilation > 1 else "aten"


def weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """d loss / d weight of a same-padded depthwise conv, (C, 1, K, K), by the fastest method."""
    if native_weight_grad_applies(x, grad):
        return weight_grad_native(x, grad, kernel_size, dilation)
    method = WEIGHT_GRAD_METHODS[weight_grad_method(x.shape[-2], x.shape[-1], kernel_size, dilation)]
    return method(x, grad, kernel_size, dilation)


# On CUDA: PyTorch's convolution (cuDNN) or overlock's Triton kernels (triton_depthwise.py), whichever
# this GPU runs faster. Each operation (forward or input gradient, weight gradient) picks per shape,
# dtype and layout the first time it runs, by timing both on the device, as cudnn.benchmark picks
# among cuDNN's algorithms: the winner depends on the GPU, the kernel size and the map (cuDNN's
# direct grouped kernels took 2 ms for XT's 17x17 forward at batch 64 on an H100; for 3x3 kernels
# they are fine). OVERLOCK_DEPTHWISE_CUDA=pytorch or =triton skips the timing and takes that one
# wherever it applies (benchmarks; bisecting a numerical difference).
CUDA_BACKEND_VARIABLE = "OVERLOCK_DEPTHWISE_CUDA"
CUDA_BACKENDS = ("measure", "pytorch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_cuda_choices: dict[tuple, str] = {}
_cuda_timings: dict[tuple, dict[str, float]] = {}  # the device ms each candidate took when it was chosen


def cuda_backend_setting() -> str:
    """OVERLOCK_DEPTHWISE_CUDA, checked: "measure" (the default), "pytorch" or "triton"."""
    value = os.environ.get(CUDA_BACKEND_VARIABLE, "measure")
    if value not in CUDA_BACKENDS:
        raise ValueError(f"{CUDA_BACKEND_VARIABLE}={value!r}: valid values are {', '.join(CUDA_BACKENDS)}")
    return value


@functools.lru_cache(maxsize=1)
def _triton_kernels() -> ModuleType | None:
    """triton_depthwise, imported on first use (Triton reads TRITON_INTERPRET when a kernel is defined)."""
    try:
        return importlib.import_module(f"{__package__}.triton_depthwise")
    except ImportError:  # no triton, or a broken install: PyTorch's convolution only
        return None


def _median_device_ms(run: Callable[[], torch.Tensor]) -> float:
    run()  # warm-up: Triton compiles this variant, cuDNN picks its algorithm
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cuda_pick(key: tuple, candidates: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
    """Run the candidate chosen for `key`: the setting's, else the one timed fastest here (cached)."""
    setting = cuda_backend_setting()
    if setting != "measure":
        return candidates.get(setting, candidates["pytorch"])()
    choice = _cuda_choices.get(key)
    if choice is None:
        if len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
            return candidates["pytorch"]()  # nothing to compare, or no timing inside a CUDA graph capture
        times = {}
        for name, run in candidates.items():
            try:
                times[name] = _median_device_ms(run)
            except Exception as error:  # noqa: BLE001 - a kernel that cannot run here is no candidate
                if name == "pytorch":
                    raise
                warnings.warn(
                    f"overlock: the {name} depthwise kernel failed on {key} ({type(error).__name__}: {error}); "
                    f"PyTorch's convolution runs this shape ({CUDA_BACKEND_VARIABLE}=pytorch silences this)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        choice = _cuda_choices[key] = min(times, key=times.__getitem__)
        _cuda_timings[key] = times
    return candidates[choice]()


def cuda_choices() -> list[dict]:
    """What the timed dispatch chose in this process, one record per operation and shape ("conv":
    the forward and the input gradient, which is a conv of the output gradient; "weight_grad"),
    with the device milliseconds each candidate took: what a GPU benchmark records beside its
    table, to say where the Triton kernels won."""
    records = []
    for key, choice in _cuda_choices.items():
        operation, _, dtype, shape, layout, kernel_size, dilation, *bias = key
        records.append(
            {
                "operation": operation,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": list(shape),
                "layout": layout,
                "kernel_size": kernel_size,
                "dilation": dilation,
                **({"bias": bias[0]} if bias else {}),
                "choice": choice,
                "ms": _cuda_timings.get(key, {}),
            }
        )
    return records


def _cuda_key(operation: str, x: torch.Tensor, *shape: int) -> tuple:
    layout = (
        "nchw" if x.is_contiguous() else "nhwc" if x.is_contiguous(memory_format=torch.channels_last) else "strided"
    )
    return (operation, x.device.index, x.dtype, tuple(x.shape), layout, *shape)


def _cuda_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    kernel_size = weight.shape[-1]
    padding = dilation * (kernel_size - 1) // 2
    candidates = {"pytorch": lambda: F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])}
    kernels = _triton_kernels()
    if kernels is not None and x.dtype in TRITON_DTYPES and weight.dtype == x.dtype:
        candidates["triton"] = lambda: kernels.forward(x, weight, bias, dilation)
    return _cuda_pick(_cuda_key("conv", x, kernel_size, dilation, bias is not None), candidates)


def _cuda_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    candidates = {"pytorch": lambda: weight_grad_aten(x, grad, kernel_size, dilation)}
    kernels = _triton_kernels()
    if kernels is not None and x.dtype in TRITON_DTYPES and grad.dtype == x.dtype:
        candidates["triton"] = lambda: kernels.weight_grad(x, grad, kernel_size, dilation)
    return _cuda_pick(_cuda_key("weight_grad", x, kernel_size, dilation), candidates)


# The CUDA operator is a torch.library custom op (as ContMix's are, kernels/ops.py), so that
# torch.compile keeps it as one opaque node whose implementation (the timed choice above) runs
# eagerly when the compiled graph does, instead of tracing into it or falling back to cuDNN.


@torch.library.custom_op("overlock::depthwise_conv2d", mutates_args=())
def depthwise_conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int
) -> torch.Tensor:
    """The same-padded depthwise conv by the faster of PyTorch and Triton here (`_cuda_conv`), in x's layout."""
    out = _cuda_conv(x, weight, bias, dilation)
    if out.stride() == x.stride():
        return out
    like = torch.empty_like(x)  # the layout the fake promises
    return out if like.stride() == out.stride() else like.copy_(out)


@depthwise_conv2d_op.register_fake
def _(x, weight, bias, dilation):
    return torch.empty_like(x)


@torch.library.custom_op("overlock::depthwise_conv2d_weight_grad", mutates_args=())
def depthwise_weight_grad_op(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """d loss / d weight, (C, 1, K, K) float32, by the faster of PyTorch and Triton here (`_cuda_weight_grad`)."""
    return _cuda_weight_grad(x, grad, kernel_size, dilation).to(torch.float32).contiguous()


@depthwise_weight_grad_op.register_fake
def _(x, grad, kernel_size, dilation):
    return x.new_empty((x.shape[1], 1, kernel_size, kernel_size), dtype=torch.float32)


def _depthwise_setup(ctx, inputs, output):
    x, weight, bias, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilation = dilation
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _depthwise_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:  # the adjoint of a same-padded correlation: the mirrored kernel
        grad_x = depthwise_conv2d_op(grad, weight.flip(-1, -2), None, ctx.dilation)
    if ctx.needs_input_grad[1]:
        grad_w = depthwise_weight_grad_op(x, grad, weight.shape[-1], ctx.dilation).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = grad.sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None


depthwise_conv2d_op.register_autograd(_depthwise_backward, setup_context=_depthwise_setup)


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
    """F.conv2d(x, weight, bias, padding=dilation*(K-1)//2, dilation=dilation, groups=C), faster on the
    CPU; on CUDA the faster of cuDNN and the Triton kernels for each shape.

    weight (C, 1, K, K) with odd K; the output has x's spatial size.
    """
    if weight.shape[-1] % 2 == 0 or weight.shape[-1] != weight.shape[-2] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d needs a (C, 1, K, K) weight with odd K, got {tuple(weight.shape)}")
    if x.device.type == "cuda" and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
        return _cuda_depthwise(x, weight, bias, dilation)
    # Tracers (fvcore's FLOP count, torch.jit) must see the plain convolution. torch.compile traces
    # the autograd.Function into its graph and keeps it: inductor's own depthwise backward is
    # PyTorch's slow one (XT training step compiled, one thread, `overlock bench xt --train
    # --compile`: 3.0 s with this op against 3.3 s eager on a quiet machine; 7.1 s with the plain
    # conv, measured under load). On CUDA torch.compile keeps the custom op; exported programs
    # (torch.export, ONNX) get the plain convolution, which every runtime has.
    if not _cpu_kernels_apply(x):
        padding = dilation * (weight.shape[-1] - 1) // 2
        return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])
    inputs = (x, weight) if bias is None else (x, weight, bias)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return _conv(x, weight, bias, dilation)
    return _DepthwiseConv.apply(x, weight, bias, dilation)


def _cuda_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """CUDA: the custom op, its inputs cast as autocast casts F.conv2d's (it does not cast custom ops)."""
    if not torch.is_autocast_enabled("cuda"):
        return depthwise_conv2d_op(x, weight, bias, dilation)
    x, weight = autocast_input(x), autocast_input(weight)
    bias = autocast_input(bias) if bias is not None else None
    with torch.autocast("cuda", enabled=False):
        return depthwise_conv2d_op(x, weight, bias, dilation)


class _BatchNormedSum(torch.autograd.Function):
    """sum_i BN_i(conv_i(x)) with every BN normalising by its batch's statistics (`batch_normed_sum`).

    Saves x and the first conv's output (the large kernel's: the costly one to recompute); the other
    convs' outputs are recomputed in the backward, one at a time, so the op holds two maps between
    forward and backward whatever the number of branches.
    """

    @staticmethod
    def forward(ctx, x, dilations, eps, running, *params):
        count = len(dilations)
        weights, gammas, betas = params[:count], params[count : 2 * count], params[2 * count :]
        channels = x.shape[1]
        out = first = shift = None
        means, inverse_stds = [], []
        for index, (weight, dilation, gamma, beta) in enumerate(zip(weights, dilations, gammas, betas, strict=True)):
            y = _conv(x, weight, None, dilation)
            # BN's own statistics (and running-average update): the same numbers as its forward
            mean, variance = torch.batch_norm_update_stats(y, *running[index])
            inverse_std = torch.rsqrt(variance + eps[index])
            scale = gamma * inverse_std
            if out is None:  # out = y * scale + (beta - mean * scale), one pass
                first = y
                out = torch.addcmul((beta - mean * scale).view(channels, 1, 1), y, scale.view(channels, 1, 1))
                shift = torch.zeros_like(mean)
            else:  # the branches' shifts go in at the end, once
                out.addcmul_(y, scale.view(channels, 1, 1))
                shift = shift.add_(beta).sub_(mean * scale)
            means.append(mean)
            inverse_stds.append(inverse_std)
        out.add_(shift.view(channels, 1, 1))
        ctx.save_for_backward(x, first, torch.stack(means), torch.stack(inverse_stds), *weights, *gammas)
        ctx.dilations = dilations
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, first, means, inverse_stds, *rest = ctx.saved_tensors
        count = len(ctx.dilations)
        weights, gammas = rest[:count], rest[count:]
        channels, positions = x.shape[1], x.numel() // x.shape[1]
        grad_x = grad_y = grad_sum = None
        grad_weights, grad_gammas = [None] * count, [None] * count
        needs = ctx.needs_input_grad
        for index, (weight, dilation, gamma) in enumerate(zip(weights, ctx.dilations, gammas, strict=True)):
            y = first if index == 0 else _conv(x, weight, None, dilation)
            mean, inverse_std = means[index], inverse_stds[index]
            # sums of grad * y and (the first branch) of grad, per channel: grad * normalised y
            grad_dot_y, sum_now = _channel_sums(grad, y, with_grad_sum=grad_sum is None)
            grad_sum = sum_now if grad_sum is None else grad_sum
            grad_normed = (grad_dot_y - mean * grad_sum) * inverse_std
            grad_gammas[index] = grad_normed
            scale = gamma * inverse_std
            slope = scale * inverse_std * grad_normed / positions
            # d y = scale * (grad - mean(grad)) - slope * (y - mean), BN's input gradient, as
            # grad * scale - y * slope + a constant: two passes, no centred copy of grad, written
            # over the branch before's d y (its weight gradient and input term are made by now)
            constant = (slope * mean - scale * grad_sum / positions).view(channels, 1, 1)
            if grad_y is None:
                grad_y = torch.addcmul(constant, y, (-slope).view(channels, 1, 1))
            else:
                torch.addcmul(constant, y, (-slope).view(channels, 1, 1), out=grad_y)
            grad_y.addcmul_(grad, scale.view(channels, 1, 1))
            del y
            if needs[4 + index]:
                grad_weights[index] = weight_grad(x, grad_y, weight.shape[-1], dilation).to(weight.dtype)
            if needs[0]:
                term = _conv(grad_y, weight.flip(-1, -2), None, dilation)
                grad_x = term if grad_x is None else grad_x.add_(term)
        grad_betas = [grad_sum if needs[4 + 2 * count + i] else None for i in range(count)]
        grad_gammas = [g if needs[4 + count + i] else None for i, g in enumerate(grad_gammas)]
        return (grad_x, None, None, None, *grad_weights, *grad_gammas, *grad_betas)


def _channel_sums(grad: torch.Tensor, y: torch.Tensor, with_grad_sum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per channel, over the batch: the sum of grad * y, and (`with_grad_sum`) that of grad. On float32
    channels_last maps one pass of GRN's compiled reduction (kernels/grn.py), which never writes the
    product: PyTorch's ops write grad * y as a map and read it back to sum it."""
    if grn.native_applies(grad, y):
        dot, total = grn.backward_sums(grad, y)
        return dot.sum(dim=0).flatten(), (total.sum(dim=0).flatten() if with_grad_sum else None)
    return torch.mul(grad, y).sum(dim=(0, 2, 3)), (grad.sum(dim=(0, 2, 3)) if with_grad_sum else None)


def batch_normed_sum(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    gammas: Sequence[torch.Tensor],
    betas: Sequence[torch.Tensor],
    eps: Sequence[float],
    running: Sequence[tuple[torch.Tensor | None, torch.Tensor | None, float]] | None = None,
) -> torch.Tensor:
    """sum_i batch_norm_i(depthwise_conv2d(x, weights[i], dilation=dilations[i])), every BN in training
    mode: normalising by the batch's statistics and, where `running[i]` is (running_mean,
    running_var, factor), updating those as BN does (factor: its momentum, or 1/batches seen).

    Why. A training-form DilatedRepConv is seven convs and seven BNs summed: op by op that is about 25
    ops forward and 60 backward per module, each BN's output written, read back by the sum, and its
    gradient accumulated by the autograd engine one branch at a time. Here each branch output is read
    twice in the forward (statistics, then added into the sum) and the BN backward shares the
    centred output gradient between branches. CPU float32/float64 only (`batch_normed_sum_applies`).
    """
    running = tuple(running) if running is not None else ((None, None, 0.0),) * len(weights)
    return _BatchNormedSum.apply(x, tuple(dilations), tuple(eps), running, *weights, *gammas, *betas)


def _cpu_kernels_apply(x: torch.Tensor) -> bool:
    """Whether this module's CPU paths take x: float32/float64 on the CPU, no autocast, no jit trace."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not (torch.is_autocast_enabled("cpu") or torch.jit.is_tracing())
    )


def batch_normed_sum_applies(x: torch.Tensor) -> bool:
    """Whether `batch_normed_sum` runs for x: the CPU paths' inputs (`_cpu_kernels_apply`), and not
    while torch.compile or an exporter records (they see the modules one by one)."""
    return _cpu_kernels_apply(x) and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
