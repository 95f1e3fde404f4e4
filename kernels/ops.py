"""ContMix as `torch.library` custom ops: one opaque node for torch.compile and fvcore.

Registering the operators (rather than calling backend code directly) buys three things: the
tracer sees a single `overlock::contmix` node, so `torch.compile(fullgraph=True)` never breaks
the graph on Triton or on our CPU loops; fvcore's jit counter can give that node a FLOP handle;
and autograd saves only the inputs (the backward recomputes the softmax).
"""

from __future__ import annotations

import torch

from . import reference

BACKENDS = ("reference",)


def _run_contmix(logits, rpb, value, kernel_size, backend):
    return reference.contmix(logits, rpb, value, kernel_size)


def _run_aggregate(probs, value, kernel_size, backend):
    return reference.aggregate(probs, value, kernel_size).to(value.dtype)


@torch.library.custom_op("overlock::contmix", mutates_args=())
def contmix_op(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str) -> torch.Tensor:
    return _run_contmix(logits, rpb, value, kernel_size, backend)


@contmix_op.register_fake
def _(logits, rpb, value, kernel_size, backend):
    return value.new_empty(value.shape)


def _contmix_setup(ctx, inputs, output):
    logits, rpb, value, kernel_size, backend = inputs
    ctx.save_for_backward(logits, rpb, value)
    ctx.kernel_size = kernel_size
    ctx.backend = backend


def _contmix_backward(ctx, grad_out):
    logits, rpb, value = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (logits, rpb, value)]
        out = reference.contmix(*leaves, ctx.kernel_size)
        grads = torch.autograd.grad(out, leaves, grad_out)
    return grads[0], grads[1], grads[2], None, None


contmix_op.register_autograd(_contmix_backward, setup_context=_contmix_setup)


@torch.library.custom_op("overlock::aggregate", mutates_args=())
def aggregate_op(probs: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str) -> torch.Tensor:
    return _run_aggregate(probs, value, kernel_size, backend)


@aggregate_op.register_fake
def _(probs, value, kernel_size, backend):
    return value.new_empty(value.shape)


def _aggregate_setup(ctx, inputs, output):
    probs, value, kernel_size, backend = inputs
    ctx.save_for_backward(probs, value)
    ctx.kernel_size = kernel_size


def _aggregate_backward(ctx, grad_out):
    probs, value = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (probs, value)]
        out = reference.aggregate(*leaves, ctx.kernel_size)
        grads = torch.autograd.grad(out, leaves, grad_out)
    return grads[0], grads[1], None, None


aggregate_op.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)
