"""Neighbourhood attention: the gather reference (gradcheck, window semantics), every CPU-side
backend against it, dilation, argument errors, the torch.library op and torch.compile.
Triton: test_neighborhood_triton.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from overlock import kernels
from overlock.kernels import cpu, neighborhood, reference


def make_inputs(batch, heads, height, width, channels, k, *, bias=True, dtype=torch.float32, seed=0):
    """q, k, v as permuted views of NCHW-like tensors (as a model's reshape produces), rpb, grad."""
    gen = torch.Generator().manual_seed(seed)
    q, key, value = (
        torch.randn(batch, heads, channels, height, width, generator=gen).permute(0, 1, 3, 4, 2).to(dtype)
        for _ in range(3)
    )
    rpb = torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=gen).to(dtype) if bias else None
    grad = torch.randn(batch, heads, height, width, channels, generator=gen).to(dtype)
    return q, key, value, rpb, grad


def run(fn, q, key, value, rpb, grad):
    """Output and gradients (q, k, v[, rpb]) of fn at fresh leaves."""
    leaves = [t.detach().requires_grad_() for t in (q, key, value, *([] if rpb is None else [rpb]))]
    out = fn(*leaves[:3], leaves[3] if rpb is not None else None)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), list(grads)


def expected(q, key, value, rpb, grad, k, dilation=1):
    """The oracle in float64, by autograd through the gather reference."""
    exact = [None if t is None else t.double() for t in (q, key, value, rpb)]
    return run(lambda a, b, c, d: neighborhood.reference_attention(a, b, c, d, k, dilation), *exact, grad.double())


def assert_relative(actual, wanted, tol=1e-4, name=""):
    """max |actual - wanted| <= tol * max |wanted|: the issue's 'within 1e-4 relative'."""
    error = (actual.double() - wanted).abs().max().item()
    scale = wanted.abs().max().item()
    assert error <= tol * scale, f"{name}: max error {error:.3g} > {tol} * {scale:.3g}"


def check(backend, shape, k, *, bias=True, dilation=1, dtype=torch.float32, tol=1e-4):
    q, key, value, rpb, grad = make_inputs(*shape, k, bias=bias, dtype=dtype)
    out, grads = run(
        lambda a, b, c, d: kernels.neighborhood_attention(a, b, c, d, k, dilation=dilation, backend=backend),
        q,
        key,
        value,
        rpb,
        grad,
    )
    ref_out, ref_grads = expected(q, key, value, rpb, grad, k, dilation)
    assert out.dtype == dtype and out.shape == value.shape
    assert_relative(out, ref_out, tol, "out")
    for name, got, want in zip(("query", "key", "value", "rpb"), grads, ref_grads, strict=False):
        assert got.dtype == dtype, name
        assert_relative(got, want, tol, name)


# --- the reference ------------------------------------------------------------------------------


def test_reference_windows_are_contmix_windows_and_bias_index():
    """Dilation 1 gives exactly ContMix's clamped windows and bias-table index (ARCHITECTURE.md 5)."""
    for height, width, k in ((7, 9, 3), (13, 13, 13), (10, 6, 5)):
        neighbours, bias = neighborhood._gather_indices(height, width, k, 1, None)
        assert torch.equal(neighbours, reference.neighbour_index(height, width, k))
        assert torch.equal(bias, reference.rpb_index(height, width, k))


def test_reference_dilated_windows_stay_on_their_sub_grid():
    """Row 4 of a length-11 map, K=3, d=2: sub-grid of residue 0 (0,2,..,10), centred on 4 -> 2,4,6;
    row 1 (residue 1, sub-grid 1,3,5,7,9) is clamped at the start -> 1,3,5; row 10 clamped at the end."""
    index, offsets = neighborhood.window_index(11, 3, 2)
    assert index[4].tolist() == [2, 4, 6] and offsets[4].tolist() == [1, 2, 3]
    assert index[1].tolist() == [1, 3, 5] and offsets[1].tolist() == [2, 3, 4]
    assert index[10].tolist() == [6, 8, 10] and offsets[10].tolist() == [0, 1, 2]


def test_reference_equals_a_softmax_over_each_window_written_out():
    """The oracle itself against a loop over positions (tiny map)."""
    k = 3
    q, key, value, rpb, _ = make_inputs(1, 2, 4, 5, 3, k, dtype=torch.float64)
    out = neighborhood.reference_attention(q, key, value, rpb, k)
    for i in range(4):
        for j in range(5):
            si, sj = min(max(i - 1, 0), 4 - k), min(max(j - 1, 0), 5 - k)
            keys = key[:, :, si : si + k, sj : sj + k].reshape(1, 2, k * k, 3)
            values = value[:, :, si : si + k, sj : sj + k].reshape(1, 2, k * k, 3)
            bias = rpb[:, k - 1 + si - i : 2 * k - 1 + si - i, k - 1 + sj - j : 2 * k - 1 + sj - j].reshape(2, k * k)
            probs = ((keys @ q[:, :, i, j, :, None]).squeeze(-1) + bias).softmax(-1)
            torch.testing.assert_close(out[:, :, i, j], (probs[..., None] * values).sum(-2), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("bias", "dilation"), [(True, 1), (False, 2)])
def test_reference_passes_gradcheck_in_float64(bias, dilation):
    q, key, value, rpb, _ = make_inputs(1, 1, 6, 7, 2, 3, bias=bias, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, key, value, *([rpb] if bias else []))]
    assert torch.autograd.gradcheck(
        lambda *t: neighborhood.reference_attention(*t[:3], t[3] if bias else None, 3, dilation),
        leaves,
        fast_mode=True,
    )


# --- backends against the reference -------------------------------------------------------------

SHAPES = [
    ((2, 2, 7, 9, 5), 3),  # non-square, c not a power of two
    ((1, 2, 5, 5, 6), 5),  # H == W == K: every window is the whole map
    ((2, 1, 11, 7, 3), 7),  # W == K, H > K
    ((1, 1, 13, 15, 4), 13),  # the large kernel, H == K
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "unfold"])
@pytest.mark.parametrize(("shape", "k"), SHAPES)
def test_backends_match_reference_forward_and_every_gradient(backend, shape, k):
    check(backend, shape, k)


@pytest.mark.parametrize("backend", ["reference", "cpu", "unfold"])
def test_backends_without_bias(backend):
    check(backend, (2, 2, 8, 6, 5), 5, bias=False)


@pytest.mark.parametrize(
    ("shape", "k", "dilation"),
    [((1, 2, 8, 10, 3), 3, 2), ((1, 2, 9, 11, 3), 3, 2), ((1, 1, 10, 9, 2), 3, 3), ((1, 1, 15, 15, 2), 5, 3)],
)
def test_dilation_on_sub_grids_matches_the_directly_dilated_reference(shape, k, dilation):
    """Both decompositions (divisible: folded into the batch; otherwise one call per residue class)."""
    check("cpu", shape, k, dilation=dilation)


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (5, 2)])
def test_cpu_tiles_with_overlapping_edge_tiles_match_reference(monkeypatch, tile):
    """Edge tiles overlap their neighbour: d key (like d value) must count every position once."""
    monkeypatch.setattr(cpu, "_tile_size", lambda *args: tile)
    cpu._plan_cpu.cache_clear()
    try:
        check("cpu", (2, 2, 11, 9, 3), 5)
        assert cpu._plan_cpu(11, 9, 5, 3).tile == tile
    finally:
        cpu._plan_cpu.cache_clear()


def test_cpu_chunking_over_batch_and_heads(monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)  # one (batch, head) row per chunk
    monkeypatch.setattr(cpu, "MIN_CHUNK_BYTES", 1)
    check("cpu", (3, 2, 7, 8, 4), 5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_op_saves_the_log_sum_exp_of_the_biased_logits(backend):
    q, key, value, rpb, _ = make_inputs(2, 2, 6, 9, 4, 5)
    out, lse = torch.ops.overlock.neighborhood_attention(q, key, value, rpb, 5, backend)
    torch.testing.assert_close(lse, neighborhood.reference_logits(q, key, rpb, 5).logsumexp(-1), atol=1e-5, rtol=0)
    assert lse.shape == value.shape[:4]


def test_cpu_bfloat16_accumulates_in_float32_and_keeps_dtypes():
    q, key, value, rpb, grad = make_inputs(1, 2, 7, 8, 4, 3, dtype=torch.bfloat16)
    out, grads = run(
        lambda a, b, c, d: kernels.neighborhood_attention(a, b, c, d, 3, backend="cpu"), q, key, value, rpb, grad
    )
    ref_out, _ = expected(q, key, value, rpb, grad, 3)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_relative(out, ref_out, 1e-2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ops_keep_their_own_precision_under_cpu_autocast(backend):
    q, key, value, rpb, grad = make_inputs(1, 2, 7, 8, 4, 3)
    want = kernels.neighborhood_attention(q, key, value, rpb, 3, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.neighborhood_attention(q, key, value, rpb, 3, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# --- argument errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda q, k, v, r: dict(backend="fast"), "backend='fast' is not known"),
        (lambda q, k, v, r: dict(kernel_size=4), "kernel_size must be an odd positive int"),
        (lambda q, k, v, r: dict(dilation=0), "dilation must be a positive int"),
        (lambda q, k, v, r: dict(dilation=3), r"H and W must be >= kernel_size \* dilation = 9"),
        (lambda q, k, v, r: dict(query=q[0]), "query must be 5-D"),
        (lambda q, k, v, r: dict(key=k[..., :2]), "query, key and value must have the same shape"),
        (lambda q, k, v, r: dict(value=v[:, :1]), "query, key and value must have the same shape"),
        (lambda q, k, v, r: dict(rpb=r[:1]), r"rpb must be None or have shape \(heads, 2K-1, 2K-1\)=\(2, 5, 5\)"),
        (lambda q, k, v, r: dict(query=q.int()), "query must be float16, bfloat16, float32 or float64"),
        (lambda q, k, v, r: dict(rpb=r.to("meta")), "rpb is on meta but value is on cpu"),
        (lambda q, k, v, r: dict(query=q[:, :, :2], key=k[:, :, :2], value=v[:, :, :2]), "H and W must be >= kernel"),
    ],
)
def test_rejects_bad_arguments_naming_them(mutate, match):
    q, key, value, rpb, _ = make_inputs(1, 2, 6, 7, 4, 3)
    args = dict(query=q, key=key, value=value, rpb=rpb, kernel_size=3)
    args.update(mutate(q, key, value, rpb))
    with pytest.raises(ValueError, match=match):
        kernels.neighborhood_attention(**args)


# --- torch.library / torch.compile --------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_op_is_registered_with_a_fake_implementation(bias):
    q, key, value, rpb, grad = make_inputs(1, 2, 5, 6, 3, 3, bias=bias)
    fake = [None if t is None else t.to("meta") for t in (q, key, value, rpb)]
    out, lse = torch.ops.overlock.neighborhood_attention(*fake, 3, "cpu")
    assert out.shape == value.shape and out.device.type == "meta" and lse.shape == value.shape[:4]
    grads = torch.ops.overlock.neighborhood_attention_backward(out, *fake, out, lse, 3, "cpu")
    assert [g.shape for g in grads[:3]] == [q.shape] * 3
    assert grads[3].shape == (rpb.shape if bias else (0,))
    for backend in ("cpu", "reference"):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (q, key, value, rpb)]
        torch.library.opcheck(torch.ops.overlock.neighborhood_attention.default, (*leaves, 3, backend))


class _TinyAttention(torch.nn.Module):
    def __init__(self, channels: int = 8, heads: int = 2, k: int = 3) -> None:
        super().__init__()
        self.k, self.heads = k, heads
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.rpb = torch.nn.Parameter(torch.randn(heads, 2 * k - 1, 2 * k - 1) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).reshape(batch, height, width, 3, self.heads, -1).permute(3, 0, 4, 1, 2, 5)
        out = kernels.neighborhood_attention(qkv[0], qkv[1], qkv[2], self.rpb, self.k, dilation=1)
        return out.sum(1)


def test_torch_compile_fullgraph_forward_and_backward_on_cpu():
    torch.manual_seed(0)
    model = _TinyAttention()
    x = torch.randn(2, 7, 6, 8, requires_grad=True)
    eager = model(x)
    eager.square().sum().backward()
    want = [x.grad.clone(), model.rpb.grad.clone(), model.qkv.weight.grad.clone()]
    x.grad = model.rpb.grad = model.qkv.weight.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for got, wanted in zip([x.grad, model.rpb.grad, model.qkv.weight.grad], want, strict=True):
        torch.testing.assert_close(got, wanted, atol=1e-4, rtol=1e-4)


def test_fvcore_counts_query_key_and_aggregation_products():
    from fvcore.nn import FlopCountAnalysis

    from overlock.builder.flops import OVERLOCK_HANDLES

    model = _TinyAttention(channels=8, heads=2, k=3).eval()
    x = torch.randn(1, 5, 6, 8)
    analysis = FlopCountAnalysis(model, x)
    for name, handle in OVERLOCK_HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings():  # fvcore traces with torch.jit, which warns on every use
        warnings.simplefilter("ignore", DeprecationWarning)
        counts = analysis.by_operator()
    # B * heads * H * W * K*K * (c for q.k + c for a.v), c = 8 / 2
    assert counts["neighborhood_attention"] == 1 * 2 * 5 * 6 * 9 * (4 + 4)


def test_cpu_path_in_the_chunk_worker_pool_matches_the_reference(monkeypatch):
    """With two threads and tiny chunks, chunks run in kernels/cpu.py's worker pool: same numbers."""
    import overlock.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)
    monkeypatch.setattr(cpu, "MIN_CHUNK_BYTES", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(3, 4, 11, 9, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "qkv")
        rpb = torch.randn(4, 9, 9, generator=gen, dtype=torch.float64, requires_grad=True)
        results = []
        for backend in ("cpu", "reference"):
            out = kernels.neighborhood_attention(q, k, v, rpb, 5, backend=backend)
            results.append((out, *torch.autograd.grad(out.square().sum(), [q, k, v, rpb])))
        for ours, reference in zip(*results, strict=True):
            torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_num_threads(threads)
