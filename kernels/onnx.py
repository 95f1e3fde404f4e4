"""Decompositions of overlock's custom ops into plain aten ops, for exporters that need them.

`overlock::contmix` and `overlock::aggregate` are opaque to torch.export (which is the point: the
graph dispatches to the fast backends at run time). ONNX has no such operator, so before an
exported program is translated to ONNX, `overlock.export` replaces every node of these ops with
the reference implementation written out in aten ops: gathers of the clamped windows, a softmax
and a weighted sum. Their sizes come from the tensors, so the decomposed graph serves every input
size the exported program does. The reference is the obviously-correct implementation every
backend is tested against, so the ONNX graph computes what the eager model computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import ops, reference  # ops registers torch.ops.overlock.*


def contmix(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`overlock::contmix` in aten ops: (output, log-sum-exp), the op's two outputs."""
    del backend  # the decomposition is the backend
    return reference.contmix_forward(logits, rpb, value, kernel_size)


def aggregate(probs: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str) -> torch.Tensor:
    """`overlock::aggregate` in aten ops."""
    del backend
    return reference.aggregate(probs, value, kernel_size)


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The table for `ExportedProgram.run_decompositions`: torch's defaults plus overlock's ops."""
    assert ops.contmix_op is not None  # imported for its registration
    table = torch.export.default_decompositions()
    table[torch.ops.overlock.contmix.default] = contmix
    table[torch.ops.overlock.aggregate.default] = aggregate
    return table
