"""kernels.cpu with several threads: chunks run in worker threads and give the one-thread results."""

from __future__ import annotations

import pytest
import torch

from overlock import kernels
from overlock.kernels import cpu


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _inputs(k=5):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 9, 10, k * k, generator=gen, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(4, 2 * k - 1, 2 * k - 1, generator=gen, dtype=torch.float64, requires_grad=True)
    value = torch.randn(3, 4, 9, 10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 9, 10, 6, generator=gen, dtype=torch.float64)
    return logits, rpb, value, grad


def _run(logits, rpb, value, grad, k=5):
    out = kernels.contmix(logits, rpb, value, k, backend="cpu")
    return (out, *torch.autograd.grad(out, (logits, rpb, value), grad))


def test_worker_pool_gives_the_sequential_results_and_restores_the_thread_count(two_threads, monkeypatch):
    logits, rpb, value, grad = _inputs()
    used = []
    real_pool = cpu._pool
    monkeypatch.setattr(cpu, "_pool", lambda workers: used.append(workers) or real_pool(workers))
    threaded = _run(logits, rpb, value, grad)
    assert used and set(used) == {2}  # forward and backward ran their chunks in the pool
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(cpu, "_workers", lambda device: 1)
    sequential = _run(logits, rpb, value, grad)
    reference = kernels.contmix(logits, rpb, value, 5, backend="reference")
    torch.testing.assert_close(threaded[0], reference)
    for a, b in zip(threaded, sequential, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunks_give_every_worker_work_within_the_memory_budget():
    plan = cpu._plan_cpu(28, 28, 13, 16)
    one = cpu._chunk_rows(64, plan, 28, 28, 13, 16, 4, workers=1)
    two = cpu._chunk_rows(64, plan, 28, 28, 13, 16, 4, workers=2)
    assert two <= one and two <= 64 // (2 * cpu.CHUNKS_PER_THREAD)


def test_inference_mode_and_aggregate_work_in_workers(two_threads):
    logits, rpb, value, _ = _inputs()
    probs = torch.softmax(logits.detach(), dim=-1)
    with torch.inference_mode():
        out = kernels.contmix(logits, rpb, value, 5, backend="cpu")
        agg = kernels.aggregate(probs, value, 5, backend="cpu")
    torch.testing.assert_close(out, kernels.contmix(logits, rpb, value, 5, backend="reference").detach())
    torch.testing.assert_close(agg, kernels.aggregate(probs, value.detach(), 5, backend="reference"))
