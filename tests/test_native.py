"""kernels.native and kernels.gelu_dwconv: the compiled C kernels compute what PyTorch's ops compute,
and everything still works (through PyTorch) where they cannot be built."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from overlock import kernels
from overlock.builder import layers
from overlock.kernels import gelu_dwconv, native

needs_library = pytest.mark.skipif(
    native.library(gelu_dwconv.LIBRARY) is None, reason=native.status(gelu_dwconv.LIBRARY)
)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty build cache and no loaded library; the real ones come back afterwards."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    native._load.cache_clear()
    yield tmp_path
    native._load.cache_clear()


def _inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, channels, rows, cols = shape
    hidden = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, 3, 3, generator=gen) * 0.5
    bias = torch.randn(channels, generator=gen)
    return hidden, weight, bias


# Channel counts that are and are not whole vectors (4, 8, 16 floats), maps of one row or column;
# multiples of 1024 channels, whose rows the kernels space out by a cache line (`ring_stride`).
SHAPES = [(2, 13, 5, 7), (3, 40, 1, 6), (1, 17, 4, 1), (2, 48, 9, 8), (1, 1, 3, 3), (2, 1024, 3, 4), (1, 2048, 4, 2)]


@needs_library
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_dwconv_matches_the_float64_composition(shape, threads):
    """Outputs, sums of squares and all three gradients against PyTorch's GELU + conv2d in float64."""
    hidden, weight, bias = (t.requires_grad_() for t in _inputs(shape))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, squares = kernels.gelu_dwconv3x3(hidden, weight, bias)
        assert out.grad_fn.name().startswith("_GeluDWConv")
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (hidden, weight, bias), grad)
    finally:
        torch.set_num_threads(before)
    assert out.is_contiguous(memory_format=torch.channels_last) and squares.shape == (shape[0], shape[1], 1, 1)
    double = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    expected, expected_squares = gelu_dwconv.reference(*double)
    expected_grads = torch.autograd.grad(expected, double, grad.double())
    for ours, theirs in [(out, expected), (squares, expected_squares), *zip(grads, expected_grads, strict=True)]:
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=2e-5 * theirs.abs().max().item())


@needs_library
def test_gelu_dwconv_without_grad_runs_the_forward_alone():
    hidden, weight, bias = _inputs((2, 20, 6, 6))
    with torch.no_grad():
        out, squares = kernels.gelu_dwconv3x3(hidden, weight, bias)
    expected, expected_squares = gelu_dwconv.reference(hidden, weight, bias)
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(squares, expected_squares, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "change",
    [
        lambda h, w, b: (h.double(), w.double(), b.double()),
        lambda h, w, b: (h.contiguous(), w, b),  # NCHW
        lambda h, w, b: (h, w.expand(-1, -1, 3, 3)[:, :, :, :2].contiguous(), b),  # not 3x3
        lambda h, w, b: (h[:0], w, b),  # empty
    ],
    ids=["float64", "nchw", "3x2-kernel", "empty"],
)
def test_gelu_dwconv_takes_the_pytorch_composition_for_what_the_kernel_does_not_cover(change):
    hidden, weight, bias = change(*_inputs((2, 6, 5, 5)))
    assert not gelu_dwconv.native_applies(hidden, weight, bias)
    if weight.shape[-1] != 3:
        return
    out, squares = kernels.gelu_dwconv3x3(hidden, weight, bias)
    torch.testing.assert_close((out, squares), gelu_dwconv.reference(hidden, weight, bias))


@pytest.mark.parametrize("batch, rows, workers", [(8, 56, 1), (8, 56, 2), (3, 14, 2), (1, 7, 4), (2, 1, 8), (5, 9, 3)])
def test_tasks_cover_every_row_of_every_image_once(batch, rows, workers):
    tasks = gelu_dwconv._tasks(batch, rows, workers)
    covered = [(b, y) for b0, b1, y0, y1 in tasks for b in range(b0, b1) for y in range(y0, y1)]
    assert sorted(covered) == [(b, y) for b in range(batch) for y in range(rows)]
    assert len(tasks) >= min(workers, batch * rows)  # every worker gets some work where there is enough


@needs_library
@pytest.mark.parametrize("training", [False, True])
def test_conv_mlp_with_the_compiled_middle_computes_the_composition(training, monkeypatch):
    """The whole MLP (fc1 -> GELU -> dwconv -> GRN -> fc2), outputs and every gradient, against the
    same module run through PyTorch's ops."""
    mlp = layers.ConvMLP(12, 40, 12).train(training)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in mlp.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.3)
    x = torch.randn(2, 12, 9, 7, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(gelu_dwconv, "native_applies", lambda *args: False)
        calls = []
        monkeypatch.setattr(gelu_dwconv, "_forward", _spy(calls, gelu_dwconv._forward))
        out = mlp(x)
        assert bool(calls) == compiled
        grads = torch.autograd.grad(out, [x, *mlp.parameters()], torch.ones_like(out))
        results.append((out, grads))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def _spy(calls, function):
    def spied(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return spied


@needs_library
def test_conv_mlp_keeps_the_composition_where_hooks_watch_its_modules():
    mlp = layers.ConvMLP(4, 8, 4)
    assert mlp._fused_middle(torch.randn(1, 8, 3, 3).contiguous(memory_format=torch.channels_last))
    mlp.act.register_forward_hook(lambda *args: None)
    assert not mlp._fused_middle(torch.randn(1, 8, 3, 3).contiguous(memory_format=torch.channels_last))


def test_without_a_compiler_everything_runs_through_pytorch(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-overlock")
    assert native.library(gelu_dwconv.LIBRARY) is None
    assert "PyTorch fallback" in native.status(gelu_dwconv.LIBRARY)
    assert "no C compiler" in native.status(gelu_dwconv.LIBRARY)
    hidden, weight, bias = _inputs((2, 6, 5, 5))
    assert not gelu_dwconv.native_applies(hidden, weight, bias)
    out = layers.ConvMLP(3, 6, 3)(torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 3, 5, 5) and not list(fresh_build.iterdir())
    logits, rpb, value = _contmix_inputs(1, 2, 5, 5, 4, 3)
    assert not kernels.cpu.native_applies(value, logits, rpb)
    assert kernels.contmix(logits, rpb, value, 3).shape == value.shape
    # one reason for all, said once, every library named
    summary = native.summary()
    assert summary.count("PyTorch fallback (no C compiler found") == 1
    assert all(name in summary.split(":")[0] for name in native.SIGNATURES)


def test_the_switch_turns_the_kernels_off(fresh_build, monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert native.library(gelu_dwconv.LIBRARY) is None
    assert f"{native.DISABLE_ENV}=0" in native.status(gelu_dwconv.LIBRARY)


def test_a_compiler_error_is_reported_in_one_line(fresh_build, monkeypatch, tmp_path):
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / f"{gelu_dwconv.LIBRARY}.c").write_text("this is not C;\n")
    monkeypatch.setattr(native, "SOURCE_DIR", broken)
    if native.compiler() is None:
        pytest.skip("no C compiler")
    assert native.library(gelu_dwconv.LIBRARY) is None
    status = native.status(gelu_dwconv.LIBRARY)
    assert "failed on csrc/gelu_dwconv.c" in status and "\n" not in status
    assert not [p for p in fresh_build.iterdir() if p.suffix == ".so"]  # no half-written library left


@needs_library
def test_the_build_is_cached_per_source_and_written_whole(fresh_build):
    assert native.library(gelu_dwconv.LIBRARY) is not None
    built = sorted(fresh_build.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so" and not built[0].name.startswith(".")
    stamp = built[0].stat().st_mtime_ns
    native._load.cache_clear()
    assert native.library(gelu_dwconv.LIBRARY) is not None
    assert sorted(fresh_build.iterdir()) == built and built[0].stat().st_mtime_ns == stamp  # reused


@needs_library
def test_an_unwritable_cache_folder_builds_in_a_private_one(fresh_build, monkeypatch):
    blocked = fresh_build / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv(native.CACHE_ENV, str(blocked))
    assert native.library(gelu_dwconv.LIBRARY) is not None


@needs_library
def test_a_changed_header_is_a_new_build(fresh_build, monkeypatch, tmp_path):
    sources = tmp_path / "csrc"
    sources.mkdir()
    for path in native.SOURCE_DIR.iterdir():
        (sources / path.name).write_text(path.read_text())
    monkeypatch.setattr(native, "SOURCE_DIR", sources)
    assert native.library(gelu_dwconv.LIBRARY) is not None
    (sources / "vectors.h").write_text((sources / "vectors.h").read_text() + "\n/* changed */\n")
    native._load.cache_clear()
    assert native.library(gelu_dwconv.LIBRARY) is not None
    assert len([p for p in fresh_build.iterdir() if p.name.startswith("gelu_dwconv-")]) == 2


needs_contmix_library = pytest.mark.skipif(
    native.library(kernels.cpu.NATIVE_LIBRARY) is None, reason=native.status(kernels.cpu.NATIVE_LIBRARY)
)


def _contmix_inputs(batch, heads, height, width, channels, kernel_size, seed=0):
    """ContMix's operands as the model hands them over: the logits a view of a wider map (both
    kernels' logits in one), the values a channel slice of a channels_last map, seen per head."""
    gen = torch.Generator().manual_seed(seed)
    kk = kernel_size * kernel_size
    logits = (torch.randn(batch, heads, height, width, kk + 9, generator=gen) * 3)[..., 9:]
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen)
    channels_last = torch.randn(batch, height, width, 2 * heads * channels, generator=gen)
    value = channels_last[..., heads * channels :].view(batch, height, width, heads, channels).permute(0, 3, 1, 2, 4)
    return logits, rpb, value


@needs_contmix_library
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 14, 14, 16, 13), (1, 2, 7, 9, 14, 7), (3, 1, 6, 5, 3, 5), (1, 2, 5, 8, 32, 5), (2, 5, 4, 4, 20, 3)],
    ids=str,
)
def test_contmix_forward_kernel_matches_the_float64_reference(shape, threads):
    """Output and log-sum-exp of the C forward against kernels/reference.py in float64: windows clamped
    at every border (a window as large as the map, maps not square), channels that are and are not
    whole vectors, (batch, head) rows split between threads."""
    from overlock.kernels import cpu, reference

    *_, height, width, _, kernel_size = shape
    logits, rpb, value = _contmix_inputs(*shape)
    assert cpu.native_applies(value, logits, rpb)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = cpu.contmix_forward(logits, rpb, value, kernel_size)
    finally:
        torch.set_num_threads(before)
    scores = logits.double() + reference.gather_rpb(rpb.double(), height, width, kernel_size)
    expected = reference.aggregate(torch.softmax(scores, dim=-1), value.double(), kernel_size)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=1e-6, atol=1e-5)
    assert out.shape == value.shape and out.is_contiguous()


def _assert_close_to_float64(ours, theirs) -> None:
    """Gradients against autograd of the float64 reference: same shapes, within 1e-5 of each one's scale."""
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@needs_contmix_library
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 14, 14, 16, 13), (1, 2, 7, 9, 14, 7), (3, 1, 6, 5, 3, 5), (1, 2, 20, 19, 16, 19), (2, 5, 4, 4, 20, 3)],
    ids=str,
)
def test_contmix_backward_kernel_matches_autograd_of_the_float64_reference(shape, threads):
    """d logits, d rpb and d value of the C backward (through the op, from the C forward's output and
    log-sum-exp) against autograd of kernels/reference.py in float64: clamped windows, a window row
    longer than a vector (K = 19), channels that are and are not whole vectors, rows split between threads."""
    from overlock.kernels import reference

    *_, height, width, _, kernel_size = shape
    logits, rpb, value = (t.clone().requires_grad_() for t in _contmix_inputs(*shape, seed=1))
    out = kernels.contmix(logits, rpb, value, kernel_size)
    grad = torch.randn_like(out)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = torch.autograd.grad(out, (logits, rpb, value), grad)
    finally:
        torch.set_num_threads(before)
    double = [t.detach().double().requires_grad_() for t in (logits, rpb, value)]
    scores = double[0] + reference.gather_rpb(double[1], height, width, kernel_size)
    expected = reference.aggregate(torch.softmax(scores, dim=-1), double[2], kernel_size)
    theirs = torch.autograd.grad(expected, double, grad.double())
    _assert_close_to_float64(ours, theirs)


@needs_contmix_library
def test_contmix_kernels_leave_the_rest_to_pytorch(monkeypatch):
    """float64, and the switch: the tiled PyTorch ops, the same values and gradients."""
    from overlock.kernels import cpu

    logits, rpb, value = _contmix_inputs(2, 2, 7, 7, 16, 5)
    assert not cpu.native_applies(value.double(), logits.double(), rpb.double())

    def run():
        inputs = [t.clone().requires_grad_() for t in (logits, rpb, value)]
        out = kernels.contmix(*inputs, 5)
        return out, *torch.autograd.grad(out, inputs, torch.ones_like(out))

    ours = run()
    monkeypatch.setattr(cpu, "native_applies", lambda *args: False)
    theirs = run()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_contmix_library
def test_contmix_kernels_refuse_shapes_they_would_read_past():
    """Called directly (not through `kernels.contmix`, which checks for users): a map smaller than
    the window, or logits of the wrong width, is an error, never a read past a buffer."""
    from overlock.kernels import cpu

    logits, rpb, value = _contmix_inputs(1, 2, 5, 5, 16, 5)
    out, lse = cpu.contmix_forward(logits, rpb, value, 5)
    with pytest.raises(ValueError, match="H, W >= K=7"):
        cpu.contmix_forward(torch.zeros(1, 2, 5, 5, 49), torch.zeros(2, 13, 13), value, 7)
    with pytest.raises(ValueError, match="logits"):
        cpu.contmix_forward(logits[..., :20], rpb, value, 5)
    with pytest.raises(ValueError, match="must match value"):
        cpu.contmix_backward(out[:, :1], logits, rpb, value, out, lse, 5)


def _query_keys(batch, heads, height, width, query_channels, kernel_size, seed=2):
    """ContMix's logit factors as the model hands them over: queries a view of a (B, heads, c_q, H, W)
    map, keys one kernel's slots of both kernels' (B, heads, c_q, k*k + K*K), a bias per slot."""
    gen = torch.Generator().manual_seed(seed)
    kk = kernel_size * kernel_size
    query = torch.randn(batch, heads, query_channels, height, width, generator=gen).permute(0, 1, 3, 4, 2)
    keys = torch.randn(batch, heads, query_channels, 9 + kk, generator=gen)[..., 9:]
    return query, keys, torch.randn(kk, generator=gen)


@needs_contmix_library
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 14, 14, 16, 13, 16),
        (1, 2, 7, 9, 14, 7, 5),
        (3, 1, 6, 5, 3, 5, 1),
        (1, 2, 20, 19, 16, 19, 16),
        (2, 5, 4, 4, 20, 3, 33),
    ],
    ids=str,
)
@pytest.mark.parametrize("key_bias", [True, False], ids=["key-bias", "no-key-bias"])
def test_contmix_from_queries_matches_the_float64_logits_map(shape, threads, key_bias):
    """The kernels forming each position's logits from its query and keys (never a logits map):
    output and the gradients of query, keys, key bias, rpb and value against autograd of
    kernels/reference.py on the float64 logits map: clamped windows, slots past a whole vector
    (K*K = 9, 25, 49, 169, 361), query widths of 1 to 33, values that are and are not whole
    vectors, rows split between threads."""
    from overlock.kernels import reference

    *value_shape, kernel_size, query_channels = shape
    batch, heads, height, width, _ = value_shape
    _, rpb, value = _contmix_inputs(*value_shape, kernel_size, seed=1)
    query, keys, bias = _query_keys(batch, heads, height, width, query_channels, kernel_size)
    leaves = [t.clone().requires_grad_() for t in (query, keys, bias, rpb, value)]
    if not key_bias:
        leaves[2] = None
    assert kernels.logits_formed_inside("auto", value, query, keys, rpb)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.contmix_from_queries(*leaves, kernel_size)
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, [t for t in leaves if t is not None], grad)
    finally:
        torch.set_num_threads(before)
    double = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    logits = torch.matmul(double[0].flatten(2, 3), double[1]).unflatten(2, (height, width))
    if key_bias:
        logits = logits + double[2]
    scores = logits + reference.gather_rpb(double[3], height, width, kernel_size)
    expected = reference.aggregate(torch.softmax(scores, dim=-1), double[4], kernel_size)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    theirs = torch.autograd.grad(expected, [t for t in double if t is not None], grad.double())
    _assert_close_to_float64(ours, theirs)


@needs_contmix_library
def test_contmix_from_queries_elsewhere_forms_the_logits_map(monkeypatch):
    """float64, another backend, a jit trace, the kernels off: the logits map and `contmix`, the same values."""
    from overlock.kernels import cpu

    _, rpb, value = _contmix_inputs(2, 2, 7, 7, 16, 5)
    query, keys, bias = _query_keys(2, 2, 7, 7, 8, 5)
    assert not kernels.logits_formed_inside("auto", value.double())
    assert not kernels.logits_formed_inside("reference", value)
    formed = []
    apply = cpu.ContMixFromQueries.apply
    monkeypatch.setattr(cpu.ContMixFromQueries, "apply", lambda *args: (formed.append(1), apply(*args))[1])

    def run(backend="auto", dtype=torch.float32):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (query, keys, bias, rpb, value)]
        out = kernels.contmix_from_queries(*inputs, 5, backend=backend)
        return out.float(), *(g.float() for g in torch.autograd.grad(out, inputs, torch.ones_like(out)))

    ours = run()
    assert formed == [1]
    for theirs in (run("reference"), run("cpu", torch.float64)):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    traced = torch.jit.trace(  # (check_trace=False: the check runs the function again, eagerly)
        lambda q: kernels.contmix_from_queries(q, keys, bias, rpb, value, 5), (query,), check_trace=False
    )
    torch.testing.assert_close(traced(query), ours[0], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu, "native_applies", lambda *args: False)
    torch.testing.assert_close(run()[0], ours[0], rtol=1e-5, atol=1e-5)
    assert formed == [1]


def test_contmix_from_queries_names_what_is_wrong():
    _, rpb, value = _contmix_inputs(1, 2, 7, 7, 16, 5)
    query, keys, bias = _query_keys(1, 2, 7, 7, 8, 5)
    with pytest.raises(ValueError, match=r"keys must be \(B, heads, c_q, K\*K\)=\(1, 2, 8, 25\)"):
        kernels.contmix_from_queries(query, keys[..., :9], bias, rpb, value, 5)
    with pytest.raises(ValueError, match="query must be"):
        kernels.contmix_from_queries(query[:, :, :5], keys, bias, rpb, value, 5)
    with pytest.raises(ValueError, match=r"key_bias must be \(K\*K,\)"):
        kernels.contmix_from_queries(query, keys, bias[:9], rpb, value, 5)
    with pytest.raises(ValueError, match="rpb must have shape"):
        kernels.contmix_from_queries(query, keys, bias, rpb[:1], value, 5)


needs_grn_library = pytest.mark.skipif(
    native.library(kernels.grn.LIBRARY) is None, reason=native.status(kernels.grn.LIBRARY)
)


@needs_grn_library
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(3, 19, 9, 10), (2, 48, 1, 7), (1, 5, 13, 11)], ids=str)
def test_grn_backward_passes_equal_the_float64_sums(shape, threads):
    """Channel counts that are and are not whole vectors, more pixels than one partial sum holds (64)."""
    gen = torch.Generator().manual_seed(7)
    x, grad = (torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(2))
    scale, coef = (torch.randn(shape[0], shape[1], 1, 1, generator=gen) for _ in range(2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sum_gx, sum_g = kernels.grn.backward_sums(grad, x)
        out = kernels.grn.input_grad(grad, x, scale, coef)
    finally:
        torch.set_num_threads(before)
    g64, x64 = grad.double(), x.double()
    torch.testing.assert_close(sum_gx.double(), (g64 * x64).sum(dim=(-1, -2), keepdim=True), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_g.double(), g64.sum(dim=(-1, -2), keepdim=True), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.double(), g64 * scale.double() + x64 * coef.double(), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


@needs_grn_library
@pytest.mark.parametrize("channels_last", [True, False])
def test_grn_backward_in_c_matches_its_pytorch_ops(channels_last, monkeypatch):
    """The GRN layer's gradients with the C passes (channels_last float32) and without them; NCHW maps
    keep the PyTorch ops."""
    grn = layers.GRN(21)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 21, 10, 9, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 21, 10, 9, generator=gen)
    calls = []
    original = kernels.grn.input_grad
    monkeypatch.setattr(kernels.grn, "input_grad", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))

    def run():
        leaf = x.clone().requires_grad_()
        return torch.autograd.grad(grn(leaf), [leaf, grn.gamma, grn.beta], grad)

    ours = run()
    assert calls == ([1] if channels_last else [])
    monkeypatch.setattr(kernels.grn, "native_applies", lambda *args: False)
    theirs = run()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grn_kernels_refuse_what_they_do_not_cover():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert not kernels.grn.native_applies(x, x)
    with pytest.raises(ValueError, match="float32 channels_last CPU maps"):
        kernels.grn.backward_sums(x, x)


@needs_library
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(2, 13, 5, 7), (3, 48, 9, 8), (1, 17, 4, 1), (2, 1024, 3, 4)], ids=str)
def test_gelu_dwconv_with_grn_matches_the_op_followed_by_grn(shape, threads):
    """Inference: GRN applied image by image inside the compiled op equals GRN after it (float64 GRN
    of the op's float64 composition)."""
    hidden, weight, bias = _inputs(shape, seed=9)
    gen = torch.Generator().manual_seed(10)
    grn = layers.GRN(shape[1])
    with torch.no_grad():
        grn.gamma.copy_(torch.randn(grn.gamma.shape, generator=gen))
        grn.beta.copy_(torch.randn(grn.beta.shape, generator=gen))
    mixed, squares = gelu_dwconv.reference(hidden.double(), weight.double(), bias.double())
    with torch.no_grad():
        expected = grn.double()(mixed, squares=squares)
        grn.float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    arguments = (weight, bias, grn.gamma, grn.beta, layers.GRN_ENERGY_FLOOR, layers.GRN_MEAN_EPS)
    try:
        ours = gelu_dwconv.gelu_dwconv3x3_grn(hidden, *arguments)
        scratch = hidden.clone()  # written over: the same values, in the input's own memory
        over = gelu_dwconv.gelu_dwconv3x3_grn(scratch, *arguments, overwrite=True)
    finally:
        torch.set_num_threads(before)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert over.data_ptr() == scratch.data_ptr()
    torch.testing.assert_close(over, ours, rtol=0, atol=0)


@needs_library
def test_conv_mlp_takes_grn_into_the_compiled_op_only_where_nothing_needs_a_gradient(monkeypatch):
    calls = []
    original = gelu_dwconv.gelu_dwconv3x3_grn
    monkeypatch.setattr(gelu_dwconv, "gelu_dwconv3x3_grn", lambda *a, **k: calls.append(k) or original(*a, **k))
    mlp = layers.ConvMLP(6, 24, 6).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 6, 11, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = mlp(x)
    assert calls == [{"overwrite": True}]  # fc1's output, read by nothing else
    expected = mlp(x)  # the parameters need gradients: the op, then the GRN module
    assert len(calls) == 1
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    taken = []  # a hook that keeps fc1's output: the op writes a map of its own
    handle = mlp.fc1.register_forward_hook(lambda module, args, out: taken.append(out))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), fused, rtol=0, atol=0)
        torch.testing.assert_close(taken[0], mlp.fc1(x), rtol=0, atol=0)
    assert calls[1:] == [{"overwrite": False}]
    handle.remove()
    mlp.grn.register_forward_hook(lambda module, args, out: None)  # a watched GRN runs as itself
    with torch.no_grad():
        mlp(x)
    assert len(calls) == 2


@needs_library
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the flags are x86's")
@pytest.mark.parametrize(
    ("flags", "width", "openmp"),
    [("-mno-avx512f", 8, "1"), ("-mno-avx", 4, "0")],
    ids=["8 floats", "4 floats, overlock's thread pool"],
)
def test_kernels_built_for_narrower_vectors_pass_these_tests(flags, width, openmp, tmp_path):
    """Each C kernel built for AVX2's 8-float vectors and for 4 (SSE's, NEON's) passes this file's
    tests and the depthwise C kernels': a CPU runs the width it has, and each width strides and rounds
    its own way (AVX2 read ContMix's packed keys at a stride of 56 slots where they were 64 for K = 7,
    until the packing was made 16 slots whatever the width). This machine's own width runs above.
    The 4-float build is also built without OpenMP, so its tests run the tasks on overlock's own
    thread pool, as where torch has no GNU OpenMP runtime or the compiler no GNU OpenMP."""
    native_width = native.library(gelu_dwconv.LIBRARY).overlock_vector_width()
    env = {**os.environ, native.FLAGS_ENV: flags, native.CACHE_ENV: str(tmp_path), native.OPENMP_ENV: openmp}
    probe = (
        "from overlock.kernels import native\n"
        "print(*(native.library(n).overlock_vector_width() for n in native.SIGNATURES))\n"
        "print(*(int(native.openmp(n)) for n in native.SIGNATURES))"
    )
    built = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    widths, teams = built.stdout.splitlines()
    assert widths.split() == [str(min(width, native_width))] * len(native.SIGNATURES)
    expected = "1" if openmp == "1" and native._openmp_runtime() is not None else "0"
    assert teams.split() == [expected] * len(native.SIGNATURES)
    selection = "(test_native.py and not narrower_vectors and not torch_runs_on) or (test_depthwise.py and the_c_)"
    tests = [str(Path(__file__)), str(Path(__file__).with_name("test_depthwise.py"))]
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests, "-k", selection]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-500:]


def _mapped_openmp_runtimes() -> set[str]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[-1] for line in lines if "/libgomp" in line}


@needs_library
@pytest.mark.skipif(
    native._openmp_runtime() is None, reason="torch has no GNU OpenMP runtime here, or OVERLOCK_NATIVE_OPENMP=0"
)
def test_kernels_run_their_tasks_on_the_openmp_runtime_torch_runs_on():
    """Every library is built with OpenMP and linked against the very libgomp torch loaded: one
    runtime in the process (a second would bring a second set of threads to fight torch's for the
    cores), and the status that `overlock bench` prints says so."""
    before = _mapped_openmp_runtimes()
    for name in native.SIGNATURES:
        assert native.openmp(name), native.status(name)
        assert "tasks on torch's OpenMP threads" in native.status(name)
    assert _mapped_openmp_runtimes() == before == {str(native._openmp_runtime())}


def test_the_openmp_runtime_is_torchs_own_or_the_only_one(tmp_path):
    """Which libgomp the kernels link against, from the files a process has mapped: torch's own copy
    before any other, else the only one; none where another OpenMP runtime is mapped (torch on
    libomp or libiomp5) or where several GNU ones leave it unclear."""
    torch_dir, system = tmp_path / "torch", tmp_path / "usr" / "lib"
    for folder in (torch_dir / "lib", system):
        folder.mkdir(parents=True)
    torchs, systems, other = torch_dir / "lib" / "libgomp.so.1", system / "libgomp.so.1", system / "libgomp-x.so.1"
    for path in (torchs, systems, other):
        path.write_bytes(b"")

    def maps(*paths: Path) -> str:
        return (
            "".join(f"7f00-7f01 r-xp 00000000 08:01 42   {path}\n" for path in paths) + "7f02-7f03 rw-p 0 0 0 [heap]\n"
        )

    assert native._runtime_among(maps(systems, torchs), torch_dir) == torchs
    assert native._runtime_among(maps(systems), torch_dir) == systems
    assert native._runtime_among(maps(systems, other), torch_dir) is None
    assert native._runtime_among(maps(torchs, system / "libiomp5.so"), torch_dir) is None
    assert native._runtime_among(maps(system / "libomp.so"), torch_dir) is None
    assert native._runtime_among(maps(tmp_path / "gone" / "libgomp.so.1"), torch_dir) is None


@needs_library
@pytest.mark.parametrize("threads", [1, 3])
def test_a_failed_openmp_build_runs_the_tasks_on_overlocks_pool(fresh_build, monkeypatch, threads):
    """Where the OpenMP build does not link or load (here: a runtime that is not there; elsewhere a
    compiler whose OpenMP calls another runtime's entry points), the library is built again without
    OpenMP and its tasks run on overlock's thread pool: the same results, the reason in the status,
    and nothing half-built left in the cache."""
    monkeypatch.setattr(native, "_openmp_runtime", lambda: fresh_build / "missing" / "libgomp.so.1")
    assert native.library(gelu_dwconv.LIBRARY) is not None
    assert not native.openmp(gelu_dwconv.LIBRARY)
    assert "thread pool: the OpenMP build failed" in native.status(gelu_dwconv.LIBRARY)
    assert [p.name.startswith("gelu_dwconv-") and p.suffix == ".so" for p in fresh_build.iterdir()] == [True]
    hidden, weight, bias = _inputs((5, 19, 6, 7))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, squares = gelu_dwconv.gelu_dwconv3x3(hidden, weight, bias)
    finally:
        torch.set_num_threads(before)
    expected, expected_squares = gelu_dwconv.reference(hidden.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(squares.double(), expected_squares, rtol=1e-5, atol=1e-4)
