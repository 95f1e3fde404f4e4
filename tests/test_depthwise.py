"""kernels.depthwise: the fast CPU depthwise convolution equals F.conv2d, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from overlock.kernels import depthwise, native
from overlock.kernels.depthwise import (
    WEIGHT_GRAD_METHODS,
    _DepthwiseConv,
    depthwise_conv2d,
    fast_fft_size,
    weight_grad,
    weight_grad_fft,
    weight_grad_method,
)


def reference(x, weight, bias, dilation):
    padding = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])


@pytest.mark.parametrize(
    ("channels", "size", "kernel", "dilation", "channels_last"),
    [
        (3, 30, 13, 1, False),  # fft weight gradient
        (5, 29, 5, 3, True),  # aten (map above the batch-folded method's limit)
        (4, 9, 7, 1, False),  # batch_channels
        (2, 12, 3, 2, True),  # aten
        (3, 11, 7, 2, True),  # batch_channels, dilated, odd map
        (3, 7, 5, 1, False),  # batch_channels, padding wider than half the map
        (3, 29, 9, 2, True),  # polyphase forward and input gradient, fft weight gradient
        (2, 10, 9, 3, False),  # polyphase, map smaller than the kernel's span
    ],
)
def test_custom_op_matches_conv2d_values_and_gradients(channels, size, kernel, dilation, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size + 1, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, kernel, kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, channels, size, size + 1, generator=gen, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
    theirs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = _DepthwiseConv.apply(*ours, dilation)
    expected = reference(*theirs, dilation)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        torch.autograd.grad(out, ours, grad), torch.autograd.grad(expected, theirs, grad), rtol=1e-9, atol=1e-9
    )


WEIGHT_GRAD_CASES = [
    ((9, 12), 5, 1),
    ((7, 7), 3, 3),
    ((13, 10), 7, 2),
    ((6, 5), 9, 1),
    ((14, 11), 3, 5),
    ((4, 9), 3, 4),
]
needs_native = pytest.mark.skipif(
    native.library(depthwise.NATIVE_LIBRARY) is None, reason=native.status(depthwise.NATIVE_LIBRARY)
)


@pytest.mark.parametrize("method", sorted(set(WEIGHT_GRAD_METHODS) - {"native"}))  # native: float32 only, below
@pytest.mark.parametrize(("size", "kernel", "dilation"), WEIGHT_GRAD_CASES)
def test_every_weight_gradient_method_equals_the_direct_sum(method, size, kernel, dilation):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, *size, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 4, *size, generator=gen, dtype=torch.float64)
    w = torch.zeros(4, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(reference(x, w, None, dilation), w, grad)[0]
    for layout in (torch.contiguous_format, torch.channels_last):
        ours = WEIGHT_GRAD_METHODS[method](x.contiguous(memory_format=layout), grad, kernel, dilation)
        assert ours.shape == (4, 1, kernel, kernel)
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("size", "kernel", "dilation"), [((56, 56), 9, 2), ((13, 10), 9, 3), ((5, 7), 11, 2)])
def test_polyphase_conv_equals_the_dilated_conv(size, kernel, dilation):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 1, kernel, kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    expected = reference(x, weight, bias, dilation)
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.testing.assert_close(
            depthwise.polyphase_conv(x.contiguous(memory_format=layout), weight, bias, dilation), expected
        )


def test_weight_gradient_method_follows_the_measured_table():
    assert weight_grad_method(56, 56, 17) == "fft"
    assert weight_grad_method(56, 56, 9) == "fft"
    assert weight_grad_method(28, 28, 15) == "fft"
    assert weight_grad_method(28, 28, 7) == "batch_channels"
    assert weight_grad_method(14, 14, 13) == "batch_channels"
    assert weight_grad_method(7, 7, 5) == "batch_channels"
    assert weight_grad_method(56, 56, 7) == "aten"
    assert weight_grad_method(14, 14, 3) == "aten"
    assert weight_grad_method(14, 14, 3, dilation=4) == "polyphase"
    assert weight_grad_method(56, 56, 5, dilation=2) == "polyphase"
    assert weight_grad_method(14, 14, 7, dilation=2) == "batch_channels"


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(("size", "kernel", "dilation"), [*WEIGHT_GRAD_CASES, ((14, 14), 13, 1), ((5, 6), 17, 1)])
def test_the_c_weight_gradient_equals_the_float64_direct_sum(size, kernel, dilation, threads):
    """Kernels larger than the map, channel counts that are not whole vectors, images split between threads."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 19, *size, generator=gen)
    grad = torch.randn(5, 19, *size, generator=gen)
    w = torch.zeros(19, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(reference(x.double(), w, None, dilation), w, grad.double())[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layout in (torch.contiguous_format, torch.channels_last):
            ours = WEIGHT_GRAD_METHODS["native"](x.contiguous(memory_format=layout), grad, kernel, dilation)
            assert ours.shape == (19, 1, kernel, kernel) and ours.dtype == torch.float32
            torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    finally:
        torch.set_num_threads(before)


needs_native_forward = pytest.mark.skipif(
    native.library(depthwise.FORWARD_LIBRARY) is None, reason=native.status(depthwise.FORWARD_LIBRARY)
)


@needs_native_forward
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    ("size", "kernel", "dilation", "bias"),
    [
        ((14, 14), 13, 1, True),  # the presets' shape
        ((9, 30), 13, 1, False),  # a row longer than one register block (14 + 14 + 2)
        ((5, 7), 13, 1, True),  # kernel larger than the map: whole kernel rows skipped
        ((11, 12), 11, 2, True),  # dilated, rows and columns past both borders
        ((4, 23), 3, 3, False),  # row blocks of 14, 8 and 1
        ((20, 17), 3, 7, True),  # the dilated branches the model sends to C: padding 7 and 8
        ((16, 15), 9, 2, False),
    ],
)
def test_the_c_forward_equals_the_float64_conv(size, kernel, dilation, bias, threads):
    """Channel counts that are not whole vectors, NCHW and channels_last input, images split between threads."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 19, *size, generator=gen)
    weight = torch.randn(19, 1, kernel, kernel, generator=gen)
    b = torch.randn(19, generator=gen) if bias else None
    expected = reference(x.double(), weight.double(), b.double() if bias else None, dilation)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layout in (torch.contiguous_format, torch.channels_last):
            ours = depthwise.conv_native(x.contiguous(memory_format=layout), weight, b, dilation)
            assert ours.shape == x.shape and ours.dtype == torch.float32
            assert ours.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    finally:
        torch.set_num_threads(before)


@needs_native_forward
def test_the_measured_kernels_run_the_c_forward_and_its_input_gradient(monkeypatch):
    calls = []
    original = depthwise.conv_native

    def spy(*args):
        calls.append((args[1].shape[-1], args[3]))
        return original(*args)

    monkeypatch.setattr(depthwise, "conv_native", spy)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 14, 14, generator=gen, requires_grad=True)
    for kernel, dilation in ((13, 1), (7, 1), (3, 7), (3, 6)):
        weight = torch.randn(16, 1, kernel, kernel, generator=gen, requires_grad=True)
        grad = torch.randn(2, 16, 14, 14, generator=gen)
        out = depthwise_conv2d(x, weight, dilation=dilation)
        ours = torch.autograd.grad(out, (x, weight), grad)
        expected = reference(x.double(), weight.double(), None, dilation)
        theirs = torch.autograd.grad(expected, (x, weight), grad.double())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
        for mine, exact in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine.double(), exact.double(), rtol=1e-5, atol=1e-4)
    # forward and input gradient of the 13x13 and of the 3x3 dilated by 7 (padding 7); the 7x7 and
    # the 3x3 dilated by 6 (padding 6) stay with oneDNN
    assert calls == [(13, 1), (13, 1), (3, 7), (3, 7)]
    with torch.no_grad():
        depthwise_conv2d(x.double(), torch.randn(16, 1, 13, 13, dtype=torch.float64))
    assert len(calls) == 4  # float64 is PyTorch's


def test_the_c_forward_refuses_what_it_does_not_cover():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert not depthwise.native_forward_applies(x, x.new_zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        depthwise.conv_native(x, x.new_zeros(2, 1, 3, 3), None, 1)


def test_the_c_weight_gradient_refuses_what_it_does_not_cover():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert not depthwise.native_weight_grad_applies(x, x)
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        depthwise.weight_grad_native(x, x, 3, 1)


@pytest.mark.parametrize("method", ["batch_channels", "aten", pytest.param("native", marks=needs_native)])
def test_weight_gradient_methods_in_float32_are_as_accurate_as_pytorchs_own(method):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 6, 14, 14, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 6, 14, 14, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(6, 1, 13, 13, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(reference(x.double(), w, None, 1), w, grad.double())[0]
    w32 = torch.zeros(6, 1, 13, 13, requires_grad=True)
    direct = torch.autograd.grad(reference(x, w32, None, 1), w32, grad)[0]
    ours = WEIGHT_GRAD_METHODS[method](x, grad, 13, 1)
    scale = exact.abs().max()
    assert (ours.double() - exact).abs().max() / scale < max(4 * (direct.double() - exact).abs().max() / scale, 1e-6)


def test_weight_gradient_in_float32_is_as_accurate_as_pytorchs_own():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 40, 40, generator=gen)
    grad = torch.randn(4, 6, 40, 40, generator=gen)
    w = torch.zeros(6, 1, 15, 15, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(reference(x.double(), w, None, 1), w, grad.double())[0]
    w32 = torch.zeros(6, 1, 15, 15, requires_grad=True)
    direct = torch.autograd.grad(reference(x, w32, None, 1), w32, grad)[0]
    ours = weight_grad_fft(x, grad, 15, 1)
    # The dispatch picks the C kernel for float32 where it is built, else the FFT here.
    picked = "native" if depthwise.native_weight_grad_applies(x, grad) else "fft"
    torch.testing.assert_close(weight_grad(x, grad, 15, 1), WEIGHT_GRAD_METHODS[picked](x, grad, 15, 1), rtol=0, atol=0)
    scale = exact.abs().max()
    assert (ours.double() - exact).abs().max() / scale < max(4 * (direct.double() - exact).abs().max() / scale, 1e-6)


def test_dispatch_uses_the_custom_backward_on_cpu_float_with_grad_only():
    x = torch.randn(1, 2, 28, 28, requires_grad=True)
    large = torch.randn(2, 1, 13, 13)
    small = torch.randn(2, 1, 3, 3)
    assert depthwise_conv2d(x, large.requires_grad_()).grad_fn.name().startswith("_DepthwiseConv")
    assert depthwise_conv2d(x, small.requires_grad_(), dilation=2).grad_fn.name().startswith("_DepthwiseConv")
    assert not depthwise_conv2d(x.half(), small.half()).grad_fn.name().startswith("_DepthwiseConv")
    with torch.no_grad():
        assert depthwise_conv2d(x, large).grad_fn is None
        torch.testing.assert_close(depthwise_conv2d(x, large), reference(x, large, None, 1))


def test_even_or_non_depthwise_kernels_are_refused():
    with pytest.raises(ValueError, match="odd K"):
        depthwise_conv2d(torch.randn(1, 2, 8, 8), torch.randn(2, 1, 4, 4))


def test_fft_sizes_are_smooth_and_not_smaller():
    for n in range(1, 200):
        size = fast_fft_size(n)
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert size >= n and m == 1
