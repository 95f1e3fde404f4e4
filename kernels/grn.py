"""The two passes over the map of GRN's backward, compiled (kernels/csrc/grn.c).

Why. GRN's input gradient is g * scale + x * coef per (image, channel), where coef comes from the
reduction A = sum over pixels of g * x; grad_beta is the sum of g. PyTorch's ops make about ten
passes over the map for that (a product and its sum, the sum of g, a scaled copy, an in-place
multiply-add); the C kernels make two: one that reduces g * x and g together, one that writes the
gradient. The map is the 4x-wide hidden map of every MLP, so that is about 4% of an XT training step
in PyTorch ops. Float32 channels_last CPU maps where the C library could be built
(`kernels.native`); `builder.layers._GRNFunction` keeps its PyTorch ops everywhere else.
"""

from __future__ import annotations

import torch

from . import native

LIBRARY = "grn"


def native_applies(grad: torch.Tensor, x: torch.Tensor) -> bool:
    """float32 channels_last CPU maps of one shape, eagerly, with the C library built."""
    return (
        not torch.compiler.is_compiling()
        and x.dim() == 4
        and x.numel() > 0
        and grad.shape == x.shape
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (grad, x))
        and all(t.is_contiguous(memory_format=torch.channels_last) for t in (grad, x))
        and native.library(LIBRARY) is not None
    )


def _check(grad: torch.Tensor, x: torch.Tensor) -> None:
    if not native_applies(grad, x):
        raise ValueError(
            "the GRN kernels need float32 channels_last CPU maps of one shape and the compiled library "
            f"(got {tuple(grad.shape)} {grad.dtype} and {tuple(x.shape)} {x.dtype}; {native.status(LIBRARY)})"
        )


def backward_sums(grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over H, W of grad * x, sum over H, W of grad), each (B, C, 1, 1), in one pass."""
    _check(grad, x)
    batch, channels, height, width = x.shape
    sum_gx = x.new_empty(batch, channels)
    sum_g = x.new_empty(batch, channels)
    pointers = [native.pointer(t) for t in (grad, x, sum_gx, sum_g)]
    native.run(
        LIBRARY,
        "overlock_grn_backward_sums",
        native.image_ranges(batch, native.workers()),
        (*pointers, height * width, channels),
    )
    return sum_gx.view(batch, channels, 1, 1), sum_g.view(batch, channels, 1, 1)


def input_grad(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor, *, overwrite: bool = False
) -> torch.Tensor:
    """grad * scale + x * coef with scale and coef (B, C, 1, 1) (or broadcastable to it), channels_last.

    `overwrite=True` writes the result over `grad` and returns it (the caller promises that nothing
    else reads `grad`): no second map of the hidden width while the MLP's backward runs.
    """
    _check(grad, x)
    batch, channels, height, width = x.shape
    scale = scale.expand(batch, channels, 1, 1).contiguous()
    coef = coef.expand(batch, channels, 1, 1).to(x.dtype).contiguous()
    out = grad if overwrite else torch.empty_like(x, memory_format=torch.channels_last)
    pointers = [native.pointer(t) for t in (grad, x, scale, coef, out)]
    native.run(
        LIBRARY,
        "overlock_grn_input_grad",
        native.image_ranges(batch, native.workers()),
        (*pointers, height * width, channels),
    )
    return out
