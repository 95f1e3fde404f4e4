"""ContMix operators: the neighbourhood aggregation NA and the fused softmax + NA.

Layering (see STYLE.md): these functions check shapes and arguments and give clear errors ->
`ops` (torch.library custom ops with autograd and fake implementations) -> a backend
(`reference`, and the fast ones) -> kernels.
"""

from __future__ import annotations

import torch

from . import ops, reference
from .ops import BACKENDS

__all__ = ["BACKENDS", "aggregate", "contmix", "reference"]


def _check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        valid = ", ".join(repr(b) for b in ("auto", *BACKENDS))
        raise ValueError(f"backend={backend!r} is not known; valid: {valid}")


def _resolve(backend: str, tensor: torch.Tensor) -> str:
    return "reference" if backend == "auto" else backend


def _check_map(name: str, tensor: torch.Tensor, kernel_size: int, last: int | None) -> None:
    if tensor.dim() != 5:
        raise ValueError(f"{name} must be 5-D (B, heads, H, W, ...), got shape {tuple(tensor.shape)}")
    height, width = tensor.shape[2:4]
    if height < kernel_size or width < kernel_size:
        raise ValueError(f"{name}: H and W must be >= kernel_size={kernel_size}, got H={height}, W={width}")
    if last is not None and tensor.shape[-1] != last:
        raise ValueError(f"{name}: last dimension must be kernel_size**2={last}, got {tensor.shape[-1]}")


def _check_kernel_size(kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")


def aggregate(probs: torch.Tensor, value: torch.Tensor, kernel_size: int, *, backend: str = "auto") -> torch.Tensor:
    """Neighbourhood aggregation: probs (B, h, H, W, K*K), value (B, h, H, W, c) -> (B, h, H, W, c)."""
    _check_backend(backend)
    _check_kernel_size(kernel_size)
    _check_map("probs", probs, kernel_size, kernel_size * kernel_size)
    _check_map("value", value, kernel_size, None)
    if probs.shape[:4] != value.shape[:4]:
        raise ValueError(f"probs and value disagree on (B, heads, H, W): {tuple(probs.shape[:4])} vs {tuple(value.shape[:4])}")
    return ops.aggregate_op(probs, value, kernel_size, _resolve(backend, value))


def contmix(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int, *, backend: str = "auto") -> torch.Tensor:
    """NA(softmax(logits + rpb at the clamped windows), value), without keeping the probability map."""
    _check_backend(backend)
    _check_kernel_size(kernel_size)
    _check_map("logits", logits, kernel_size, kernel_size * kernel_size)
    _check_map("value", value, kernel_size, None)
    if logits.shape[:4] != value.shape[:4]:
        raise ValueError(f"logits and value disagree on (B, heads, H, W): {tuple(logits.shape[:4])} vs {tuple(value.shape[:4])}")
    span = 2 * kernel_size - 1
    if rpb.dim() != 3 or tuple(rpb.shape) != (logits.shape[1], span, span):
        raise ValueError(f"rpb must have shape (heads, 2K-1, 2K-1)=({logits.shape[1]}, {span}, {span}), got {tuple(rpb.shape)}")
    return ops.contmix_op(logits, rpb, value, kernel_size, _resolve(backend, value))
