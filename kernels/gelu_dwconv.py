"""GELU -> 3x3 depthwise conv (+ bias) -> each map's sum of squares: the middle of ConvMLP in one pass.

Why. In every OverLoCK MLP (fc1 -> GELU -> dwconv3x3 -> GRN -> fc2) the three middle steps are
element-wise or nearly so, on the widest map of the block (4x the block's channels), so on the
CPU they cost as much as the two 1x1 convs around them: PyTorch makes one pass over the map per
step (GELU, the conv, GRN's energy) and, in the backward, one per step again plus GELU's
recomputation. `kernels/csrc/gelu_dwconv.c` does the forward in one pass (the GELU of each row is
computed once into a three-row ring that the conv reads) and the backward in one (GELU and its
derivative recomputed row by row from the saved input, so nothing else is kept). At inference
`gelu_dwconv3x3_grn` also applies GRN, rescaling each image while it is still in cache. It runs on
channels_last float32 CPU maps when the C library could be built (`kernels.native`); everything
else, and the tests' reference, is `reference`, the PyTorch composition.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import native

LIBRARY = "gelu_dwconv"


def reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv(GELU(hidden)), sum over H, W of its square as (B, C, 1, 1)), in PyTorch ops."""
    out = F.conv2d(F.gelu(hidden), weight, bias, padding=1, groups=hidden.shape[1])
    return out, out.square().sum(dim=(-1, -2), keepdim=True)


def native_applies(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the compiled kernel takes these tensors: CPU float32, channels_last hidden map, a (C, 1, 3, 3) kernel."""
    tensors = [hidden, weight] + ([bias] if bias is not None else [])
    return (
        hidden.dim() == 4
        and hidden.numel() > 0
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.is_meta for t in tensors)
        and hidden.is_contiguous(memory_format=torch.channels_last)
        and tuple(weight.shape) == (hidden.shape[1], 1, 3, 3)
        and native.library(LIBRARY) is not None
    )


def gelu_dwconv3x3(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, gradient_over_input: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """conv2d(GELU(hidden), weight, bias, padding=1, groups=C) and its (B, C, 1, 1) sums of squares.

    The sums carry no gradient (GRN, their user, differentiates through its own input). The
    compiled kernel where `native_applies`, else `reference`.

    `gradient_over_input=True`: the backward writes hidden's gradient over the hidden map it gets
    back from the graph, where each thread's share is whole images. For a caller whose saved
    `hidden` is a recomputation (`layers.recompute_saved`) that nothing reads after this op's
    backward: one map of the MLP's hidden width fewer while its backward runs.
    """
    if not native_applies(hidden, weight, bias):
        return reference(hidden, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        return _GeluDWConv.apply(hidden, weight, bias, gradient_over_input)
    return _forward(hidden, weight, bias)


def gelu_dwconv3x3_grn(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    floor: float,
    eps: float,
    *,
    overwrite: bool = False,
) -> torch.Tensor:
    """GRN(conv2d(GELU(hidden), weight, bias, padding=1, groups=C)) with GRN's gamma and beta, for inference.

    GRN: e = sqrt(max(sum over H, W of the square, floor)), out * (1 + gamma * e / (mean_C e + eps)) + beta.
    Each image is rescaled in place right after the kernel writes it, while it is in cache: one
    pass over the batch's map and one output buffer fewer than the op followed by GRN (224 x 56x56
    maps, batch 8: about 1.6x). No gradient: where one is needed, `gelu_dwconv3x3` and the GRN module.

    `overwrite=True` writes the result over `hidden` and returns it (the caller promises that
    nothing else reads `hidden`): output row y is written after input row y + 1 was read into the
    kernel's ring, so no input is overwritten before it is used. No output buffer to allocate and
    fault in (the 22 MiB maps of XT's first stage: 14 -> 7 ms a call, batch 8).
    """
    if not native_applies(hidden, weight, bias):
        raise ValueError(f"gelu_dwconv3x3_grn needs what the compiled kernel takes ({native.status(LIBRARY)})")
    batch, channels, rows, cols = hidden.shape
    taps = _taps(weight)
    shift = bias.detach().contiguous() if bias is not None else hidden.new_zeros(channels)
    gamma, beta = (t.detach().reshape(channels).to(torch.float32).contiguous() for t in (gamma, beta))
    out = hidden if overwrite else torch.empty_like(hidden, memory_format=torch.channels_last)
    pointers = [native.pointer(t) for t in (hidden, taps, shift, gamma, beta, out)]
    native.run(
        LIBRARY,
        "overlock_gelu_dwconv3x3_grn_forward",
        native.image_ranges(batch, native.workers()),
        (*pointers, rows, cols, channels, floor, eps),
    )
    return out


def _tasks(batch: int, rows: int, workers: int) -> list[tuple[int, int, int, int]]:
    """(first image, end image, first row, end row) per call: whole images when there are enough of
    them for every worker, else each image's rows split so that every worker gets some."""
    if batch >= workers:
        return [(a, b, 0, rows) for a, b in native.image_ranges(batch, workers)]
    parts = min(rows, -(-workers // batch))
    edges = [rows * i // parts for i in range(parts + 1)]
    return [(image, image + 1, a, b) for image in range(batch) for a, b in itertools.pairwise(edges) if b > a]


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, 3, 3) -> (9, C): tap-major, channels innermost, as the C kernel reads them."""
    return weight.detach().reshape(weight.shape[0], 9).t().contiguous()


def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    batch, channels, rows, cols = hidden.shape
    taps = _taps(weight)
    shift = bias.detach().contiguous() if bias is not None else hidden.new_zeros(channels)
    out = torch.empty_like(hidden, memory_format=torch.channels_last)
    tasks = _tasks(batch, rows, native.workers())
    squares = hidden.new_zeros(len(tasks), batch, channels)
    pointers = [native.pointer(hidden), native.pointer(taps), native.pointer(shift), native.pointer(out)]
    native.run(
        LIBRARY,
        "overlock_gelu_dwconv3x3_forward",
        tasks,
        (*pointers, native.pointer(squares), squares.stride(0), rows, cols, channels),
    )
    return out, squares.sum(dim=0).view(batch, channels, 1, 1)


class _GeluDWConv(torch.autograd.Function):
    """Saves the GELU's input and the kernel only; the backward recomputes GELU and GELU' per row."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, gradient_over_input):
        out, squares = _forward(hidden, weight, bias)
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        ctx.gradient_over_input = gradient_over_input
        ctx.mark_non_differentiable(squares)
        return out, squares

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        hidden, weight = ctx.saved_tensors
        batch, channels, rows, cols = hidden.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        tasks = _tasks(batch, rows, native.workers())
        # (a call that covers part of an image reads rows another call may already have written)
        whole_images = all(first == 0 and end == rows for _, _, first, end in tasks)
        if ctx.gradient_over_input and whole_images and hidden.is_contiguous(memory_format=torch.channels_last):
            grad_hidden = hidden
        else:
            grad_hidden = torch.empty_like(hidden, memory_format=torch.channels_last)
        taps = _taps(weight)  # held here: the C call reads it through a raw pointer
        grad_taps = hidden.new_zeros(len(tasks), 9, channels)
        grad_bias = hidden.new_zeros(len(tasks), channels)
        pointers = [native.pointer(hidden), native.pointer(grad), native.pointer(taps), native.pointer(grad_hidden)]
        native.run(
            LIBRARY,
            "overlock_gelu_dwconv3x3_backward",
            tasks,
            (
                *pointers,
                native.pointer(grad_taps),
                grad_taps.stride(0),
                native.pointer(grad_bias),
                grad_bias.stride(0),
                rows,
                cols,
                channels,
            ),
        )
        grad_weight = grad_taps.sum(dim=0).t().reshape(weight.shape)
        return grad_hidden, grad_weight, grad_bias.sum(dim=0) if ctx.has_bias else None, None
