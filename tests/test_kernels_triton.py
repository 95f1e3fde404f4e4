"""The Triton kernels against the reference: on CUDA when there is one, otherwise on CPU through
Triton's interpreter. Shapes stay small because the interpreter runs every program in Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from overlock import kernels
from overlock.kernels import ops, reference

pytest.importorskip("triton")

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "reference" / "golden" / "contmix_ops.expected.pt"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_module():
    module = ops._triton()
    if DEVICE == "cpu" and not module.INTERPRETED:
        pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set in this process")
    return module


@pytest.fixture(scope="module")
def goldens() -> dict:
    if not GOLDEN.is_file():
        pytest.fail(f"op goldens not found at {GOLDEN}: the checkout must sit beside shared/")
    return torch.load(GOLDEN, weights_only=True)


def make_inputs(batch, heads, height, width, channels, k, *, dtype=torch.float32, seed=0):
    """Random inputs; logits are a last-axis slice and value a permuted view, as in the model."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, heads, height, width, k * k + 4, generator=gen) * 2)[..., 4:]
    rpb = torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=gen)
    value = torch.randn(batch, heads, channels, height, width, generator=gen).permute(0, 1, 3, 4, 2)
    grad = torch.randn(batch, heads, height, width, channels, generator=gen)
    return [t.to(DEVICE) for t in (logits.to(dtype), rpb, value.to(dtype), grad.to(dtype))]


def grads_of(fn, inputs, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [leaf.grad for leaf in leaves]


def check_contmix(logits, rpb, value, grad, k, *, atol=2e-6, grad_atol=2e-5):
    out, grads = grads_of(lambda a, b, c: kernels.contmix(a, b, c, k, backend="triton"), (logits, rpb, value), grad)
    exact = [t.float() for t in (logits, rpb, value)]
    ref_out, ref_grads = grads_of(lambda a, b, c: reference.contmix(a, b, c, k), exact, grad.float())
    assert out.dtype == value.dtype and [g.dtype for g in grads] == [logits.dtype, rpb.dtype, value.dtype]
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=0)
    for name, got, want in zip(("logits", "rpb", "value"), grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want, atol=grad_atol, rtol=grad_atol, msg=name)


def test_triton_forward_reproduces_every_op_golden(triton_module, goldens):
    for name, case in goldens.items():
        k = case["kernel_size"]
        logits, rpb, value, probs = (case[key].to(DEVICE) for key in ("logits", "rpb", "value", "probs"))
        expected = case["out"].to(DEVICE)
        torch.testing.assert_close(
            kernels.contmix(logits, rpb, value, k, backend="triton"), expected, atol=2e-6, rtol=0, msg=name
        )
        torch.testing.assert_close(
            kernels.aggregate(probs, value, k, backend="triton"), expected, atol=2e-6, rtol=0, msg=name
        )


def test_triton_gradients_on_the_small_op_goldens(triton_module, goldens):
    for name in ("B1_G3_5x5_C4_K5", "B2_G4_9x11_C8_K7"):
        case = goldens[name]
        inputs = [case[key].to(DEVICE) for key in ("logits", "rpb", "value")]
        grad = torch.randn(case["out"].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        check_contmix(*inputs, grad, case["kernel_size"])


SHAPES = {
    "K3_non_square": (2, 2, 5, 9, 3, 3),
    "K5_c_not_pow2": (1, 3, 6, 8, 6, 5),
    "K7_H_eq_W_eq_K": (1, 2, 7, 7, 5, 7),
    "K13_W_eq_K_batch1": (1, 1, 14, 13, 3, 13),
    "K17_square": (1, 1, 17, 17, 2, 17),
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_triton_contmix_matches_reference(triton_module, shape):
    logits, rpb, value, grad = make_inputs(*shape)
    check_contmix(logits, rpb, value, grad, shape[-1])


def test_triton_aggregate_matches_reference(triton_module):
    k = 5
    logits, rpb, value, grad = make_inputs(2, 2, 6, 7, 3, k)
    probs = reference.probabilities(logits, rpb, k)
    out, grads = grads_of(lambda p, v: kernels.aggregate(p, v, k, backend="triton"), (probs, value), grad)
    ref_out, ref_grads = grads_of(lambda p, v: reference.aggregate(p, v, k), (probs, value), grad)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_triton_float16_accumulates_in_float32(triton_module):
    k = 5
    logits, rpb, value, grad = make_inputs(1, 2, 6, 7, 4, k, dtype=torch.float16)
    check_contmix(logits, rpb, value, grad, k, atol=2e-3, grad_atol=1e-2)


def test_triton_tiles_split_rows_and_channels(triton_module, monkeypatch):
    """Several position blocks per row (border and interior blocks) and several channel blocks."""
    monkeypatch.setattr(triton_module, "_TILE_ELEMENTS", 4 * 4 * 4)
    monkeypatch.setattr(triton_module, "_MAX_BLOCK_C", 4)
    k = 3
    assert triton_module._blocks(11, k, 6) == (4, 4, 4)
    logits, rpb, value, grad = make_inputs(1, 2, 4, 11, 6, k)
    check_contmix(logits, rpb, value, grad, k)


def test_triton_forward_saves_the_log_sum_exp_once_per_position(triton_module, monkeypatch):
    """The statistics the backward rebuilds p from, also with several channel blocks per position."""
    monkeypatch.setattr(triton_module, "_MAX_BLOCK_C", 4)
    k = 5
    logits, rpb, value, _ = make_inputs(2, 2, 6, 9, 7, k)
    out, lse = torch.ops.overlock.contmix(logits, rpb, value, k, "triton")
    assert lse.shape == value.shape[:4] and lse.dtype == torch.float32
    torch.testing.assert_close(lse, reference.biased_logits(logits, rpb, k).logsumexp(-1), atol=2e-6, rtol=0)
    torch.testing.assert_close(out, reference.contmix(logits, rpb, value, k), atol=2e-6, rtol=0)


def test_kernels_compile_for_h100_without_spilling():
    """The interpreter checks numbers, not compilation: compile every launched variant for sm_90 with
    ptxas (no GPU needed), at the T preset's Focus-Net shapes and one with several channel blocks."""
    pytest.importorskip("triton.backends.nvidia")
    shapes = ["14:13:16", "14:5:16", "7:7:16", "7:5:16", "56:17:48"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    compiled = []
    for extra in (["--dtype", "float32"], ["--dtype", "bfloat16"], ["--aggregate"]):
        command = [sys.executable, "-m", "overlock.kernels.triton_aot", *shapes, *extra]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        compiled += [json.loads(line) for line in done.stdout.splitlines()]
    assert len(compiled) == 3 * len(shapes) * 3
    assert {c["kernel"] for c in compiled} == {"_na_forward", "_na_backward_weights", "_na_backward_value"}
    assert {c["config"]["ONE_C_BLOCK"] for c in compiled if c["kernel"] == "_na_backward_weights"} == {True, False}
    spilling = [c for c in compiled if c["spill_bytes"] > 0]
    assert not spilling, spilling
    assert max(c["registers"] for c in compiled) <= 255
