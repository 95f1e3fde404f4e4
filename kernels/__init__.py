"""ContMix operators: the neighbourhood aggregation NA and the fused softmax + NA; and 2-D
neighbourhood attention on the same clamped windows (`neighborhood_attention`, kernels/neighborhood.py).

Layering (see STYLE.md): these functions check shapes and arguments and give clear errors ->
`ops` (torch.library custom ops with autograd and fake implementations, and the backend
dispatch) -> a backend (`reference`, `cpu`, `triton_kernels`; `unfold` as a baseline) -> kernels.

Also here: the CPU depthwise convolution with a fast backward (`depthwise`), and overlock's compiled
C kernels (`native` builds kernels/csrc/*.c on first use), of which `gelu_dwconv3x3` runs the middle
of every MLP, GELU -> 3x3 depthwise conv -> GRN's energy, in one pass.
"""

from __future__ import annotations

import torch

from . import gelu_dwconv, grn, neighborhood, ops, reference
from .gelu_dwconv import gelu_dwconv3x3
from .ops import BACKENDS

__all__ = [
    "BACKENDS",
    "check_backend",
    "aggregate",
    "contmix",
    "contmix_from_queries",
    "gelu_dwconv",
    "gelu_dwconv3x3",
    "grn",
    "logits_formed_inside",
    "neighborhood_attention",
    "reference",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_backend(backend: str) -> None:
    """Raise ValueError naming `backend` unless it is "auto" or one of BACKENDS."""
    if backend != "auto" and backend not in BACKENDS:
        valid = ", ".join(repr(b) for b in ("auto", *BACKENDS))
        raise ValueError(f"backend={backend!r} is not known; valid: {valid}")


def _check_kernel_size(kernel_size: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")


def _check_tensor(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but value is on {device}: all tensors must share a device")


def _check_map(name: str, tensor: torch.Tensor, kernel_size: int, last: int | None) -> None:
    if tensor.dim() != 5:
        raise ValueError(f"{name} must be 5-D (B, heads, H, W, ...), got shape {tuple(tensor.shape)}")
    height, width = tensor.shape[2:4]
    if height < kernel_size or width < kernel_size:
        raise ValueError(f"{name}: H and W must be >= kernel_size={kernel_size}, got H={height}, W={width}")
    if last is not None and tensor.shape[-1] != last:
        raise ValueError(f"{name}: last dimension must be kernel_size**2={last}, got {tensor.shape[-1]}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")


def aggregate(probs: torch.Tensor, value: torch.Tensor, kernel_size: int, *, backend: str = "auto") -> torch.Tensor:
    """Neighbourhood aggregation NA(probs, value, K) over clamped K x K windows.

    probs (B, heads, H, W, K*K), value (B, heads, H, W, c) -> (B, heads, H, W, c) in value's dtype.
    Differentiable in probs and value. Use `contmix` when the probabilities come from a softmax:
    it never materialises them.
    """
    check_backend(backend)
    _check_kernel_size(kernel_size)
    _check_tensor("value", value, value.device if isinstance(value, torch.Tensor) else None)
    _check_tensor("probs", probs, value.device)
    _check_map("probs", probs, kernel_size, kernel_size * kernel_size)
    _check_map("value", value, kernel_size, None)
    if probs.shape[:4] != value.shape[:4]:
        raise ValueError(
            f"probs and value disagree on (B, heads, H, W): {tuple(probs.shape[:4])} vs {tuple(value.shape[:4])}"
        )
    return ops.aggregate(probs, value, kernel_size, backend)


def contmix(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int, *, backend: str = "auto"
) -> torch.Tensor:
    """ContMix's mixing step: NA(softmax(logits + rpb at the clamped windows), value, K).

    logits (B, heads, H, W, K*K), rpb (heads, 2K-1, 2K-1), value (B, heads, H, W, c) ->
    (B, heads, H, W, c) in value's dtype; accumulates in float32 for half inputs. Differentiable
    in all three tensors; the fast backends rebuild the softmax in the backward from the saved
    log-sum-exp (one float per position) instead of keeping the (B, heads, H, W, K*K) probability
    map. The output is saved for the backward, so edit it in place only after the backward. `backend`: "auto" (Triton on CUDA, the CPU
    path otherwise), "triton", "cpu", "reference", or the "unfold" baseline.
    """
    check_backend(backend)
    _check_kernel_size(kernel_size)
    _check_tensor("value", value, value.device if isinstance(value, torch.Tensor) else None)
    _check_tensor("logits", logits, value.device)
    _check_map("logits", logits, kernel_size, kernel_size * kernel_size)
    if logits.shape[:4] != value.shape[:4]:
        raise ValueError(
            f"logits and value disagree on (B, heads, H, W): {tuple(logits.shape[:4])} vs {tuple(value.shape[:4])}"
        )
    _check_mixing(rpb, value, kernel_size)
    return ops.contmix(logits, rpb, value, kernel_size, backend)


def _check_mixing(rpb: torch.Tensor, value: torch.Tensor, kernel_size: int) -> None:
    """What `contmix` and `contmix_from_queries` both mix: value (B, heads, H, W, c), rpb (heads, 2K-1, 2K-1)."""
    _check_tensor("rpb", rpb, value.device)
    _check_map("value", value, kernel_size, None)
    span = 2 * kernel_size - 1
    if rpb.dim() != 3 or tuple(rpb.shape) != (value.shape[1], span, span):
        raise ValueError(
            f"rpb must have shape (heads, 2K-1, 2K-1)=({value.shape[1]}, {span}, {span}), got {tuple(rpb.shape)}"
        )


def contmix_from_queries(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_bias: torch.Tensor | None,
    rpb: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`contmix` with the logits given by their factors: logits = query @ keys + key_bias.

    query (B, heads, H, W, c_q), keys (B, heads, c_q, K*K), key_bias (K*K,) or None: ContMix's
    kernel logits are such a product (the queries against the region centres' projected keys).
    Where `logits_formed_inside` (float32 CPU tensors, eagerly, the C library built, backend
    "auto" or "cpu"), the kernels form each position's logits where they use them and never write
    the (B, heads, H, W, K*K) map, forward or backward; elsewhere this forms the logits and calls
    `contmix`. Same values either way (float rounding aside); differentiable in all five tensors.
    """
    check_backend(backend)
    _check_kernel_size(kernel_size)
    _check_tensor("value", value, value.device if isinstance(value, torch.Tensor) else None)
    _check_tensor("query", query, value.device)
    _check_tensor("keys", keys, value.device)
    _check_mixing(rpb, value, kernel_size)
    if query.dim() != 5 or query.shape[:4] != value.shape[:4]:
        raise ValueError(
            f"query must be (B, heads, H, W, c_q) with value's (B, heads, H, W)={tuple(value.shape[:4])}, "
            f"got {tuple(query.shape)}"
        )
    expected = (*value.shape[:2], query.shape[-1], kernel_size * kernel_size)
    if tuple(keys.shape) != expected:
        raise ValueError(f"keys must be (B, heads, c_q, K*K)={expected}, got {tuple(keys.shape)}")
    if key_bias is not None:
        _check_tensor("key_bias", key_bias, value.device)
        if tuple(key_bias.shape) != (kernel_size * kernel_size,):
            raise ValueError(f"key_bias must be (K*K,)=({kernel_size * kernel_size},), got {tuple(key_bias.shape)}")
    return ops.contmix_from_queries(query, keys, key_bias, rpb, value, kernel_size, backend)


def logits_formed_inside(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether `contmix_from_queries` forms the logits inside the kernels for these tensors (value first)."""
    return ops.logits_formed_inside(backend, tensors)


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: int,
    *,
    dilation: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """2-D neighbourhood attention (NAT) over ContMix's clamped K x K windows, with relative position bias.

    out[x] = sum_s softmax_s(query[x] . key[n(x, s)] + rpb[offset(x, s)]) value[n(x, s)], windows and
    bias index as in `contmix` (see kernels/neighborhood.py). query/key/value (B, heads, H, W, c),
    all the same shape; rpb (heads, 2K-1, 2K-1) or None; the query is used as given (scale it
    first). Returns (B, heads, H, W, c) in value's dtype; differentiable in all four tensors; the
    fast backends save one log-sum-exp per position, never the probability map. `dilation` d:
    NAT's dilated windows (every d-th position, per residue sub-grid), so H and W must be
    >= kernel_size * d. `backend` as for `contmix`.
    """
    check_backend(backend)
    _check_kernel_size(kernel_size)
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    _check_tensor("value", value, value.device if isinstance(value, torch.Tensor) else None)
    _check_tensor("query", query, value.device)
    _check_tensor("key", key, value.device)
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if dilation > 1 and tensor.dim() == 5 and min(tensor.shape[2:4]) < kernel_size * dilation:
            raise ValueError(
                f"{name}: H and W must be >= kernel_size * dilation = {kernel_size * dilation}, "
                f"got H={tensor.shape[2]}, W={tensor.shape[3]}"
            )
        _check_map(name, tensor, kernel_size, None)
    if query.shape != value.shape or key.shape != value.shape:
        raise ValueError(
            "query, key and value must have the same shape (B, heads, H, W, c), got "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if rpb is not None:
        _check_tensor("rpb", rpb, value.device)
        side = 2 * kernel_size - 1
        if rpb.dim() != 3 or tuple(rpb.shape) != (value.shape[1], side, side):
            raise ValueError(
                f"rpb must be None or have shape (heads, 2K-1, 2K-1)=({value.shape[1]}, {side}, {side}), "
                f"got {tuple(rpb.shape)}"
            )
    return neighborhood.dilated(query, key, value, rpb, kernel_size, dilation, backend)
