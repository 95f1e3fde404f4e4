"""builder.layers: the cheaper formulations compute what the reference formulations compute."""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from overlock import kernels
from overlock.builder import build, layers
from overlock.builder.layers import GRN, DilatedRepConv, LargeKernelBN, LayerScale, ResDWConv, large_kernel_bn


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


def _assert_steps_are_the_branch_sum(layer: DilatedRepConv, x: torch.Tensor, steps: int, tol: float) -> None:
    """`steps` training steps of `layer` against the reference's modules on a copy: output and every
    gradient within `tol`, then the BN running statistics (to 1e-12 in float64, float32's default else)."""
    twin = copy.deepcopy(layer)
    for _ in range(steps):
        out, expected = layer(x), _branch_sum(twin, x)
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, [x, *layer.parameters()], grad)
        theirs = torch.autograd.grad(expected, [x, *twin.parameters()], grad)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol)
    exact = {"rtol": 1e-12, "atol": 1e-12} if x.dtype == torch.float64 else {}
    for (name, a), b in zip(layer.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name, **exact)


@pytest.mark.parametrize("kernel_size", [7, 13, 17])
def test_dilated_rep_conv_training_step_equals_the_branch_sum(kernel_size):
    layer = _randomise(DilatedRepConv(3, kernel_size)).train()
    _assert_steps_are_the_branch_sum(layer, torch.randn(2, 3, 30, 28, requires_grad=True), steps=1, tol=1e-5)


@pytest.mark.parametrize("kernel_size", [7, 13])
def test_dilated_rep_conv_backward_on_float32_channels_last_maps_sums_in_one_compiled_pass(kernel_size, monkeypatch):
    """On float32 channels_last maps the BN backward's per-channel sums (of grad * y, and of grad) come
    from GRN's compiled reduction, one pass per branch that never writes grad * y; the step is still
    the reference modules' to float32 rounding."""
    from overlock import kernels

    if not kernels.grn.native_applies(*(torch.zeros(1, 1, 1, 1).contiguous(memory_format=torch.channels_last),) * 2):
        pytest.skip(kernels.native.status(kernels.grn.LIBRARY))
    original, calls = kernels.grn.backward_sums, []
    monkeypatch.setattr(kernels.grn, "backward_sums", lambda grad, y: calls.append(1) or original(grad, y))
    layer = _randomise(DilatedRepConv(5, kernel_size)).train()
    x = torch.randn(2, 5, 30, 28).contiguous(memory_format=torch.channels_last).requires_grad_()
    _assert_steps_are_the_branch_sum(layer, x, steps=1, tol=1e-5)
    assert len(calls) == 1 + len(layer.branches)


@pytest.mark.parametrize("kernel_size", [5, 13, 19])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
def test_dilated_rep_conv_training_form_in_one_op_is_the_branch_sum(kernel_size, channels_last, momentum):
    """`batch_normed_sum` against the reference's modules in float64 over two steps: output and
    every gradient to 1e-9, the running statistics BN keeps (momentum None: the cumulative average;
    0: frozen, as while a checkpoint recomputes) to 1e-12."""
    layer = _randomise(DilatedRepConv(3, kernel_size)).double().train()
    for bn in layer._norms():
        bn.momentum = momentum
    x = torch.randn(2, 3, 23, 21, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert layer._sums_in_one_op(x)
    _assert_steps_are_the_branch_sum(layer, x, steps=2, tol=1e-10)


def test_dilated_rep_conv_in_one_op_keeps_its_input_and_the_large_kernels_output():
    """Two maps between forward and backward, whatever the number of branches; the gradients of only
    the tensors that need one."""
    layer = _randomise(DilatedRepConv(4, 17)).train()
    x = torch.randn(2, 4, 16, 15, requires_grad=True)
    maps = []

    def pack(tensor):
        if tensor.shape == x.shape:
            maps.append(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    assert len(set(maps)) == 2 and x.data_ptr() in maps
    layer.lk.weight.requires_grad_(False)
    out = layer(x.detach())
    out.sum().backward()
    assert layer.lk.weight.grad is None and all(b.conv.weight.grad is not None for b in layer.branches.values())


@pytest.mark.parametrize(
    "case", ["eval", "hook on a branch BN", "autocast", "no running statistics", "one value per channel"]
)
def test_dilated_rep_conv_runs_op_by_op_where_one_op_does_not_apply(case, monkeypatch):
    """Hooks must fire, autocast casts per conv, BN's own checks raise its own errors: there the
    modules run one by one; float32 training on the CPU takes the one op."""
    from overlock.kernels import depthwise

    layer = _randomise(DilatedRepConv(3, 7)).train()
    x = torch.randn(2, 3, 10, 9)
    calls = []
    original = depthwise.batch_normed_sum
    monkeypatch.setattr(layers, "batch_normed_sum", lambda *args: calls.append(1) or original(*args))
    layer(x)
    assert calls == [1]
    context = contextlib.nullcontext()
    if case == "eval":
        layer.eval()
    elif case == "hook on a branch BN":
        layer.branches["k3_d2"].bn.register_forward_hook(lambda *args: None)
    elif case == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    elif case == "no running statistics":
        layer = DilatedRepConv(3, 7, deploy=False)
        for bn in layer._norms():
            bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    else:
        x = torch.randn(1, 3, 1, 1)
    with context:
        if case == "one value per channel":
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                layer(x)
        else:
            layer(x)
    assert calls == [1]


@pytest.mark.parametrize("deployed", [False, True])
def test_large_kernel_bn_in_eval_folds_the_bn_into_the_kernel(deployed):
    conv = _randomise(DilatedRepConv(4, 9)).eval()
    if deployed:
        conv.reparameterize()
    bn = _randomise(torch.nn.BatchNorm2d(4), seed=1).eval()
    x = torch.randn(2, 4, 15, 17)
    with torch.no_grad():
        expected = bn(_branch_sum(conv, x)) if not deployed else bn(conv.lk(x))
        torch.testing.assert_close(large_kernel_bn(conv, bn, x), expected, rtol=1e-5, atol=1e-5)
    x.requires_grad_()  # and differentiable in eval (e.g. fine-tuning with frozen BN statistics)
    assert large_kernel_bn(conv, bn, x).grad_fn is not None


def test_large_kernel_bn_in_training_runs_both_modules():
    conv, bn = _randomise(DilatedRepConv(3, 7)).train(), torch.nn.BatchNorm2d(3).train()
    twin_conv, twin_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(2, 3, 12, 10)
    torch.testing.assert_close(large_kernel_bn(conv, bn, x), twin_bn(twin_conv(x)))
    torch.testing.assert_close(bn.running_mean, twin_bn.running_mean)  # the BN saw the batch


def test_large_kernel_bn_module_keeps_the_sequential_state_dict():
    plain = torch.nn.Sequential(OrderedDict(conv=DilatedRepConv(3, 7), bn=torch.nn.BatchNorm2d(3)))
    ours = LargeKernelBN(OrderedDict(conv=DilatedRepConv(3, 7), bn=torch.nn.BatchNorm2d(3)))
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(_randomise(plain).state_dict())
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grn_hand_written_backward_equals_autograd_of_the_formula(channels_last):
    grn = _randomise(GRN(5)).double()
    x = torch.randn(3, 5, 6, 4, dtype=torch.float64)
    x[1, 2] = 0.0  # an all-zero map: its energy's gradient is zero in both (no NaN)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = grn(x)
    assert out.grad_fn.name().startswith("_GRNFunction")
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, grn.gamma, grn.beta), grad)
    scale, shift = grn.coefficients(x)  # the plain ops, differentiated by autograd
    theirs = torch.autograd.grad(torch.addcmul(shift, x, scale), (x, grn.gamma, grn.beta), grad)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(out, grn(x))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("overwrite_input", [False, True], ids=["new-map", "over-input"])
def test_grn_then_pointwise_backward_equals_autograd_of_the_two_modules(bias, overwrite_input):
    """GRN -> fc2 as one op (`_GRNPointwiseFunction`): its output is the two modules', and its
    gradients, all taken from dout^T x per image, are autograd's of GRN's formula and the 1x1 conv
    (float64, an all-zero channel map among them); with `overwrite_input` x's gradient is written
    over x itself."""
    gen = torch.Generator().manual_seed(3)
    grn = _randomise(GRN(6)).double()
    fc2 = _randomise(layers.Pointwise(6, 4, bias=bias)).double()
    x = torch.randn(3, 6, 7, 5, dtype=torch.float64, generator=gen).contiguous(memory_format=torch.channels_last)
    x[1, 2] = 0.0
    grad = torch.randn(3, 4, 7, 5, dtype=torch.float64, generator=gen)
    params = [grn.gamma, grn.beta, fc2.weight, *([fc2.bias] if bias else [])]
    leaf = x.clone().requires_grad_()
    scale, shift = grn.coefficients(leaf)  # the plain ops, differentiated by autograd
    expected = F.conv2d(torch.addcmul(shift, leaf, scale), fc2.weight, fc2.bias)
    theirs = torch.autograd.grad(expected, [leaf, *params], grad)
    given = x.clone().requires_grad_()
    passed = given.detach()  # what the op's backward reads as its saved x
    out = layers._GRNPointwiseFunction.apply(given, grn.gamma, grn.beta, fc2.weight, fc2.bias, None, overwrite_input)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad(out, [given, *params], grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (ours[0].data_ptr() == passed.data_ptr()) == overwrite_input
    assert torch.equal(passed, x) != overwrite_input


def test_conv_mlp_runs_grn_and_fc2_as_one_op_where_the_map_outsizes_its_products(monkeypatch):
    """In training on channels_last CPU maps with at least twice as many positions as fc2 has outputs;
    on smaller maps (where its (out, C) matrices per image would outsize the map) and with a hook on
    GRN or fc2 the two modules run as they are. The same outputs and gradients either way."""
    made = []
    original = layers._GRNPointwiseFunction.apply
    monkeypatch.setattr(layers._GRNPointwiseFunction, "apply", lambda *args: (made.append(1), original(*args))[1])
    gen = torch.Generator().manual_seed(6)
    for side, expected in ((6, 1), (5, 0)):  # 36 and 25 positions, 16 outputs
        mlp = _randomise(layers.ConvMLP(16, 32, 16)).train()
        x = torch.randn(2, 16, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        made.clear()
        out = mlp(x)
        assert len(made) == expected
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
        if expected:
            handle = mlp.fc2.register_forward_hook(lambda *args: None)
            made.clear()
            watched = mlp(x)
            assert made == []
            torch.testing.assert_close(watched, out, rtol=0, atol=0)
            theirs = torch.autograd.grad(watched, [x, *mlp.parameters()], grad)
            handle.remove()
            for a, b in zip(ours, theirs, strict=True):  # (float32: the sums run in other orders)
                torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)


def _assert_recomputes(module: torch.nn.Module, x: torch.Tensor, count: int) -> None:
    """`module` keeps `count` recipes instead of tensors (none held by the graph, each called once in
    the backward), and its outputs and gradients are bit for bit those of the run that keeps them."""
    from overlock.builder import blocks, contmix

    recomputed = []
    original = layers.recompute_saved

    def spy(tensor, recipe):
        recomputed.append(weakref.ref(tensor))
        return original(tensor, lambda: (recomputed.append("called"), recipe())[1])

    users = (layers, contmix, blocks)  # the modules that call it
    for user in users:
        user.recompute_saved = spy
    try:
        out = module(x)
    finally:
        for user in users:
            user.recompute_saved = original
    assert len(recomputed) == count and all(ref() is None for ref in recomputed)  # not held by the graph
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *module.parameters()], grad)
    assert recomputed.count("called") == count
    token = layers.RECOMPUTE_SAVED.set(False)
    try:
        plain = module(x)
        theirs = torch.autograd.grad(plain, [x, *module.parameters()], grad)
    finally:
        layers.RECOMPUTE_SAVED.reset(token)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "fast, plain",
    [
        (layers.GELU(), lambda x: F.gelu(x)),
        (layers.GELU(approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
        (_randomise(layers.Pointwise(6, 5)), None),  # None: nn.Conv2d's own forward
    ],
    ids=["gelu", "gelu-tanh", "pointwise"],
)
def test_channels_last_views_compute_the_plain_op_in_the_same_layout(fast, plain, channels_last):
    """GELU and the 1x1 conv run channels_last CPU maps on their NHWC view: same values, gradients, layout."""
    plain = plain or (lambda x: torch.nn.Conv2d.forward(fast, x))
    x = torch.randn(2, 6, 7, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, fast.out_channels if hasattr(fast, "out_channels") else 6, 7, 5)
    results = []
    for forward in (fast, plain):
        leaf = x.clone().requires_grad_()
        out = forward(leaf)
        out.backward(grad)
        results.append((out, leaf.grad))
    (out, dx), (expected, expected_dx) = results
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-5, atol=1e-6)
    assert out.stride() == expected.stride() and dx.stride() == expected_dx.stride()


def test_pointwise_reads_channel_slices_of_channels_last_maps_in_place():
    """The Focus-Net's x / prior split and ContMix's query / key split hand 1x1 convs channel slices of
    channels_last maps: they run as a matrix product on the slice (values and gradients of the conv)."""
    conv = _randomise(layers.Pointwise(6, 5))
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(2, 10, 7, 5, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert layers.cpu_channels_innermost(full[:, 3:9]) and not layers.cpu_channels_innermost(full[:, ::2])
    grad = torch.randn(2, 5, 7, 5, generator=gen)
    results = []
    for forward in (conv, lambda x: torch.nn.Conv2d.forward(conv, x.contiguous())):
        out = forward(full[:, 3:9])
        results.append((out, *torch.autograd.grad(out, [full, conv.weight, conv.bias], grad)))
    for ours, theirs in zip(*results, strict=True):  # (the weight's and bias's: sums of 70 products)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)


def test_onednn_takes_every_inference_product_where_mkl_is_not_at_home():
    """MKL's fastest paths are for Intel CPUs: there only tall products take oneDNN's linear; on other
    vendors' CPUs every product does; an unknown CPU keeps the Intel rule."""
    assert layers.onednn_linear_min_rows("GenuineIntel") == layers.onednn_linear_min_rows(None) == 4096
    assert layers.onednn_linear_min_rows("AuthenticAMD") == 0


@pytest.mark.skipif(not layers._onednn_linear_available(), reason="this PyTorch has no oneDNN linear")
def test_tall_pointwise_products_take_onednns_linear_in_training_and_at_inference(monkeypatch):
    """Maps of at least ONEDNN_LINEAR_MIN_ROWS pixels (images x height x width) run oneDNN's linear,
    with or without a gradient and in training mode under no_grad too (a recomputation in the
    backward repeats the forward's op); the same product and gradients as F.linear. Autocast keeps
    F.linear."""
    taken = []
    onednn = torch.ops.mkldnn._linear_pointwise

    class Spy:
        @staticmethod
        def _linear_pointwise(*args):
            taken.append(args[0].shape)
            return onednn(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", Spy)
    monkeypatch.setattr(layers, "ONEDNN_LINEAR_MIN_ROWS", 2 * 7 * 5)
    conv = _randomise(layers.Pointwise(6, 5)).eval()
    twin = copy.deepcopy(conv)
    x = torch.randn(2, 6, 7, 5).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.Conv2d.forward(twin, x.contiguous())
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last)[:1]), expected[:1])
    with torch.inference_mode():
        out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert taken == [(2, 7, 5, 6), (2, 7, 5, 6)]  # not the one image: 35 rows are under the limit
    x.requires_grad_()
    out = conv.train()(x)
    assert len(taken) == 3 and out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 5, 7, 5)  # an NCHW gradient for a channels_last output
    ours = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    assert len(taken) == 4  # the input's gradient: a oneDNN product too
    theirs = torch.autograd.grad(F.conv2d(x, twin.weight, twin.bias), (x, twin.weight, twin.bias), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # training mode without a gradient: the same op as with one
        torch.testing.assert_close(conv(x), out, rtol=0, atol=0)
    assert len(taken) == 5
    # second derivatives (a gradient penalty): the backward builds its graph from differentiable ops
    (penalty,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
    (expected_penalty,) = torch.autograd.grad(F.conv2d(x, twin.weight, twin.bias).square().sum(), x, create_graph=True)
    ours = torch.autograd.grad(penalty.square().sum(), conv.weight)
    theirs = torch.autograd.grad(expected_penalty.square().sum(), twin.weight)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    taken.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    assert taken == []


@pytest.mark.parametrize("compiled_middle", [False, True])
def test_conv_mlp_recomputes_hidden_maps_with_identical_gradients(compiled_middle, monkeypatch):
    """PyTorch's composition recomputes GELU's output and GRN's; the compiled GELU -> dwconv op
    (kernels/gelu_dwconv.py) keeps no GELU output at all, GRN's input is recomputed and GRN's output
    is never needed (GRN -> fc2 as one op). Both remake fc1's output from x, once per backward."""
    monkeypatch.setattr(layers, "FC1_REMADE_MIN_POSITIONS", 0)  # (remade on this test's small map too)
    if compiled_middle and not kernels.native.library(kernels.gelu_dwconv.LIBRARY):
        pytest.skip(kernels.native.status(kernels.gelu_dwconv.LIBRARY))
    if not compiled_middle:
        monkeypatch.setattr(kernels.gelu_dwconv, "native_applies", lambda *args: False)
    mlp = _randomise(layers.ConvMLP(6, 24, 6)).train()
    x = torch.randn(2, 6, 11, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    _assert_recomputes(mlp, x, count=_mlp_recipes() if compiled_middle else 3)
    out = mlp(x)
    calls = _count_forward_calls(mlp.fc1)
    out.backward(torch.randn_like(out))
    assert calls == [1]  # read by two recipes (or a recipe and the middle op's backward), made once


def _mlp_recipes() -> int:
    """How many maps a ConvMLP remakes in its backward: fc1's output and GRN's input with the compiled
    middle op (GRN -> fc2 as one op needs no GRN output), else also GELU's and GRN's outputs but not
    GRN's input (which GRN keeps)."""
    return 2 if kernels.native.library(kernels.gelu_dwconv.LIBRARY) else 3


def test_dilated_rep_conv_recomputes_its_branch_outputs_with_identical_gradients(monkeypatch):
    """Op by op (under autocast or hooks) the branches' BNs keep a recipe, not the branch output: the
    same gradients, bit for bit."""
    layer = _randomise(DilatedRepConv(4, 13)).train()
    monkeypatch.setattr(DilatedRepConv, "_sums_in_one_op", lambda self, x: False)
    x = torch.randn(2, 4, 15, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    _assert_recomputes(layer, x, count=len(layer.branches))


def test_stem_runs_cpu_inputs_in_channels_last_with_the_plain_outputs():
    """The stem's layout switch changes the speed, not the values, and stays out of traced graphs."""
    from overlock.builder import build
    from overlock.builder.mixers import Stem

    torch.manual_seed(0)
    model = build("pico").eval()
    stem = model.base.stem
    assert isinstance(stem, Stem) and not any(k.startswith(("0.", "1.")) for k in stem.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert stem(x).is_contiguous(memory_format=torch.channels_last)
        fast = model(x)
        plain = torch.nn.Sequential.forward
        original, Stem.forward = Stem.forward, plain
        try:
            expected = model(x)
        finally:
            Stem.forward = original
        torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)
        traced = torch.jit.trace(stem, x)
    assert "contiguous" not in str(traced.graph)


def test_folding_sequential_folds_eval_bns_into_the_conv_before_them_only():
    """Eval: conv -> BN runs as one conv (no BN call), same outputs; training, hooks and traces run the BN."""
    seq = _randomise(
        layers.FoldingSequential(
            OrderedDict(
                dw=torch.nn.Conv2d(6, 6, 3, padding=1, groups=6),
                bn=torch.nn.BatchNorm2d(6),
                act=torch.nn.GELU(),
                proj=layers.Pointwise(6, 4, bias=False),
                bn2=torch.nn.BatchNorm2d(4),
                bn3=torch.nn.BatchNorm2d(4),  # a BN after a BN is not folded
            )
        )
    ).eval()
    x = torch.randn(2, 6, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = torch.nn.Sequential.forward(seq, x)
        bn_calls = []
        for bn in (seq.bn, seq.bn2):
            original = bn.forward
            bn.forward = lambda *a, _f=original: (bn_calls.append(1), _f(*a))[1]
        torch.testing.assert_close(seq(x), expected, rtol=1e-5, atol=1e-6)
        assert bn_calls == []  # both folded; instance-level patches are not hooks
        handle = seq.bn.register_forward_hook(lambda *a: None)
        torch.testing.assert_close(seq(x), expected, rtol=1e-5, atol=1e-6)
        assert len(bn_calls) == 1  # a hooked BN really runs
        handle.remove()
        assert str(torch.jit.trace(seq, x).inlined_graph).count("aten::batch_norm") == 3
    seq.train()
    torch.testing.assert_close(seq(x), torch.nn.Sequential.forward(copy.deepcopy(seq), x))


@pytest.mark.skipif(not layers._onednn_conv_post_ops_available(), reason="this PyTorch has no oneDNN fused conv")
@pytest.mark.parametrize(
    "activation",
    [layers.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.SiLU(), torch.nn.ReLU()],
    ids=["gelu", "gelu-tanh", "silu", "relu"],
)
@pytest.mark.parametrize("groups, stride", [(1, 2), (6, 1)], ids=["full-stride2", "depthwise"])
def test_folding_sequential_applies_the_activation_inside_onednns_conv_at_cpu_inference(
    activation, groups, stride, monkeypatch
):
    """Eval, no gradient, a channels_last float32 CPU map: conv -> BN -> activation is one oneDNN
    convolution with the activation as its post-op (the activation module is not called), the same
    values; a hooked activation, an NCHW map, a gradient to record, autocast, a trace and a conv with a
    forward of its own (`Pointwise`) take the separate ops."""
    taken = []
    onednn = torch.ops.mkldnn

    class Spy:
        _linear_pointwise = onednn._linear_pointwise

        @staticmethod
        def _convolution_pointwise(*args):
            taken.append(args[7])
            return onednn._convolution_pointwise(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", Spy)
    seq = _randomise(
        layers.FoldingSequential(
            OrderedDict(
                conv=torch.nn.Conv2d(6, 6, 3, stride, 1, groups=groups, bias=False),
                bn=torch.nn.BatchNorm2d(6),
                act=activation,
                proj=layers.Pointwise(6, 4, bias=False),
                bn2=torch.nn.BatchNorm2d(4),
                act2=torch.nn.SiLU(),  # after a Pointwise: its own op
            )
        )
    ).eval()
    x = torch.randn(2, 6, 11, 9, generator=torch.Generator().manual_seed(7)).contiguous(
        memory_format=torch.channels_last
    )
    with torch.no_grad():
        expected = torch.nn.Sequential.forward(seq, x)
    act_calls = []
    original = seq.act.forward
    seq.act.forward = lambda y: (act_calls.append(1), original(y))[1]  # an instance patch, not a hook
    with torch.no_grad():
        out = seq(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert len(taken) == 1 and act_calls == []
    with torch.inference_mode():
        torch.testing.assert_close(seq(x), expected, rtol=1e-5, atol=1e-6)
    assert len(taken) == 2 and act_calls == []

    def separate(run) -> None:
        before = len(taken), len(act_calls)
        torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-5)
        assert (len(taken), len(act_calls)) == (before[0], before[1] + 1)

    handle = seq.act.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        separate(lambda: seq(x))
    handle.remove()
    with torch.no_grad():
        separate(lambda: seq(x.contiguous()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = len(taken)
            seq(x)
            assert len(taken) == before
    separate(lambda: seq(x).detach())  # eval with autograd on: the weights' gradient may be asked for
    with torch.no_grad():  # an input that requires a gradient, but nothing records one: one op
        before = len(taken)
        torch.testing.assert_close(seq(x.clone().requires_grad_()), expected, rtol=1e-5, atol=1e-6)
        assert len(taken) == before + 1
    with torch.no_grad():
        before = len(taken)
        traced = torch.jit.trace(seq, x, check_trace=False)  # (the check reruns it untraced)
    assert len(taken) == before and "aten::_convolution" in str(traced.inlined_graph)


def test_recompute_saved_remakes_views_of_the_tensor_and_nothing_outside_it():
    """Ops may keep channel slices of the map (ContMix's query and key projections): each is remade as
    the same view of the recipe's value; a slice of the same storage outside the map is kept as it is."""
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(2, 9, 5, 4, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(1, 3, 1, 1, generator=gen, requires_grad=True)

    def run(recompute: bool):
        calls = []
        scaled = big * 3  # a fresh channels_last map; `inside` is the part the recipe remakes
        inside = scaled[:, :6]

        def recipe():
            calls.append(1)
            return (big.detach() * 3)[:, :6]

        context = layers.recompute_saved(inside, recipe) if recompute else contextlib.nullcontext()
        with context:
            out = (inside[:, 1:4] * weight).sum() + (inside[:, 3:6] * weight).sum() + (scaled[:, 6:] * weight).sum()
        return torch.autograd.grad(out, (big, weight)), calls

    (ours, calls), (theirs, _) = run(True), run(False)
    assert len(calls) == 2  # the two slices inside; the one outside was kept
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recompute_saved_tells_meta_maps_apart_by_storage():
    """Meta tensors (the memory estimate's forward) take the same hooks: every meta storage's data
    pointer is 0, so a map is told from another by its storage, and a view by its offset in it."""
    big = torch.empty(2, 9, 5, 4, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.empty(1, 3, 1, 1, device="meta", requires_grad=True)
    scaled, other = big * 3, big * 2  # two maps, both "at" address 0
    inside = scaled[:, :6]
    recipe = layers.RecomputedOnce(lambda: pytest.fail("a forward alone never remakes"))
    with layers.recompute_saved(inside, recipe):
        (inside[:, 1:4] * weight).sum() + (other[:, 1:4] * weight).sum() + (scaled[:, 6:] * weight).sum()
    assert recipe.pending == 1  # the slice inside; the other map's slice and the one outside were kept


def test_recomputation_runs_under_the_forwards_autocast_state():
    """Under bfloat16 autocast the recomputed branch outputs are bfloat16 too: same gradients as kept ones."""
    layer = _randomise(DilatedRepConv(4, 7)).train()
    x = torch.randn(2, 4, 12, 11, requires_grad=True)
    grads = []
    for recompute in (True, False):
        token = layers.RECOMPUTE_SAVED.set(recompute)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            grads.append(torch.autograd.grad(out.float().sum(), [x, *layer.parameters()]))
        finally:
            layers.RECOMPUTE_SAVED.reset(token)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_mode_compiles_as_one_graph_with_the_eager_gradients():
    """Under torch.compile the eager-only fast paths (recompute hooks, hand-written backward functions,
    the custom depthwise op) step aside: one graph, no breaks, and the eager gradients."""
    from overlock.builder import build

    torch.manual_seed(0)
    model = build("pico").train()
    x = torch.randn(2, 3, 64, 64)

    def grads(run):
        model.zero_grad(set_to_none=True)
        out = run(x)
        (out["main"].square().sum() + out["aux"].square().sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    state = copy.deepcopy(model.state_dict())  # BN running statistics move with every training call
    eager = grads(model)
    model.load_state_dict(state)
    torch._dynamo.reset()
    compiled = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_shared_recipe_computes_once_for_two_unpacks_then_forgets():
    calls = []
    shared = layers.shared_recipe(lambda: (calls.append(1), torch.ones(3))[1])
    first, second = shared(), shared()
    assert first is second and len(calls) == 1  # the second unpack gets the first one's value
    third = shared()  # a later backward (retain_graph) computes anew
    assert third is not first and len(calls) == 2


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_stem_keeps_only_bn_inputs_with_identical_gradients(channels_last):
    """conv -> BN -> GELU -> conv: the GELU's input and output are recomputed from the BN's input
    (three BN -> GELU -> conv runs in the stem), bit for bit the gradients of the plain run."""
    from overlock.builder.mixers import conv_stem

    stem = _randomise(conv_stem(3, 6, 8, "batchnorm")).train()
    x = torch.randn(2, 3, 20, 18)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_recomputes(stem, x.requires_grad_(), count=6)


def test_training_bn_activation_at_the_end_recomputes_only_the_bn_output():
    """The gate (conv -> BN -> SiLU) returns the activation: whoever reads it keeps it; the SiLU's
    input is recomputed. A hooked activation is really called and keeps what it was given."""
    gate = _randomise(layers.conv_bn(5, 5)).train()
    gate.add_module("act", torch.nn.SiLU())
    x = torch.randn(2, 5, 6, 7).requires_grad_()
    _assert_recomputes(gate, x, count=1)
    seen = []
    gate.act.register_forward_hook(lambda module, args, out: seen.append(out))
    _assert_recomputes(gate, x, count=0)
    assert seen


@pytest.mark.parametrize("size", [13, 14, 28])
def test_conv_mlp_remakes_fc1_output_only_on_maps_of_the_threshold_or_more(size):
    """fc1's output is remade in the backward on maps of `FC1_REMADE_MIN_POSITIONS` (28x28) or more
    and kept on smaller ones (14x14 and 7x7 at 224 input); the same gradients either way."""
    mlp = _randomise(layers.ConvMLP(8, 32, 8)).train()
    x = torch.randn(2, 8, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    calls = _count_forward_calls(mlp.fc1)
    out = mlp(x)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
    remade = size * size >= layers.FC1_REMADE_MIN_POSITIONS
    assert calls[0] == (2 if remade else 1)
    _assert_gradients_as_when_every_map_is_kept(mlp, x, grad, ours)


def _assert_gradients_as_when_every_map_is_kept(module, x, grad, ours) -> None:
    """`ours`, the gradients of x and the parameters, are bit for bit those of a run that keeps
    every map for the backward (`recompute_saved` off)."""
    with layers.recomputation_off():
        theirs = torch.autograd.grad(module(x), [x, *module.parameters()], grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


needs_compiled_mlp_backward = pytest.mark.skipif(
    not (kernels.native.library(kernels.gelu_dwconv.LIBRARY) and kernels.native.library(kernels.grn.LIBRARY)),
    reason="the compiled MLP middle and GRN backward",
)


def _spy_pointers(monkeypatch, functions):
    """The arguments of the first compiled call (pointers as addresses) to one of `functions`, per op."""
    calls = []
    original = kernels.native.run

    def spied(name, function, tasks, arguments):
        if function in functions:
            calls.append((function, [getattr(arg, "value", arg) for arg in arguments]))
        return original(name, function, tasks, arguments)

    monkeypatch.setattr(kernels.native, "run", spied)
    return calls


@needs_compiled_mlp_backward
@pytest.mark.parametrize("threads, batch", [(1, 2), (3, 2)])
def test_conv_mlp_backward_writes_gradients_over_maps_nothing_reads_any_more(threads, batch, monkeypatch):
    """On maps whose fc1 output is remade, GRN's input gradient is written over GRN's remade input
    (GRN -> fc2 as one op, no GRN kernel of its own) and the middle op's over the remade fc1 output,
    where each compiled call covers whole images (with more threads than images a call covers rows,
    and reads rows another may have written: then a new map); the gradients are bit for bit those of
    the run that keeps every map, which writes over no map its forward made."""
    mlp = _randomise(layers.ConvMLP(8, 32, 8)).train()
    x = torch.randn(batch, 8, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_()
    names = ("overlock_grn_input_grad", "overlock_gelu_dwconv3x3_forward", "overlock_gelu_dwconv3x3_backward")
    calls = _spy_pointers(monkeypatch, names)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = mlp(x)
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
        _assert_gradients_as_when_every_map_is_kept(mlp, x, grad, ours)
    finally:
        torch.set_num_threads(before)
    forward, backward = "overlock_gelu_dwconv3x3_forward", "overlock_gelu_dwconv3x3_backward"
    assert [name for name, _ in calls] == [forward, forward, backward, forward, backward]
    # forward (hidden, taps, shift, out, ...), backward (hidden, grad, taps, grad_hidden, ...)
    _, (_, remade), (_, middle), (_, kept), (_, kept_middle) = calls
    # GRN's input gradient over its remade input. (The forward's own map was freed when the forward
    # ended, so the remade one may sit at the same address: only a map alive in the backward is news.)
    assert middle[1] == remade[3]
    assert (middle[0] == middle[3]) == (threads <= batch)
    assert kept_middle[1] != kept[3]  # the run that keeps every map: the forward's map stays as it was
    assert kept_middle[0] != kept_middle[3]  # and fc1's output: its own, not a remade one


@needs_compiled_mlp_backward
def test_conv_mlp_backward_holds_two_hidden_maps_at_once():
    """The MLP's backward on a map whose fc1 output is remade: the remade fc1 output and GRN's remade
    input, whose gradient is written over it (GRN -> fc2 as one op, round 19), then the middle op's
    over the remade fc1 output. GRN's output and its gradient are never maps. Before round 18: 4.5
    hidden maps' worth alive at once, before round 19 3.4. The narrow maps (x's gradient, the
    output's) come on top of the two."""
    from overlock.bench import LiveMemory

    memory = LiveMemory()
    if not memory.available:
        pytest.skip("needs glibc's mallinfo2")
    mlp = _randomise(layers.ConvMLP(8, 64, 8)).train()
    x = torch.randn(2, 8, 56, 56).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 8, 56, 56).contiguous(memory_format=torch.channels_last)
    mlp(x).backward(grad)  # (the first products of a process allocate the libraries' own buffers)
    out = mlp(x)
    hidden_map = 2 * 64 * 56 * 56 * 4 / 2**20
    assert memory.measure(lambda: out.backward(grad)) < 3 * hidden_map


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "NCHW"])
@pytest.mark.parametrize("hook", [None, "fc2 backward", "grn forward"])
def test_conv_mlp_backward_leaves_the_gradients_hooks_hold_as_they_were(hook, channels_last):
    """A gradient a hook kept (fc2's input gradient through a full backward hook, GRN's output
    gradient through a tensor hook its forward hook put there) is not written over by GRN's backward
    (in C on channels_last maps, in PyTorch ops on NCHW ones)."""
    mlp = _randomise(layers.ConvMLP(8, 32, 8)).train()
    x = torch.randn(2, 8, 28, 28)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    held = []
    if hook == "fc2 backward":
        mlp.fc2.register_full_backward_hook(lambda module, grad_in, grad_out: held.append(grad_in[0]))
    elif hook == "grn forward":

        def watch(module, args, out):
            out[0].register_hook(held.append)  # (ConvMLP calls GRN `with_recipe`: the output and its recipe)

        mlp.grn.register_forward_hook(watch)
    out = mlp(x)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
    if hook is not None:
        (kept,) = held
        fc2_input_grad = F.conv2d(grad, mlp.fc2.weight.transpose(0, 1))  # a 1x1 conv's, whatever its input
        torch.testing.assert_close(kept, fc2_input_grad, rtol=1e-5, atol=1e-5)
    _assert_gradients_as_when_every_map_is_kept(mlp, x, grad, ours)


def test_training_bn_recomputation_updates_running_statistics_once():
    from overlock.builder.mixers import conv_stem

    stem = _randomise(conv_stem(3, 4, 4, "batchnorm")).train()
    twin = copy.deepcopy(stem)
    x = torch.randn(2, 3, 16, 16)
    stem(x).sum().backward()  # the backward's recomputations must not touch the running statistics
    token = layers.RECOMPUTE_SAVED.set(False)
    try:
        twin(x).sum().backward()
    finally:
        layers.RECOMPUTE_SAVED.reset(token)
    for ours, theirs in zip(stem.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_contmix_logits_through_the_keys_equal_the_published_form(monkeypatch):
    """q (k^T W^T) + b against (q k^T) W^T + b: the same output and gradients, float rounding aside;
    without a gradient (inference) ContMix takes the published form. (Both as a logits map: where
    the C kernels form the logits themselves, the next test.)"""
    from overlock.builder import contmix

    monkeypatch.setattr(contmix, "forms_logits_inside", lambda proj, backend, *tensors: False)
    mixer = _randomise(contmix.ContMix(16, 16, kernel_size=7, small_kernel_size=3, groups=2, region_centers=3))
    x = torch.randn(2, 16, 11, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    leaves = [x, *mixer.parameters()]
    assert contmix.logits_through_keys(mixer.kernel_proj)
    with torch.no_grad():
        assert not contmix.logits_through_keys(mixer.kernel_proj)
    out = mixer(x)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    monkeypatch.setattr(contmix, "logits_through_keys", lambda proj: False)
    published = mixer(x)
    theirs = torch.autograd.grad(published, leaves, grad)
    torch.testing.assert_close(out, published, rtol=1e-5, atol=1e-6)
    for got, expected in zip(ours, theirs, strict=True):  # (sums over every position: atol 1e-5)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_contmix_logits_formed_inside_the_kernels_equal_the_logits_map(monkeypatch, channels_last):
    """Where the C kernels form the logits from queries and keys (`forms_logits_inside`), ContMix
    computes what it computes from the logits map: output, every gradient, eval output; and it
    keeps no logits to recompute. A hook on the projection, a jit trace or another backend: the map."""
    from overlock import kernels
    from overlock.builder import contmix

    mixer = _randomise(contmix.ContMix(32, 32, kernel_size=7, small_kernel_size=3, groups=2, region_centers=3))
    x = torch.randn(2, 32, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    leaves = [x, *mixer.parameters()]
    value = torch.zeros(1, 1, 7, 7, 16)
    if not kernels.logits_formed_inside("auto", value):
        pytest.skip("the C kernels are not built here")
    assert not kernels.logits_formed_inside("reference", value)
    assert not kernels.logits_formed_inside("auto", value.double())
    formed = []
    apply = kernels.cpu.ContMixFromQueries.apply
    monkeypatch.setattr(kernels.cpu.ContMixFromQueries, "apply", lambda *a: (formed.append(1), apply(*a))[1])
    out = mixer(x)
    assert len(formed) == 2  # both kernels
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    _assert_recomputes(mixer, x, count=0)
    mixer.contmix_backend = "reference"
    formed.clear()
    reference_out = mixer(x)
    assert not formed
    mixer.contmix_backend = "auto"
    handle = mixer.kernel_proj.register_forward_hook(lambda module, args, out: None)
    mixer(x)
    assert not formed
    handle.remove()
    inside = contmix.forms_logits_inside
    monkeypatch.setattr(contmix, "forms_logits_inside", lambda proj, backend, *tensors: False)
    published = mixer(x)
    theirs = torch.autograd.grad(published, leaves, grad)
    with torch.no_grad():
        published_inferred = mixer.eval()(x)
        monkeypatch.setattr(contmix, "forms_logits_inside", inside)
        inferred = mixer(x)
    assert len(formed) == 2
    torch.testing.assert_close(out, published, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference_out, published, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inferred, published_inferred, rtol=1e-5, atol=1e-6)
    for got, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("through_keys", [True, False], ids=["through-keys", "from-affinities"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_contmix_recomputes_its_kernel_logits_with_identical_gradients(monkeypatch, channels_last, through_keys):
    """Both kernels' logits (one map, two views) come back from their product in the backward,
    computed once, in either form (`logits_through_keys`); unless a hook sees the projection's output."""
    from overlock.builder import contmix

    monkeypatch.setattr(contmix, "forms_logits_inside", lambda proj, backend, *tensors: False)
    mixer = _randomise(contmix.ContMix(8, 8, kernel_size=5, small_kernel_size=3, groups=2, region_centers=3)).train()
    x = torch.randn(2, 8, 9, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    calls = []
    if through_keys:
        product = contmix.logits_from_mixed_keys
        monkeypatch.setattr(contmix, "logits_from_mixed_keys", lambda *args: (calls.append(1), product(*args))[1])
    else:
        monkeypatch.setattr(contmix, "logits_through_keys", lambda proj: False)
        original = mixer.kernel_proj._conv_forward
        mixer.kernel_proj._conv_forward = lambda *args: (calls.append(1), original(*args))[1]
    _assert_recomputes(mixer, x, count=2)
    assert len(calls) == 3  # the recomputing run: forward + one backward recomputation; the plain run
    mixer.kernel_proj.register_forward_hook(lambda module, args, out: None)
    _assert_recomputes(mixer, x, count=0)


def test_basic_block_recomputes_the_excited_map_with_identical_gradients(monkeypatch):
    """SE's output (the FFN's input) is SE's input times its gate, both kept by the product: one
    recipe more in a Base-Net block (beside its branches' and its ConvMLP's), the same gradients."""
    monkeypatch.setattr(layers, "FC1_REMADE_MIN_POSITIONS", 0)  # (fc1's output remade on a small map too)
    from overlock.builder import build
    from overlock.builder.blocks import BasicBlock

    block = next(m for m in build("pico").modules() if isinstance(m, BasicBlock))
    block = _randomise(block).train()
    x = torch.randn(2, block.bn.num_features, 9, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    # SE's, the ConvMLP's (`_mlp_recipes`), the BN's after the large kernel (SE's input), the norm's
    # (the large kernel's input) and the local conv's output for the norm (and for the LayerScale on
    # the skip, where the block has one); the large kernel's branches are recomputed inside its one op
    local = 1 + (block.layer_scale is not None)
    mlp = _mlp_recipes()
    _assert_recomputes(block, x, count=1 + mlp + 1 + 1 + local)
    block.bn.register_forward_hook(lambda module, args, out: None)  # a watched BN's output is kept
    _assert_recomputes(block, x, count=1 + mlp + 1 + local)
    block.se.register_forward_hook(lambda module, args, out: None)  # a watched SE runs as it is
    _assert_recomputes(block, x, count=mlp + 1 + local)
    block.dwconv.register_forward_hook(lambda module, args, out: None)  # so does a watched local conv
    _assert_recomputes(block, x, count=mlp + 1)  # (the norm's output then remade from its input)
    block.norm.register_forward_hook(lambda module, args, out: None)  # and a watched norm
    _assert_recomputes(block, x, count=mlp)


def test_basic_block_without_se_remakes_the_ffn_input_from_its_bn(monkeypatch):
    """Without SE the FFN's first 1x1 conv keeps the BN's output: remade from the BN's input, and
    fc1's own recipe reads it through that recipe (nothing holds the map), the same gradients."""
    monkeypatch.setattr(layers, "FC1_REMADE_MIN_POSITIONS", 0)
    from overlock.builder import build
    from overlock.builder.blocks import BasicBlock

    block = next(m for m in build("pico").modules() if isinstance(m, BasicBlock))
    block = _randomise(block).train()
    block.se = None
    x = torch.randn(2, block.bn.num_features, 9, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    _assert_recomputes(block, x, count=_mlp_recipes() + 1 + 1 + 1 + (block.layer_scale is not None))


class _AfterPreviousBlock(torch.nn.Module):
    """A Focus-Net block fed as the stage feeds it: x and P split from the previous block's output."""

    def __init__(self, block: torch.nn.Module, prior0: torch.Tensor) -> None:
        super().__init__()
        self.block, self.prior0 = block, prior0
        self.width = block.out_proj.conv.in_channels

    def forward(self, previous: torch.Tensor) -> torch.Tensor:
        x, prior = previous.split([self.width, previous.shape[1] - self.width], dim=1)
        return self.block(x, prior, self.prior0)


def _recording_maps(module: torch.nn.Module, maps: dict[str, weakref.ref], inputs: str | None, outputs: str | None):
    """Replace `module.forward` (an instance attribute, not a hook: the fast paths stay on) by one that
    records weak references to its input and output (the first tensor of a tuple) under those names."""
    forward = module.forward

    def recorded(x, *args, **kwargs):
        out = forward(x, *args, **kwargs)
        for name, value in ((inputs, x), (outputs, out[0] if isinstance(out, tuple) else out)):
            if name is not None:
                maps[name] = weakref.ref(value)
        return out

    module.forward = recorded


def test_dynamic_block_keeps_none_of_the_maps_it_remakes():
    """A Focus-Net block that re-injects the prior remakes these maps in the backward instead of
    keeping them: cat(x, alpha P + beta P0), the local conv's input, from the previous block's
    output (which alpha keeps); the fusion's depthwise output (its BN's input) from the normed
    map's recipe; z, the fusion's GRN output (kept by the gate's conv, the LePE and ContMix), from
    GRN's input; the gate's SiLU output from its BN's input; out_proj(mixed) + LePE, SE's output
    and the gated map (kept by SE's product, the gate's product and proj's BN) from the two BNs'
    inputs and the products' other factors; proj's BN output (kept by its conv) from its input. None of them is held by the graph; each that a
    watched module makes (a hook may change it) is; alpha and the conv run once more in the
    backward; outputs and gradients are bit for bit those of the run that keeps them."""
    from overlock.builder import build

    model = _randomise(build("pico")).train()
    block = [m for m in model.modules() if type(m).__name__ == "DynamicBlock"][1]
    assert block.alpha is not None and block.se is not None and block.gate is not None
    channels = block.norm1.normalized_shape[0]
    gen = torch.Generator().manual_seed(5)
    prior0 = torch.randn(2, channels - block.out_proj.conv.in_channels, 9, 8, generator=gen)
    module = _AfterPreviousBlock(block, prior0.contiguous(memory_format=torch.channels_last))
    previous = torch.randn(2, channels, 9, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    previous.requires_grad_()
    maps: dict[str, weakref.ref] = {}
    with_prior = block._with_prior
    block._with_prior = lambda *args: (result := with_prior(*args), maps.update(fused=weakref.ref(result[0])))[0]
    _recording_maps(block.fusion.dwconv, maps, None, "fusion conv")
    _recording_maps(block.fusion.grn, maps, None, "z")
    _recording_maps(block.gate.act, maps, None, "gate")
    _recording_maps(block.se, maps, "sum", "excited")
    _recording_maps(block.proj.bn, maps, "gated", "proj bn")
    alpha_calls, conv_calls = _count_forward_calls(block.alpha), _count_forward_calls(block.fusion.dwconv)

    def run(recompute: bool) -> tuple[set[str], tuple[torch.Tensor, ...]]:
        maps.clear()
        token = layers.RECOMPUTE_SAVED.set(recompute)
        try:
            out = module(previous)
            held = {name for name, ref in maps.items() if ref() is not None}
            grads = torch.autograd.grad(out, [previous, *module.parameters()], torch.ones_like(out))
        finally:
            layers.RECOMPUTE_SAVED.reset(token)
        return held, (out, *grads)

    held, ours = run(True)
    assert len(maps) == 8 and held == set()
    assert (alpha_calls[0], conv_calls[0]) == (2, 2)
    plain_held, theirs = run(False)
    assert plain_held == set(maps)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    block.alpha.register_forward_hook(lambda module, args, out: None)
    assert run(True)[0] == {"fused"}
    block.fusion.dwconv.register_forward_hook(lambda module, args, out: None)
    assert run(True)[0] == {"fused", "fusion conv"}
    block.se.register_forward_hook(lambda module, args, out: None)  # its output and what reads it
    assert run(True)[0] == {"fused", "fusion conv", "sum", "excited", "gated"}
    block.gate.act.register_forward_hook(lambda module, args, out: None)
    assert run(True)[0] == {"fused", "fusion conv", "sum", "excited", "gated", "gate"}
    block.fusion.grn.register_forward_hook(lambda module, args, out: None)
    assert run(True)[0] == set(maps) - {"proj bn"}  # (remade from its input, which it keeps)
    held, ours = run(True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _count_forward_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    forward = module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted  # an instance attribute, not a hook: the fast paths stay on
    return calls


@pytest.mark.parametrize("kind", ["BasicBlock", "DynamicBlock"])
def test_blocks_remake_what_they_keep_once_however_many_ops_kept_it(kind, monkeypatch):
    """The map after a block's local conv is kept by its norm and by the LayerScale on the skip; in a
    Focus-Net block the FFN's first 1x1 conv also keeps the LayerNorm of it; fc1's output is kept by
    the op after it. The backward remakes them from what the graph keeps anyway: each local conv and
    fc1 runs once more, not once per op (or recipe) that reads its output, and outputs, gradients
    and BN statistics are bit for bit those of the run that keeps them."""
    from overlock.builder import blocks, build

    monkeypatch.setattr(layers, "FC1_REMADE_MIN_POSITIONS", 0)  # (fc1's output remade on a small map too)

    model = _randomise(build("pico")).train()
    block = next(m for m in model.modules() if type(m).__name__ == kind)
    gen = torch.Generator().manual_seed(3)
    if kind == "BasicBlock":
        inputs = [torch.randn(2, block.bn.num_features, 9, 8, generator=gen)]
        convs = [block.dwconv, block.mlp.fc1]
    else:
        width = block.out_proj.conv.in_channels
        context = block.norm1.normalized_shape[0] - width
        inputs = [torch.randn(2, channels, 9, 8, generator=gen) for channels in (width, context, context)]
        convs = [block.dwconv1, block.dwconv2, block.mlp.fc1]
    inputs = [t.contiguous(memory_format=torch.channels_last).requires_grad_() for t in inputs]
    state = copy.deepcopy(block.state_dict())
    grad = None
    results = []
    for recompute in (True, False):
        block.load_state_dict(state)
        token = layers.RECOMPUTE_SAVED.set(recompute)
        try:
            calls = [_count_forward_calls(conv) for conv in convs]
            out = block(*inputs)
            assert [c[0] for c in calls] == [1] * len(convs)
            grad = torch.randn(out.shape, generator=gen) if grad is None else grad
            grads = torch.autograd.grad(out, [*inputs, *block.parameters()], grad, allow_unused=True)
            assert [c[0] for c in calls] == ([2] if recompute else [1]) * len(convs)
        finally:
            layers.RECOMPUTE_SAVED.reset(token)
            for conv in convs:
                del conv.forward
        results.append((out, grads, copy.deepcopy(block.state_dict())))
    (out, grads, after), (plain, plain_grads, plain_after) = results
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert grads[0] is not None and grads[-1] is not None
    for a, b in zip(grads, plain_grads, strict=True):
        assert (a is None) == (b is None)  # pico's Focus-Net does not re-inject the first prior
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, value in after.items():
        torch.testing.assert_close(value, plain_after[name], rtol=0, atol=0, msg=name)
    assert blocks.RecomputedOnce is layers.RecomputedOnce


def test_channel_splits_and_means_hand_back_channels_last_gradients():
    """A channels_last map's gradient stays channels_last through a channel split and SE's mean (basic
    slicing and the mean's backward write NCHW maps, which every later add then mixes with
    channels_last ones); the values are those of slicing and adaptive average pooling."""
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(2, 10, 6, 7, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    a, b, c = (torch.randn(2, n, 6, 7, generator=gen) for n in (4, 6, 10))
    c = c.contiguous(memory_format=torch.channels_last)  # as a gradient from the layers after SE

    def loss(x, prior):
        return (x * a).sum() + (prior * b).sum() + (f * layers.channel_means(f) * c).sum()

    (ours,) = torch.autograd.grad(loss(*layers.split_channels(f, 4)), f)
    (theirs,) = torch.autograd.grad(loss(f[:, :4], f[:, 4:]), f)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(layers.channel_means(f), torch.nn.AdaptiveAvgPool2d(1)(f))


def test_contmix_reads_channels_last_values_in_place():
    """ContMix's values are a view of a channels_last input (no copy) whose gradient comes back
    channels_last; outputs and gradients equal those of the NCHW input (values reshaped)."""
    from overlock.builder.contmix import ContMix

    mixer = _randomise(ContMix(8, 8, kernel_size=5, small_kernel_size=3, groups=2, region_centers=3)).train()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 9, 10, generator=gen)
    grad = torch.randn(2, 8, 9, 10, generator=gen)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        leaf = x.contiguous(memory_format=layout).requires_grad_()
        out = mixer(leaf)
        results.append((out, *torch.autograd.grad(out, [leaf, *mixer.parameters()], grad)))
    assert results[1][1].is_contiguous(memory_format=torch.channels_last)
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dilated_repconv_under_autocast_casts_its_input_once_for_every_branch():
    """Each branch's conv would cast the input to bfloat16 for itself and keep that copy for its
    backward (seven copies at K = 13); the block casts once, so one copy is kept, with the same outputs."""
    torch.manual_seed(0)
    conv = DilatedRepConv(8, 13).train()
    source = torch.randn(2, 8, 16, 16, requires_grad=True)
    x = source * 1  # an activation: autocast caches the casts of leaves (weights) only
    low = x.detach().to(torch.bfloat16)
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = conv(x)
    copies = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.bfloat16 and torch.equal(t, low)}
    assert len(copies) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what each conv computed when it cast x itself
        expected = conv.lk_bn(F.conv2d(low, conv.lk.weight, padding=6, groups=8))
        for branch in conv.branches.values():
            expected = expected + branch.bn(branch.conv(low))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().square().mean().backward()
    assert source.grad is not None and torch.isfinite(source.grad).all()


def _saved_bytes_per_image(model: torch.nn.Module, amp: bool) -> float:
    """Bytes a training forward keeps for the backward per image (batch 4 minus batch 2, so the
    weights and their autocast copies cancel), counting what the model's own recomputation lets through."""
    hooks = torch.autograd.graph.saved_tensors_hooks
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def kept(batch: int) -> int:
        storages: dict[int, int] = {}
        held = []  # (alive to the end: a freed storage's address could be another's)

        def pack(tensor):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in parameters:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                held.append(tensor)
            return tensor

        class Chained(hooks):  # PyTorch calls only the innermost hooks: count what the model's let through
            def __init__(self, inner_pack, inner_unpack):
                super().__init__(lambda t: pack(inner_pack(t)), inner_unpack)

        torch.autograd.graph.saved_tensors_hooks = Chained
        try:
            with hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                model(torch.randn(batch, 3, 64, 64))
        finally:
            torch.autograd.graph.saved_tensors_hooks = hooks
        return sum(storages.values())

    return (kept(4) - kept(2)) / 2


def test_under_autocast_a_training_forward_keeps_its_maps_once_in_low_precision():
    """The maps only convs read (norm outputs, SE's and GRN's outputs, DilatedRepConv's input) come out
    in autocast's dtype, so the convs keep those maps themselves, which the recomputation already
    covers, instead of a fresh low-precision copy each: about half the float32 bytes (0.82x before)."""
    torch.manual_seed(0)
    model = build("pico").train()
    ratio = _saved_bytes_per_image(model, amp=True) / _saved_bytes_per_image(model, amp=False)
    assert ratio < 0.62, ratio


def _folding_modules() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Every kind of module that keeps eval folds, with an input for it."""
    seq = layers.FoldingSequential(
        OrderedDict(conv=torch.nn.Conv2d(4, 6, 3, padding=1, bias=False), bn=torch.nn.BatchNorm2d(6))
    )
    lepe = LargeKernelBN(OrderedDict(conv=DilatedRepConv(4, 13), bn=torch.nn.BatchNorm2d(4)))
    return {
        "dilated-rep-conv": (DilatedRepConv(4, 13), torch.randn(2, 4, 15, 17)),
        "conv-bn": (seq, torch.randn(2, 4, 9, 7)),
        "res-dw-conv": (ResDWConv(4), torch.randn(2, 4, 9, 7)),
        "large-kernel-bn": (lepe, torch.randn(2, 4, 15, 17)),
    }


def _kept(module: torch.nn.Module) -> list[object]:
    """The fold values `module` and its children keep now."""
    return [kept[2] for m in module.modules() for kept in m.__dict__.get("_folds", {}).values()]


def _fresh(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module's eval output with every fold computed anew (a deep copy keeps none)."""
    twin = copy.deepcopy(module)
    assert _kept(twin) == []
    with torch.no_grad():
        return twin(x)


@pytest.mark.parametrize("kind", list(_folding_modules()))
def test_eval_folds_are_kept_until_a_source_changes(kind):
    module, x = _folding_modules()[kind]
    module = _randomise(module).eval()
    with torch.no_grad():
        first = module(x)
        kept = _kept(module)
        assert kept, "an eval forward keeps its folds"
        torch.testing.assert_close(module(x), first, rtol=0, atol=0)
        assert all(a is b for a, b in zip(_kept(module), kept, strict=True))  # reused, not recomputed
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point():  # an in-place write to any source: recomputed
                tensor.mul_(1.25)
                torch.testing.assert_close(module(x), _fresh(module, x), rtol=0, atol=0, msg=name)
    other = _randomise(copy.deepcopy(module), seed=5)
    module.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(module(x), _fresh(other, x), rtol=0, atol=0)
        module.to(torch.float64)  # a move forgets; the new dtype's folds are kept afresh
        assert _kept(module) == []
        assert module(x.double()).dtype == torch.float64
        next(module.parameters()).data.mul_(2.0)  # `.data` bypasses the version counter:
        module.eval()  # `.eval()` forgets the folds
        torch.testing.assert_close(module(x.double()), _fresh(module, x.double()), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(_folding_modules()))
def test_eval_folds_stay_differentiable_and_mode_safe(kind):
    module, x = _folding_modules()[kind]
    module = _randomise(module).eval()
    # With a gradient into the weights, nothing is kept and the gradients are those of a fresh copy.
    twin = copy.deepcopy(module)
    ours = torch.autograd.grad(module(x).square().sum(), list(module.parameters()))
    theirs = torch.autograd.grad(twin(x).square().sum(), list(twin.parameters()))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _kept(module) == []
    # Folds kept under inference mode serve a later input gradient with frozen weights.
    with torch.inference_mode():
        module(x)
    assert _kept(module)
    module.requires_grad_(False)
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(module(x).square().sum(), x)
    twin.requires_grad_(False)
    (expected,) = torch.autograd.grad(twin(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    module.train()
    assert _kept(module) == []


def test_kept_folds_leave_model_outputs_copies_and_deploy_form_unchanged():
    model = build("pico").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = _fresh(model, x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        assert len(_kept(model)) > 10
        assert _kept(copy.deepcopy(model)) == []
        # other weights for one call (torch.func): their own folds, then the model's again
        scaled = copy.deepcopy(model)
        for p in scaled.parameters():
            p.mul_(1.1)
        swapped = {**dict(scaled.named_parameters()), **dict(model.named_buffers())}
        torch.testing.assert_close(torch.func.functional_call(model, swapped, (x,)), scaled(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(model.reparameterize()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(_folding_modules()))
def test_kept_folds_are_stale_after_any_optimizer_step(kind):
    """Fused AdamW writes the weights without bumping their version counters: a step (of any
    optimizer) makes every kept fold stale (e.g. fine-tuning with the BNs in eval mode)."""
    module, x = _folding_modules()[kind]
    module = _randomise(module).eval()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, fused=True)
    before = {name: p._version for name, p in module.named_parameters()}
    for _ in range(2):
        with torch.no_grad():
            module(x)  # kept
        assert _kept(module)
        module(x).square().sum().backward()
        optimizer.step()
        with torch.no_grad():
            torch.testing.assert_close(module(x), _fresh(module, x), rtol=0, atol=0)
    assert before == {name: p._version for name, p in module.named_parameters()}  # why the step counts
