"""ContMix as `torch.library` custom ops, and the one place where a backend name becomes code.

Registering the operators (rather than calling backend code directly) buys three things: the
tracer sees a single `overlock::contmix` node, so `torch.compile(fullgraph=True)` never breaks
the graph on Triton or on our CPU loops; fvcore's jit counter can give that node a FLOP handle;
and autograd saves what the backward needs and no probability map. The backward passes are
custom ops too (`overlock::contmix_backward`, `overlock::aggregate_backward`), so that
AOTAutograd traces them as opaque nodes instead of tracing into backend code.

What the fused op saves, and why: the inputs, the output and the softmax's log-sum-exp per
position (B, heads, H, W). With those the backward rebuilds every probability in one pass as
exp(logit + bias - lse), and gets the softmax-backward term D = sum_s p_s dp_s as grad . out (the
same identity FlashAttention uses), so it never re-reads the logits just for the softmax
statistics. The log-sum-exp is a second output of `overlock::contmix`, marked non-differentiable;
`kernels.contmix` returns the first.

Backends (`BACKENDS`): every one implements the same four functions, `contmix_forward` (returning
the output and the log-sum-exp), `contmix_backward` (taking them), `aggregate_forward`,
`aggregate_backward`:
- "reference": `reference.py`, the obviously-correct gather of every window (tests compare to it);
- "cpu": `cpu.py`, tiled dense products (pure PyTorch, so it also runs on other devices);
- "triton": `triton_kernels.py`, fused kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
- "unfold": `unfold.py`, the authors' fallback, a benchmark baseline. It bypasses the custom op
  and runs under plain autograd, exactly like the code it stands in for.
"auto" is Triton for CUDA tensors and the CPU path for everything else.

`contmix_from_queries` (the logits as query @ keys + bias) is the one exception to the custom ops:
eagerly on float32 CPU tensors it is an autograd function around the C kernels, which form the
logits themselves (`cpu.ContMixFromQueries`); everywhere else (compiled, exported, traced, other
backends and dtypes) it forms the logits and calls `overlock::contmix`, so tracers see the op.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from . import cpu, reference, unfold

BACKENDS = ("reference", "cpu", "triton", "unfold")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton() -> ModuleType:
    """Import the Triton kernels on first use: Triton reads TRITON_INTERPRET when a kernel is defined."""
    try:
        return importlib.import_module(f"{__package__}.triton_kernels")
    except ImportError as exc:  # triton missing or broken
        raise ValueError(f"backend='triton' needs the triton package, which failed to import: {exc}") from exc


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the Triton kernels can be imported (whether or not a GPU is present)."""
    try:
        _triton()
    except ValueError:
        return False
    return True


def resolve_backend(backend: str, tensors: tuple[torch.Tensor, ...]) -> str:
    """Turn "auto" into a concrete backend and check that it can run on these tensors.

    Raises ValueError naming `backend` when the choice cannot work (Triton on CPU tensors without
    the interpreter, Triton with float64).
    """
    device = tensors[0].device
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "cpu"
    if backend == "triton":
        module = _triton()
        if device.type != "cuda" and not (device.type == "cpu" and module.INTERPRETED):
            hint = ""
            if device.type == "cpu":
                state = "set" if os.environ.get("TRITON_INTERPRET") else "not set"
                hint = (
                    f"; to run the kernels on CPU through Triton's interpreter, set TRITON_INTERPRET=1 before "
                    f"the first Triton call (it is {state} now, and the kernels were defined without it)"
                )
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}{hint}")
        bad = [t.dtype for t in tensors if t.dtype not in _TRITON_DTYPES]
        if bad:
            raise ValueError(f"backend='triton' supports float16, bfloat16 and float32, got {bad[0]}")
    return backend


def _implementation(backend: str) -> ModuleType:
    if backend == "triton":
        return _triton()
    return {"reference": reference, "cpu": cpu}[backend]


def _run(backend: str, function: str, *args):
    """Call a backend function with autocast off.

    Backends set their own precision (float32 accumulation, output in the input's dtype). Autocast
    is thread-local and stays active inside custom ops, so without this it would re-cast their
    internal products (a bf16 bmm writing into a float32 buffer under CPU autocast).
    """
    with torch.autocast(device_type=args[0].device.type, enabled=False):
        return getattr(_implementation(backend), function)(*args)


def _auto(backend: str, tensor: torch.Tensor) -> str:
    """Resolve "auto" inside an op: exported programs keep "auto" so they pick the backend where they run."""
    return resolve_backend(backend, (tensor,)) if backend == "auto" else backend


def _op_backend(requested: str, resolved: str) -> str:
    """The backend argument recorded in the op call: "auto" while torch.export traces, else the resolved one.

    A program exported on CPU then runs Triton when loaded onto a GPU, instead of the CPU path
    that was resolved at export time.
    """
    return "auto" if requested == "auto" and torch.compiler.is_exporting() else resolved


# --- the fused op -------------------------------------------------------------------------------


@torch.library.custom_op("overlock::contmix", mutates_args=())
def contmix_op(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _run(_auto(backend, logits), "contmix_forward", logits, rpb, value, kernel_size)
    return out, lse


@contmix_op.register_fake
def _(logits, rpb, value, kernel_size, backend):
    lse_dtype = reference.compute_dtype(logits, rpb, value)
    return value.new_empty(value.shape), logits.new_empty(logits.shape[:4], dtype=lse_dtype)


@torch.library.custom_op("overlock::contmix_backward", mutates_args=())
def contmix_backward_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    rpb: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dlogits, drpb, dvalue = _run(
        _auto(backend, logits), "contmix_backward", grad, logits, rpb, value, out, lse, kernel_size
    )
    return dlogits, drpb, dvalue


@contmix_backward_op.register_fake
def _(grad, logits, rpb, value, out, lse, kernel_size, backend):
    return logits.new_empty(logits.shape), rpb.new_empty(rpb.shape), value.new_empty(value.shape)


def _contmix_setup(ctx, inputs, output):
    logits, rpb, value, kernel_size, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, rpb, value, out, lse)
    ctx.kernel_size = kernel_size
    ctx.backend = backend


def _contmix_backward(ctx, grad_out, grad_lse):
    logits, rpb, value, out, lse = ctx.saved_tensors
    dlogits, drpb, dvalue = contmix_backward_op(grad_out, logits, rpb, value, out, lse, ctx.kernel_size, ctx.backend)
    return dlogits, drpb, dvalue, None, None


contmix_op.register_autograd(_contmix_backward, setup_context=_contmix_setup)


# --- the aggregation alone ----------------------------------------------------------------------


@torch.library.custom_op("overlock::aggregate", mutates_args=())
def aggregate_op(probs: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str) -> torch.Tensor:
    return _run(_auto(backend, probs), "aggregate_forward", probs, value, kernel_size)


@aggregate_op.register_fake
def _(probs, value, kernel_size, backend):
    return value.new_empty(value.shape)


@torch.library.custom_op("overlock::aggregate_backward", mutates_args=())
def aggregate_backward_op(
    grad: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    dprobs, dvalue = _run(_auto(backend, probs), "aggregate_backward", grad, probs, value, kernel_size)
    return dprobs, dvalue


@aggregate_backward_op.register_fake
def _(grad, probs, value, kernel_size, backend):
    return probs.new_empty(probs.shape), value.new_empty(value.shape)


def _aggregate_setup(ctx, inputs, output):
    probs, value, kernel_size, backend = inputs
    ctx.save_for_backward(probs, value)
    ctx.kernel_size = kernel_size
    ctx.backend = backend


def _aggregate_backward(ctx, grad_out):
    probs, value = ctx.saved_tensors
    dprobs, dvalue = aggregate_backward_op(grad_out, probs, value, ctx.kernel_size, ctx.backend)
    return dprobs, dvalue, None, None


aggregate_op.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)


# --- dispatch -----------------------------------------------------------------------------------


def contmix(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str
) -> torch.Tensor:
    """Run the fused operator on the backend `backend` names (arguments already checked)."""
    resolved = resolve_backend(backend, (logits, rpb, value))
    if resolved == "unfold":
        return unfold.contmix(logits, rpb, value, kernel_size)
    return contmix_op(logits, rpb, value, kernel_size, _op_backend(backend, resolved))[0]


def logits_formed_inside(backend: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether `contmix_from_queries` runs `cpu.ContMixFromQueries` (the C kernels forming the logits
    themselves): the CPU backend, float32, eagerly (not compiled, exported or jit-traced: the
    autograd function's C calls are opaque to tracers; those get the logits and `overlock::contmix`)."""
    return resolve_backend(backend, tensors) == "cpu" and not torch.jit.is_tracing() and cpu.native_applies(*tensors)


def contmix_from_queries(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_bias: torch.Tensor | None,
    rpb: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int,
    backend: str,
) -> torch.Tensor:
    """`contmix` of logits = query @ keys + key_bias (arguments already checked)."""
    tensors = (value, query, keys, rpb, *(() if key_bias is None else (key_bias,)))
    if logits_formed_inside(backend, tensors):
        return cpu.ContMixFromQueries.apply(query, keys, key_bias, rpb, value, kernel_size)
    logits = torch.matmul(query.flatten(2, 3), keys).unflatten(2, query.shape[2:4])
    if key_bias is not None:
        logits = logits + key_bias
    return contmix(logits, rpb, value, kernel_size, backend)


def aggregate(probs: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str) -> torch.Tensor:
    """Run the aggregation on the backend `backend` names (arguments already checked)."""
    resolved = resolve_backend(backend, (probs, value))
    if resolved == "unfold":
        return unfold.aggregate(probs, value, kernel_size)
    return aggregate_op(probs, value, kernel_size, _op_backend(backend, resolved))
