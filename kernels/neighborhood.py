"""2-D neighbourhood attention (NAT semantics) on overlock's clamped windows: reference, op, dispatch.

For every query position x: softmax over its K x K clamped window of (q[x] . k[y] + rpb[offset]),
then the same window's values weighted by those probabilities. The windows and the bias index are
exactly ContMix's (ARCHITECTURE.md section 5: window start clamp(i - K//2, 0, H - K); bias entry
(K-1 + neighbour - query) per axis), so near a border a position sees K*K real neighbours, as in
NAT, never padding. Dilation d is NAT's too: the positions with the same residue mod d form a
sub-grid, and attention runs on each sub-grid with its own clamped windows; `kernels.neighborhood_attention`
turns a dilated call into non-dilated calls on the sub-grids, so every backend below is dilation-free.

Layering, as for ContMix (kernels/ops.py): `kernels.neighborhood_attention` checks arguments ->
`overlock::neighborhood_attention` (a torch.library op: one opaque node for torch.compile and
fvcore, a fake implementation, autograd that saves the inputs, the output and the log-sum-exp per
position, never the (B, heads, H, W, K*K) probability map) -> a backend with two functions,
`na_forward(q, k, v, rpb, K) -> (out, lse)` and `na_backward(grad, q, k, v, rpb, out, lse, K) ->
(dq, dk, dv, drpb or None)`:
- "reference": this module, the obviously-correct gather of every window (tests compare to it);
- "cpu": `cpu_neighborhood.py`, ContMix's tiles (dense products, chunked, memory-light);
- "triton": `triton_neighborhood.py`, fused FlashAttention-style kernels (CUDA, or the interpreter);
- "unfold": this module, the formulation that materialises the K*K neighbourhood of keys and values
  and multiplies, under plain autograd: the benchmark baseline.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.nn.functional as F

from . import ops, reference
from .reference import compute_dtype

# --- the reference (the oracle) -----------------------------------------------------------------


def window_index(length: int, kernel_size: int, dilation: int = 1, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, K) absolute neighbour indices, and (length, K) bias offsets (K-1 + neighbour - query in sub-grid steps).

    With dilation d, position i belongs to the sub-grid of residue i % d, of length ceil((length - r) / d);
    its window is the clamped K-window of i // d on that sub-grid. d = 1 gives reference.window_starts.
    """
    i = torch.arange(length, device=device)
    residue, sub = i % dilation, i // dilation
    sub_length = (length - residue + dilation - 1) // dilation
    start = torch.minimum((sub - kernel_size // 2).clamp(min=0), sub_length - kernel_size)
    window = start[:, None] + torch.arange(kernel_size, device=device)
    return residue[:, None] + dilation * window, window - sub[:, None] + kernel_size - 1


def _gather_indices(
    height: int, width: int, kernel_size: int, dilation: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, K*K) flat neighbour index and flat bias-table index of every window slot."""
    rows, row_offsets = window_index(height, kernel_size, dilation, device)
    cols, col_offsets = window_index(width, kernel_size, dilation, device)
    kk = kernel_size * kernel_size
    neighbours = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height, width, kk)
    span = 2 * kernel_size - 1
    bias = (row_offsets[:, None, :, None] * span + col_offsets[None, :, None, :]).reshape(height, width, kk)
    return neighbours, bias


def reference_logits(
    query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int, dilation: int = 1
) -> torch.Tensor:
    """(B, heads, H, W, K*K) q . k over every window slot, plus the bias, in the compute dtype."""
    batch, heads, height, width, channels = key.shape
    dtype = compute_dtype(query, key, *([] if rpb is None else [rpb]))
    neighbours, bias_index = _gather_indices(height, width, kernel_size, dilation, key.device)
    windows = key.to(dtype).reshape(batch, heads, height * width, channels)[:, :, neighbours]
    logits = (query.to(dtype).unsqueeze(-2) * windows).sum(-1)
    if rpb is not None:
        logits = logits + rpb.to(dtype).flatten(1)[:, bias_index]
    return logits


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: int,
    dilation: int = 1,
) -> torch.Tensor:
    """Neighbourhood attention by gathering every window (K*K copies of keys and values): the oracle.

    Differentiable by autograd (plain tensor ops); dilation is implemented directly, not through
    sub-grids, so it also checks the decomposition the public function uses.
    """
    batch, heads, height, width, channels = value.shape
    dtype = compute_dtype(query, key, value, *([] if rpb is None else [rpb]))
    probs = reference_logits(query, key, rpb, kernel_size, dilation).softmax(-1)
    neighbours, _ = _gather_indices(height, width, kernel_size, dilation, value.device)
    windows = value.to(dtype).reshape(batch, heads, height * width, channels)[:, :, neighbours]
    return (probs.unsqueeze(-1) * windows).sum(-2).to(value.dtype)


def _reference_forward(query, key, value, rpb, kernel_size):
    lse = reference_logits(query, key, rpb, kernel_size).logsumexp(-1)
    return reference_attention(query, key, value, rpb, kernel_size), lse


def _reference_backward(grad, query, key, value, rpb, out, lse, kernel_size):
    """The gradients written out (the backend runs inside a custom op, where autograd does not record).

    dv[y] = sum p[x,s] g[x] and dk[y] = sum dz[x,s] q[x] over the (x, s) whose neighbour is y
    (scatter-adds); dq[x] = sum_s dz[x,s] k[n(x,s)]; dz = p (dp - sum_s p dp), dp = g . v[n(x,s)].
    """
    batch, heads, height, width, channels = value.shape
    tensors = (grad, query, key, value, *([] if rpb is None else [rpb]))
    dtype = compute_dtype(*tensors)
    g, q, k, v = (t.to(dtype) for t in (grad, query, key, value))
    neighbours, bias_index = _gather_indices(height, width, kernel_size, 1, value.device)
    flat = neighbours.flatten()
    key_windows = k.reshape(batch, heads, -1, channels)[:, :, neighbours]
    value_windows = v.reshape(batch, heads, -1, channels)[:, :, neighbours]
    probs = reference_logits(q, k, None if rpb is None else rpb.to(dtype), kernel_size).softmax(-1)
    dprobs = (value_windows * g.unsqueeze(-2)).sum(-1)
    dz = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    dq = (dz.unsqueeze(-1) * key_windows).sum(-2)
    dk = torch.zeros(batch, heads, height * width, channels, dtype=dtype, device=value.device)
    dk.index_add_(2, flat, (dz.unsqueeze(-1) * q.unsqueeze(-2)).reshape(batch, heads, -1, channels))
    dv = torch.zeros_like(dk)
    dv.index_add_(2, flat, (probs.unsqueeze(-1) * g.unsqueeze(-2)).reshape(batch, heads, -1, channels))
    drpb = None
    if rpb is not None:
        table = torch.zeros(heads, rpb[0].numel(), dtype=dtype, device=rpb.device)
        table.index_add_(1, bias_index.flatten(), dz.sum(0).reshape(heads, -1))
        drpb = table.view(rpb.shape).to(rpb.dtype)
    return dq.to(query.dtype), dk.view(key.shape).to(key.dtype), dv.view(value.shape).to(value.dtype), drpb


# --- the unfold baseline ------------------------------------------------------------------------


def _unfold_windows(tensor: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, h, H, W, c) -> (B, h, H, W, K*K, c): F.unfold of the valid windows, replicate-padded to clamp."""
    batch, heads, height, width, channels = tensor.shape
    k = kernel_size
    planes = tensor.permute(0, 1, 4, 2, 3).reshape(batch, heads * channels, height, width)
    windows = F.unfold(planes, k).reshape(batch, heads * channels * k * k, height - k + 1, width - k + 1)
    windows = F.pad(windows, (k // 2,) * 4, mode="replicate").reshape(batch, heads, channels, k * k, height, width)
    return windows.permute(0, 1, 4, 5, 3, 2)


def unfold_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int
) -> torch.Tensor:
    """Materialise the K*K neighbourhood of keys and values, then two batched matmuls (plain autograd)."""
    height, width = value.shape[2:4]
    dtype = compute_dtype(query, key, value, *([] if rpb is None else [rpb]))
    q = query.to(dtype).unsqueeze(-2)  # (B, h, H, W, 1, c)
    logits = torch.matmul(q, _unfold_windows(key.to(dtype), kernel_size).transpose(-1, -2)).squeeze(-2)
    if rpb is not None:
        logits = logits + reference.gather_rpb(rpb.to(dtype), height, width, kernel_size)
    probs = logits.softmax(-1).unsqueeze(-2)
    return torch.matmul(probs, _unfold_windows(value.to(dtype), kernel_size)).squeeze(-2).to(value.dtype)


# --- the op -------------------------------------------------------------------------------------


def _backend_module(backend: str) -> ModuleType:
    if backend == "reference":
        return importlib.import_module(__name__)
    if backend == "cpu":
        return importlib.import_module(f"{__package__}.cpu_neighborhood")
    ops._triton()  # the ContMix kernels' import error, if Triton is missing
    return importlib.import_module(f"{__package__}.triton_neighborhood")


na_forward = _reference_forward
na_backward = _reference_backward


def _run(backend: str, function: str, *args):
    """Autocast off inside the op: the backends choose their own precision (see ops._run)."""
    with torch.autocast(device_type=args[0].device.type, enabled=False):
        return getattr(_backend_module(backend), function)(*args)


@torch.library.custom_op("overlock::neighborhood_attention", mutates_args=())
def neighborhood_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _run(backend, "na_forward", query, key, value, rpb, kernel_size)
    return out, lse


@neighborhood_attention_op.register_fake
def _(query, key, value, rpb, kernel_size, backend):
    tensors = (query, key, value, *([] if rpb is None else [rpb]))
    lse_dtype = torch.float32 if backend == "triton" else compute_dtype(*tensors)
    return value.new_empty(value.shape), value.new_empty(value.shape[:4], dtype=lse_dtype)


@torch.library.custom_op("overlock::neighborhood_attention_backward", mutates_args=())
def neighborhood_attention_backward_op(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, drpb); drpb is an empty tensor when there is no bias (an op cannot return None)."""
    dq, dk, dv, drpb = _run(backend, "na_backward", grad, query, key, value, rpb, out, lse, kernel_size)
    if drpb is None:
        drpb = value.new_empty(0)
    return dq, dk, dv, drpb


@neighborhood_attention_backward_op.register_fake
def _(grad, query, key, value, rpb, out, lse, kernel_size, backend):
    drpb = value.new_empty(0) if rpb is None else rpb.new_empty(rpb.shape)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), drpb


def _setup(ctx, inputs, output):
    query, key, value, rpb, kernel_size, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, value, rpb, out, lse)
    ctx.kernel_size = kernel_size
    ctx.backend = backend
    ctx.has_bias = rpb is not None


def _backward(ctx, grad_out, grad_lse):
    query, key, value, rpb, out, lse = ctx.saved_tensors
    dq, dk, dv, drpb = neighborhood_attention_backward_op(
        grad_out.contiguous(), query, key, value, rpb, out, lse, ctx.kernel_size, ctx.backend
    )
    return dq, dk, dv, (drpb if ctx.has_bias else None), None, None


neighborhood_attention_op.register_autograd(_backward, setup_context=_setup)


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: int,
    backend: str,
) -> torch.Tensor:
    """Run one non-dilated call on the backend `backend` names (arguments already checked)."""
    tensors = (query, key, value, *([] if rpb is None else [rpb]))
    backend = ops.resolve_backend(backend, tensors)
    if backend == "unfold":
        return unfold_attention(query, key, value, rpb, kernel_size)
    return neighborhood_attention_op(query, key, value, rpb, kernel_size, backend)[0]


def dilated(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: int,
    dilation: int,
    backend: str,
) -> torch.Tensor:
    """Dilation d as non-dilated attention on the d x d sub-grids of positions with equal residues.

    When d divides H and W, the sub-grids have one shape and are folded into the batch axis (one call);
    otherwise each sub-grid is one call (up to d*d) and the results are interleaved back.
    """
    if dilation == 1:
        return neighborhood_attention(query, key, value, rpb, kernel_size, backend)
    d = dilation
    batch, heads, height, width, channels = value.shape
    if height % d == 0 and width % d == 0:

        def split(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(batch, heads, height // d, d, width // d, d, t.shape[-1])
            return t.permute(0, 3, 5, 1, 2, 4, 6).reshape(batch * d * d, heads, height // d, width // d, t.shape[-1])

        out = neighborhood_attention(split(query), split(key), split(value), rpb, kernel_size, backend)
        out = out.reshape(batch, d, d, heads, height // d, width // d, channels)
        return out.permute(0, 3, 4, 1, 5, 2, 6).reshape(value.shape)
    out = value.new_empty(value.shape)
    for r in range(d):
        for s in range(d):
            part = [t[:, :, r::d, s::d] for t in (query, key, value)]
            out[:, :, r::d, s::d] = neighborhood_attention(*part, rpb, kernel_size, backend)
    return out
