"""builder.layers: the cheaper formulations compute what the reference formulations compute."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from overlock.builder.layers import GRN, DilatedRepConv, LayerScale, ResDWConv


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return module


def test_layer_scale_is_the_depthwise_1x1_conv_of_the_reference():
    scale = _randomise(LayerScale(6, 1.0))
    x = torch.randn(2, 6, 5, 7)
    expected = F.conv2d(x, scale.weight, scale.bias, groups=6)
    torch.testing.assert_close(scale(x), expected)
    assert scale.weight.shape == (6, 1, 1, 1) and scale.bias.shape == (6,)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grn_is_the_convnext_v2_formula(channels_last):
    grn = _randomise(GRN(5))
    x = torch.randn(3, 5, 6, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    energy = torch.norm(x, p=2, dim=(-1, -2), keepdim=True)
    normed = energy / (energy.mean(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), x + torch.addcmul(grn.beta, grn.gamma, x * normed))


@pytest.mark.parametrize("autocast", [False, True])
def test_res_dw_conv_is_x_plus_conv_of_x_with_the_same_gradients(autocast):
    layer = _randomise(ResDWConv(4))
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
        expected = x + F.conv2d(x, layer.weight, layer.bias, padding=1, groups=4)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {}
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    if not autocast:
        grads = torch.autograd.grad(out.sum(), (x, layer.weight, layer.bias))
        expected_grads = torch.autograd.grad(expected.sum(), (x, layer.weight, layer.bias))
        torch.testing.assert_close(grads, expected_grads)


def _branch_sum(layer: DilatedRepConv, x: torch.Tensor) -> torch.Tensor:
    """The reference's DilatedRepConv: lk + BN plus every dilated branch through its own modules."""
    out = layer.lk_bn(F.conv2d(x, layer.lk.weight, None, padding=layer.kernel_size // 2, groups=x.shape[1]))
    for branch in layer.branches.values():
        out = out + branch(x)
    return out


@pytest.mark.parametrize("kernel_size", [7, 13])
def test_dilated_rep_conv_in_eval_folds_to_the_branch_sum(kernel_size):
    layer = _randomise(DilatedRepConv(3, kernel_size)).eval()
    x = torch.randn(2, 3, 30, 28)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _branch_sum(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [7, 13])
def test_dilated_rep_conv_training_step_equals_the_branch_sum(kernel_size):
    layer = _randomise(DilatedRepConv(3, kernel_size)).train()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 3, 30, 28, dtype=torch.float32, requires_grad=True)
    out, expected = layer(x), _branch_sum(twin, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    theirs = torch.autograd.grad(expected, [x, *twin.parameters()], grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(layer.named_buffers(), twin.buffers(), strict=True):  # BN running stats
        torch.testing.assert_close(a, b, msg=name)
