"""The plain, obviously-correct ContMix operators (ARCHITECTURE.md section 5).

Every fast backend is tested against these functions. They gather the K*K clamped windows
explicitly, so they cost K*K copies of the values: fine for tests, never for training.

The backward functions are written out (rather than left to autograd) because the `reference`
backend runs them inside a custom op, where autograd does not record; the tests check them
against autograd of the forward functions, which themselves pass `gradcheck` in float64.
"""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs (accumulate in fp32), float64 if any input is."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def window_starts(length: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """First row (or column) of the clamped window of every output position.

    Windows never leave the map: near a border the window slides inwards instead of being
    zero padded, so every window holds exactly K*K real neighbours.
    """
    idx = torch.arange(length, device=device)
    return (idx - kernel_size // 2).clamp(0, length - kernel_size)


def _window_index(length: int, kernel_size: int, device: torch.device | None) -> torch.Tensor:
    """(length, K) absolute indices of the window of each position."""
    offsets = torch.arange(kernel_size, device=device)
    return window_starts(length, kernel_size, device)[:, None] + offsets[None, :]


def neighbour_index(height: int, width: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(H, W, K*K) flat index (row * W + col) of the neighbour in every window slot."""
    rows = _window_index(height, kernel_size, device)  # (H, K)
    cols = _window_index(width, kernel_size, device)  # (W, K)
    flat = rows[:, None, :, None] * width + cols[None, :, None, :]
    return flat.reshape(height, width, kernel_size * kernel_size)


def rpb_index(height: int, width: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(H, W, K*K) flat indices into a (2K-1)*(2K-1) bias table, one per window slot.

    The bias of a slot depends on the offset between the neighbour and the query position,
    which near a border is no longer centred: hence an index per position, not per slot.
    """
    span = 2 * kernel_size - 1
    rows = _window_index(height, kernel_size, device) - torch.arange(height, device=device)[:, None]
    cols = _window_index(width, kernel_size, device) - torch.arange(width, device=device)[:, None]
    rows = rows + kernel_size - 1
    cols = cols + kernel_size - 1
    flat = rows[:, None, :, None] * span + cols[None, :, None, :]
    return flat.reshape(height, width, kernel_size * kernel_size)


def gather_rpb(rpb: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """(heads, 2K-1, 2K-1) bias table -> (heads, H, W, K*K) bias of every window slot."""
    index = rpb_index(height, width, kernel_size, rpb.device)
    return rpb.flatten(1)[:, index]


def _windows(value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, h, H, W, c) -> (B, h, H, W, K*K, c): every position's clamped window, copied out."""
    batch, heads, height, width, channels = value.shape
    index = neighbour_index(height, width, kernel_size, value.device)
    return value.reshape(batch, heads, height * width, channels)[:, :, index]


def aggregate(probs: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """NA(p, v, K): out[b,g,i,j] = sum_{a,b'} p[b,g,i,j,a*K+b'] * v[b,g,si+a,sj+b'].

    probs (B, heads, H, W, K*K), value (B, heads, H, W, c) -> (B, heads, H, W, c) in value's dtype.
    """
    dtype = compute_dtype(probs, value)
    windows = _windows(value.to(dtype), kernel_size)
    out = (probs.to(dtype).unsqueeze(-1) * windows).sum(dim=-2)
    return out.to(value.dtype)


def biased_logits(logits: torch.Tensor, rpb: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """logits + rpb at the clamped windows, in the compute dtype: what the softmax normalises."""
    height, width = logits.shape[2:4]
    dtype = compute_dtype(logits, rpb)
    return logits.to(dtype) + gather_rpb(rpb.to(dtype), height, width, kernel_size)


def probabilities(logits: torch.Tensor, rpb: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """softmax(logits + rpb at the clamped windows) in the compute dtype: the map the fused op avoids."""
    return biased_logits(logits, rpb, kernel_size).softmax(dim=-1)


def contmix(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """NA(softmax(logits + rpb at the clamped windows), value): the whole ContMix mixing step."""
    dtype = compute_dtype(logits, rpb, value)
    probs = probabilities(logits.to(dtype), rpb.to(dtype), kernel_size)
    return aggregate(probs, value.to(dtype), kernel_size).to(value.dtype)


def aggregate_backward(
    grad: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `aggregate` w.r.t. probs and value, in their dtypes.

    d probs[x, s] = grad[x] . v[n(x, s)]; d value[y] = sum of probs[x, s] * grad[x] over the
    (x, s) whose neighbour n(x, s) is y (a scatter-add: near borders y sits in more windows).
    """
    batch, heads, height, width, channels = value.shape
    dtype = compute_dtype(grad, probs, value)
    grad = grad.to(dtype)
    windows = _windows(value.to(dtype), kernel_size)
    dprobs = (windows * grad.unsqueeze(-2)).sum(-1)
    contributions = probs.to(dtype).unsqueeze(-1) * grad.unsqueeze(-2)  # (B, h, H, W, K*K, c)
    index = neighbour_index(height, width, kernel_size, value.device).flatten()
    dvalue = torch.zeros(batch, heads, height * width, channels, dtype=dtype, device=value.device)
    dvalue.index_add_(2, index, contributions.reshape(batch, heads, -1, channels))
    return dprobs.to(probs.dtype), dvalue.view(value.shape).to(value.dtype)


def contmix_gradients(
    grad: torch.Tensor, logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `contmix` w.r.t. logits, rpb and value, in their dtypes.

    Softmax backward: d logits = p * (dp - sum(p * dp)); the bias gradient sums d logits over the
    batch and over every (position, slot) that reads the same table entry.
    """
    heads, height, width = logits.shape[1:4]
    dtype = compute_dtype(grad, logits, rpb, value)
    probs = probabilities(logits.to(dtype), rpb.to(dtype), kernel_size)
    dprobs, dvalue = aggregate_backward(grad.to(dtype), probs, value.to(dtype), kernel_size)
    dlogits = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    index = rpb_index(height, width, kernel_size, rpb.device).flatten()
    drpb = torch.zeros(heads, rpb[0].numel(), dtype=dtype, device=rpb.device)
    drpb.index_add_(1, index, dlogits.sum(0).reshape(heads, -1))
    return dlogits.to(logits.dtype), drpb.view(rpb.shape).to(rpb.dtype), dvalue.to(value.dtype)


# --- the backend interface of `ops` (every backend has these four names) ----------------------


def contmix_forward(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`contmix` and the softmax's log-sum-exp per position (B, heads, H, W), which the op saves."""
    lse = biased_logits(logits, rpb, kernel_size).logsumexp(dim=-1)
    return contmix(logits, rpb, value, kernel_size), lse


def contmix_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    rpb: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`contmix_gradients`, which recomputes everything: the saved out and lse are only for the fast backends."""
    return contmix_gradients(grad, logits, rpb, value, kernel_size)


aggregate_forward = aggregate
