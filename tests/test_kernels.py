"""ContMix operators: the reference against the goldens and gradcheck, the CPU path and the unfold
baseline against the reference, argument errors, and torch.compile. Triton: test_kernels_triton.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from overlock import kernels
from overlock.kernels import cpu, ops, reference

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "reference" / "golden" / "contmix_ops.expected.pt"


@pytest.fixture(scope="module")
def goldens() -> dict:
    if not GOLDEN.is_file():
        pytest.fail(f"op goldens not found at {GOLDEN}: the checkout must sit beside shared/")
    return torch.load(GOLDEN, weights_only=True)


def make_inputs(batch, heads, height, width, channels, k, *, dtype=torch.float32, seed=0, strided=True):
    """Random logits/rpb/value; value is a non-contiguous view, as the model's rearrange produces."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, height, width, k * k, generator=gen) * 2
    rpb = torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=gen)
    value = torch.randn(batch, heads, channels, height, width, generator=gen)
    value = value.permute(0, 1, 3, 4, 2) if strided else value.permute(0, 1, 3, 4, 2).contiguous()
    grad = torch.randn(batch, heads, height, width, channels, generator=gen)
    return logits.to(dtype), rpb, value.to(dtype), grad.to(dtype)


def grads_of(fn, inputs, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_close(actual, expected, atol, rtol=0.0):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# --- the reference ------------------------------------------------------------------------------


def test_golden_cases_cover_border_and_non_square_maps(goldens):
    shapes = [case["value"].shape[2:4] for case in goldens.values()]
    sizes = [case["kernel_size"] for case in goldens.values()]
    assert any(min(s) == k for s, k in zip(shapes, sizes, strict=True))
    assert any(s[0] != s[1] for s in shapes)


def test_reference_reproduces_op_goldens(goldens):
    for name, case in goldens.items():
        k = case["kernel_size"]
        probs = reference.probabilities(case["logits"], case["rpb"], k)
        torch.testing.assert_close(probs, case["probs"], atol=5e-7, rtol=0, msg=name)
        torch.testing.assert_close(
            reference.aggregate(case["probs"], case["value"], k), case["out"], atol=1e-6, rtol=0, msg=name
        )
        torch.testing.assert_close(
            reference.contmix(case["logits"], case["rpb"], case["value"], k), case["out"], atol=1e-6, rtol=0, msg=name
        )


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference", "unfold"])
def test_public_ops_reproduce_op_goldens(goldens, backend):
    for name, case in goldens.items():
        k = case["kernel_size"]
        out = kernels.contmix(case["logits"], case["rpb"], case["value"], k, backend=backend)
        torch.testing.assert_close(out, case["out"], atol=2e-6, rtol=0, msg=name)
        out = kernels.aggregate(case["probs"], case["value"], k, backend=backend)
        torch.testing.assert_close(out, case["out"], atol=2e-6, rtol=0, msg=name)


@pytest.mark.parametrize(("shape", "fast_mode"), [((1, 1, 4, 5, 2, 3), False), ((1, 2, 5, 7, 3, 5), True)])
def test_reference_passes_gradcheck_in_float64(shape, fast_mode):
    """Full Jacobians on a tiny K=3 map; random projections (fast mode) for K=5 with two heads."""
    k = shape[-1]
    logits, rpb, value, _ = make_inputs(*shape, dtype=torch.float64)
    inputs = tuple(t.detach().requires_grad_() for t in (logits, rpb.double(), value))
    assert torch.autograd.gradcheck(lambda a, b, c: reference.contmix(a, b, c, k), inputs, fast_mode=fast_mode)
    probs = reference.probabilities(logits, rpb.double(), k).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda p, v: reference.aggregate(p, v, k), (probs, inputs[2]), fast_mode=fast_mode)


def test_reference_backward_formulas_match_autograd():
    """The written-out backward (used inside the custom op) agrees with autograd of the forward."""
    logits, rpb, value, grad = make_inputs(2, 2, 7, 9, 3, 5, dtype=torch.float64)
    rpb = rpb.double()
    _, expected = grads_of(lambda a, b, c: reference.contmix(a, b, c, 5), (logits, rpb, value), grad)
    for got, want in zip(reference.contmix_gradients(grad, logits, rpb, value, 5), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    probs = reference.probabilities(logits, rpb, 5)
    _, expected = grads_of(lambda p, v: reference.aggregate(p, v, 5), (probs, value), grad)
    for got, want in zip(reference.aggregate_backward(grad, probs, value, 5), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


# --- the CPU path -------------------------------------------------------------------------------

SHAPES = {
    "K3": (2, 2, 6, 8, 4, 3),
    "K5_non_square_c_odd": (2, 3, 9, 13, 5, 5),
    "K7_H_eq_K": (1, 2, 7, 12, 6, 7),
    "K13_W_eq_K": (1, 2, 15, 13, 3, 13),
    "K17_square": (1, 1, 17, 17, 16, 17),
    "K5_tall_batch1": (1, 4, 23, 6, 10, 5),
}


def _reference_contmix(logits, rpb, value, k):
    return reference.contmix(logits, rpb, value, k)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("backend", ["cpu", "unfold"])
def test_contmix_matches_reference_forward_and_gradients(shape, backend):
    *_, k = shape
    logits, rpb, value, grad = make_inputs(*shape)
    out, grads = grads_of(lambda a, b, c: kernels.contmix(a, b, c, k, backend=backend), (logits, rpb, value), grad)
    ref_out, ref_grads = grads_of(lambda a, b, c: _reference_contmix(a, b, c, k), (logits, rpb, value), grad)
    assert_close(out, ref_out, atol=2e-6)
    for name, got, want in zip(("logits", "rpb", "value"), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_contmix_op_saves_the_log_sum_exp_of_the_biased_logits(backend):
    """The second output of overlock::contmix: what the backward rebuilds the probabilities from."""
    logits, rpb, value, _ = make_inputs(*SHAPES["K5_non_square_c_odd"])
    out, lse = torch.ops.overlock.contmix(logits, rpb, value, 5, backend)
    assert lse.shape == value.shape[:4] and lse.dtype == torch.float32
    torch.testing.assert_close(lse, reference.biased_logits(logits, rpb, 5).logsumexp(-1), atol=1e-6, rtol=0)
    assert_close(out, reference.contmix(logits, rpb, value, 5), atol=2e-6)


def test_contmix_output_is_saved_for_backward_so_in_place_edits_are_caught():
    """The backward reads the output (D = grad . out): editing it in place must fail loudly, not silently."""
    logits, rpb, value, grad = make_inputs(1, 2, 6, 6, 3, 3)
    out = kernels.contmix(logits.requires_grad_(), rpb, value, 3, backend="cpu")
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(grad)


@pytest.mark.parametrize("shape", [SHAPES["K5_non_square_c_odd"], SHAPES["K13_W_eq_K"]], ids=["K5", "K13"])
def test_aggregate_matches_reference_forward_and_gradients(shape):
    *_, k = shape
    logits, rpb, value, grad = make_inputs(*shape)
    assert_aggregate_matches_reference(reference.probabilities(logits, rpb, k), value, k, grad, 2e-6, (2e-5, 1e-5))


def assert_aggregate_matches_reference(probs, value, k, grad, out_atol, grad_tolerance) -> None:
    """The CPU aggregate against the reference's: output within out_atol, gradients (atol, rtol)."""
    out, grads = grads_of(lambda p, v: kernels.aggregate(p, v, k, backend="cpu"), (probs, value), grad)
    ref_out, ref_grads = grads_of(lambda p, v: reference.aggregate(p, v, k), (probs, value), grad)
    assert_close(out, ref_out, atol=out_atol)
    atol, rtol = grad_tolerance
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_cpu_bfloat16_accumulates_in_float32_and_keeps_dtypes():
    k = 7
    logits, rpb, value, grad = make_inputs(2, 2, 9, 10, 6, k, dtype=torch.bfloat16)
    out, grads = grads_of(lambda a, b, c: kernels.contmix(a, b, c, k, backend="cpu"), (logits, rpb, value), grad)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.bfloat16]
    exact = [t.float() for t in (logits, rpb, value)]
    ref_out, ref_grads = grads_of(lambda a, b, c: reference.contmix(a, b, c, k), exact, grad.float())
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)


def test_cpu_float16_logits_with_float32_value_and_bias():
    """Under autocast the logits come in half precision while the bias parameter stays float32."""
    k = 5
    logits, rpb, value, grad = make_inputs(1, 2, 8, 8, 4, k)
    half = logits.half()
    out, grads = grads_of(lambda a, b, c: kernels.contmix(a, b, c, k, backend="cpu"), (half, rpb, value), grad)
    ref_out, ref_grads = grads_of(lambda a, b, c: reference.contmix(a, b, c, k), (half.float(), rpb, value), grad)
    assert out.dtype == torch.float32 and grads[0].dtype == torch.float16
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0].float(), ref_grads[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(grads[1], ref_grads[1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (4, 4), (5, 2)])
def test_cpu_tiles_with_overlapping_edge_tiles_match_reference(monkeypatch, tile):
    """Any tile size is exact: edge tiles that overlap their neighbour must count once in d value."""
    monkeypatch.setattr(cpu, "_tile_size", lambda *args: tile)
    cpu._plan_cpu.cache_clear()
    try:
        k = 5
        logits, rpb, value, grad = make_inputs(2, 2, 11, 9, 3, k)
        out, grads = grads_of(lambda a, b, c: kernels.contmix(a, b, c, k, backend="cpu"), (logits, rpb, value), grad)
        ref_out, ref_grads = grads_of(lambda a, b, c: reference.contmix(a, b, c, k), (logits, rpb, value), grad)
        assert cpu._plan_cpu(11, 9, k, 3).tile == tile
    finally:
        cpu._plan_cpu.cache_clear()
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_cpu_chunking_over_batch_and_heads_accumulates_bias_gradient(monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)  # one (batch, head) row per chunk
    k = 5
    logits, rpb, value, grad = make_inputs(3, 2, 7, 8, 4, k)
    out, grads = grads_of(lambda a, b, c: kernels.contmix(a, b, c, k, backend="cpu"), (logits, rpb, value), grad)
    ref_out, ref_grads = grads_of(lambda a, b, c: reference.contmix(a, b, c, k), (logits, rpb, value), grad)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("height", "width", "k", "tile"),
    [
        (14, 14, 13, None),
        (7, 7, 5, None),
        (14, 14, 5, None),
        (28, 28, 13, None),
        (11, 9, 5, (4, 4)),
        (9, 11, 3, (2, 3)),
    ],
)
def test_cpu_block_views_move_the_window_slots_of_the_index_plan(monkeypatch, height, width, k, tile):
    """The strided block views (_slot_views) against the plan's per-entry index (slot_column): the same
    dense tile matrices, and the same slots read back, each position from its owning tile row."""
    if tile is not None:
        monkeypatch.setattr(cpu, "_tile_size", lambda *args: tile)
    cpu._plan_cpu.cache_clear()
    try:
        plan = cpu._plan_cpu(height, width, k, 4)
    finally:
        cpu._plan_cpu.cache_clear()
    rows = torch.randn(3, height * width, k * k, dtype=torch.float64)
    tiles, tile_rows = plan.out_index.shape
    want = rows.new_zeros(3, tiles, tile_rows, plan.region)
    want.scatter_(3, plan.slot_column.expand(3, -1, -1, -1), rows[:, plan.out_index])
    assert torch.equal(cpu._dense_tiles(rows, plan), want)
    assert torch.equal(cpu._dense_tiles(rows.transpose(0, 1).contiguous().transpose(0, 1), plan), want)
    back = torch.full_like(rows, float("nan"))
    cpu._read_slots(want, plan, back)
    assert torch.equal(back, rows)
    assert plan.whole == (tiles == 1 and plan.region == height * width)


@pytest.mark.parametrize(
    ("shape", "whole"),
    [((4, 4, 14, 14, 5, 13), True), ((3, 3, 7, 7, 4, 5), True), ((4, 4, 14, 14, 5, 5), False)],
    ids=["14x14_K13_one_tile", "7x7_K5_one_tile", "14x14_K5_tiles"],
)
@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 8], ids=["budget", "rows_1", "rows_3", "rows_8"])
def test_cpu_whole_map_and_tiled_paths_match_reference_in_float64(monkeypatch, shape, whole, chunk_rows):
    """The one-tile path (products straight into the output) and the tiled path (gathers and
    untiling), with chunks of whole batch entries (bias by broadcast) and of rows within one batch
    entry (bias by slice; 3 rows become 2 of 4 heads): ContMix and the aggregation, forward and gradients."""
    if chunk_rows is not None:
        monkeypatch.setattr(cpu, "_chunk_rows", lambda *args, **kwargs: chunk_rows)
    batch, heads, height, width, channels, k = shape
    assert cpu._plan_cpu(height, width, k, channels).whole == whole
    logits, rpb, value, grad = (t.double() for t in make_inputs(*shape))
    chunk = cpu._Shapes(value, k, logits).chunk
    if chunk_rows is not None:
        assert chunk % heads == 0 if chunk_rows >= heads else heads % chunk == 0 and chunk < heads
    out, grads = grads_of(lambda a, b, c: kernels.contmix(a, b, c, k, backend="cpu"), (logits, rpb, value), grad)
    ref_out, ref_grads = grads_of(lambda a, b, c: reference.contmix(a, b, c, k), (logits, rpb, value), grad)
    assert_close(out, ref_out, atol=1e-12)
    for name, got, want in zip(("logits", "rpb", "value"), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11, msg=name)
    _, lse = torch.ops.overlock.contmix(logits, rpb, value, k, "cpu")
    torch.testing.assert_close(lse, reference.biased_logits(logits, rpb, k).logsumexp(-1), atol=1e-12, rtol=0)
    assert_aggregate_matches_reference(reference.probabilities(logits, rpb, k), value, k, grad, 1e-12, (1e-11, 1e-11))


def test_cpu_tile_choice_avoids_window_copies_at_focus_net_shapes():
    """At 224 input the whole map is one tile (one dense product per head); larger maps get tiles
    whose gathered regions stay far below the K*K copies of the unfold algorithm."""
    assert cpu._tile_size(14, 14, 13, 16) == (14, 14)
    assert cpu._tile_size(7, 7, 7, 16) == (7, 7)
    rows, cols = cpu._tile_size(56, 56, 5, 16)
    region = min(rows + 4, 56) * min(cols + 4, 56)
    assert region * 16 / (rows * cols) < 25 * 16 / 4


def test_auto_backend_resolves_by_device():
    logits, rpb, value, _ = make_inputs(1, 1, 5, 5, 2, 3)
    assert ops.resolve_backend("auto", (logits, rpb, value)) == "cpu"
    assert ops.resolve_backend("reference", (logits, rpb, value)) == "reference"


# --- argument errors ----------------------------------------------------------------------------


def _good():
    return make_inputs(1, 2, 6, 7, 3, 3)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda lg, r, v: (lg, r, v, 3, "cuda-magic"), "backend='cuda-magic' is not known"),
        (lambda lg, r, v: (lg, r, v, 4, "auto"), "kernel_size must be an odd positive int"),
        (lambda lg, r, v: (lg, r, v, True, "auto"), "kernel_size"),
        (lambda lg, r, v: (lg[0], r, v, 3, "auto"), "logits must be 5-D"),
        (lambda lg, r, v: (lg[..., :8], r, v, 3, "auto"), "logits: last dimension must be kernel_size"),
        (lambda lg, r, v: (lg, r, v[:, :1], 3, "auto"), "logits and value disagree"),
        (lambda lg, r, v: (lg, r[:1], v, 3, "auto"), r"rpb must have shape \(heads, 2K-1, 2K-1\)"),
        (lambda lg, r, v: (lg.int(), r, v, 3, "auto"), "logits must be float16, bfloat16, float32 or float64"),
        (lambda lg, r, v: (lg, r, v.int(), 3, "auto"), "value must be float16"),
        (lambda lg, r, v: (lg, r.to("meta"), v, 3, "auto"), "rpb is on meta but value is on cpu"),
        (lambda lg, r, v: (lg[:, :, :2], r, v[:, :, :2], 3, "auto"), "H and W must be >= kernel_size=3"),
    ],
)
def test_contmix_rejects_bad_arguments_naming_them(mutate, match):
    logits, rpb, value, _ = _good()
    args = mutate(logits, rpb, value)
    with pytest.raises(ValueError, match=match):
        kernels.contmix(*args[:4], backend=args[4])


def test_aggregate_rejects_bad_arguments_naming_them():
    logits, rpb, value, _ = _good()
    probs = reference.probabilities(logits, rpb, 3)
    with pytest.raises(ValueError, match="probs: last dimension"):
        kernels.aggregate(probs[..., :4], value, 3)
    with pytest.raises(ValueError, match="probs and value disagree"):
        kernels.aggregate(probs[:, :1], value, 3)
    with pytest.raises(ValueError, match="backend='fast' is not known"):
        kernels.aggregate(probs, value, 3, backend="fast")


def test_triton_backend_rejects_cpu_tensors_without_the_interpreter(monkeypatch):
    if not ops.triton_available():
        with pytest.raises(ValueError, match="backend='triton' needs the triton package"):
            kernels.contmix(*_good()[:3], 3, backend="triton")
        return
    monkeypatch.setattr(ops._triton(), "INTERPRETED", False)
    with pytest.raises(
        ValueError, match=r"backend='triton' needs CUDA tensors, got tensors on cpu.*TRITON_INTERPRET=1"
    ):
        kernels.contmix(*_good()[:3], 3, backend="triton")


def test_triton_backend_rejects_float64(monkeypatch):
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(ops._triton(), "INTERPRETED", True)
    logits, rpb, value, _ = _good()
    with pytest.raises(ValueError, match="backend='triton' supports float16, bfloat16 and float32, got torch.float64"):
        kernels.contmix(logits.double(), rpb, value, 3, backend="triton")


# --- torch.library / torch.compile --------------------------------------------------------------


def test_ops_are_registered_with_fake_implementations():
    logits, rpb, value, _ = _good()
    fake = [t.to("meta") for t in (logits, rpb, value)]
    out, lse = torch.ops.overlock.contmix(*fake, 3, "cpu")
    assert out.shape == value.shape and out.device.type == "meta"
    assert lse.shape == value.shape[:4] and lse.dtype == torch.float32
    grads = torch.ops.overlock.contmix_backward(out, *fake, out, lse, 3, "cpu")
    assert [g.shape for g in grads] == [logits.shape, rpb.shape, value.shape]
    torch.library.opcheck(torch.ops.overlock.contmix.default, (logits, rpb, value, 3, "cpu"))
    torch.library.opcheck(torch.ops.overlock.contmix.default, (logits.requires_grad_(), rpb, value, 3, "cpu"))
    probs = reference.probabilities(logits, rpb, 3)
    torch.library.opcheck(torch.ops.overlock.aggregate.default, (probs, value, 3, "cpu"))


class _TinyMixer(torch.nn.Module):
    """A small ContMix-like module: logits from a linear layer, values as a strided view."""

    def __init__(self, channels: int = 8, heads: int = 2, k: int = 5) -> None:
        super().__init__()
        self.k, self.heads = k, heads
        self.proj = torch.nn.Linear(channels, heads * k * k)
        self.rpb = torch.nn.Parameter(torch.randn(heads, 2 * k - 1, 2 * k - 1) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, H, W, C)
        batch, height, width, channels = x.shape
        logits = self.proj(x).reshape(batch, height, width, self.heads, -1).permute(0, 3, 1, 2, 4)
        value = x.reshape(batch, height, width, self.heads, -1).permute(0, 3, 1, 2, 4)
        return kernels.contmix(logits, self.rpb, value, self.k).sum(1)


def test_torch_compile_fullgraph_forward_and_backward_on_cpu():
    torch.manual_seed(0)
    model = _TinyMixer()
    x = torch.randn(2, 7, 9, 8, requires_grad=True)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [x.grad.clone(), model.rpb.grad.clone(), model.proj.weight.grad.clone()]
    x.grad = model.rpb.grad = model.proj.weight.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # inductor: the default, as users call it
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for got, want in zip([x.grad, model.rpb.grad, model.proj.weight.grad], eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_model_focus_net_backends_agree():
    """The lead's model calls kernels.contmix with strided views; every backend gives its logits."""
    build = pytest.importorskip("overlock.builder").build
    torch.manual_seed(0)
    model = build("pico").eval()
    image = torch.randn(1, 3, 128, 128)
    outs = {}
    for backend in ("reference", "cpu", "unfold"):
        model.set_contmix_backend(backend)
        with torch.no_grad():
            out = model(image)
        outs[backend] = out["main"] if isinstance(out, dict) else out
    torch.testing.assert_close(outs["cpu"], outs["reference"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["unfold"], outs["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ops_keep_their_own_precision_under_cpu_autocast(backend):
    """Autocast stays active inside custom ops; the backends must not be re-cast by it."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 9, 11, 25, generator=gen, requires_grad=True)
    rpb = torch.randn(4, 9, 9, generator=gen, requires_grad=True)
    value = torch.randn(2, 4, 9, 11, 6, generator=gen, requires_grad=True)
    expected = kernels.contmix(logits, rpb, value, 5, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.contmix(logits, rpb, value, 5, backend=backend)
    out.sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(t.grad).all() for t in (logits, rpb, value))
