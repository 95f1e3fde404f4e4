"""FLOP counting with fvcore (one fused multiply-add = one FLOP), ContMix included.

fvcore traces the model with the JIT and counts known ops. ContMix runs as one opaque
`overlock::contmix` node (see kernels/ops.py), so it gets its own handle here: the aggregation
costs B*heads*H*W*K*K*c, as the reference figures count it. The softmax and the bias gather are
not counted (fvcore counts no element-wise ops either).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from .network import OverLoCK


def contmix_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """overlock::contmix(logits, rpb, value, K, backend): B*heads*H*W*K*K multiply-adds per value channel."""
    logits, value = get_shape(inputs[0]), get_shape(inputs[2])
    return Counter({"contmix": prod(logits) * value[-1]})


def aggregate_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """overlock::aggregate(probs, value, K, backend): same count as the fused op."""
    probs, value = get_shape(inputs[0]), get_shape(inputs[1])
    return Counter({"contmix": prod(probs) * value[-1]})


def neighborhood_attention_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """overlock::neighborhood_attention(q, k, v, rpb, K, backend): q . k and a . v, K*K*c multiply-adds each per position."""
    query, value, kernel_size = get_shape(inputs[0]), get_shape(inputs[2]), inputs[4].toIValue()
    positions = prod(value[:4]) * kernel_size * kernel_size
    return Counter({"neighborhood_attention": positions * (query[-1] + value[-1])})


def attention_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """aten::scaled_dot_product_attention(q (..., L, E), k (..., S, E), v (..., S, Ev)): L*S*(E + Ev) per batch entry.

    fvcore has no handle for it; window attention (builder/mixers_attention.py) runs through it.
    """
    query, key, value = (get_shape(inputs[i]) for i in range(3))
    return Counter({"scaled_dot_product_attention": prod(query[:-1]) * key[-2] * (query[-1] + value[-1])})


OVERLOCK_HANDLES = {
    "aten::scaled_dot_product_attention": attention_flop_jit,
    "overlock::contmix": contmix_flop_jit,
    "overlock::aggregate": aggregate_flop_jit,
    "overlock::neighborhood_attention": neighborhood_attention_flop_jit,
}


@dataclass
class FlopReport:
    total: int
    by_module: dict[str, int]
    by_operator: dict[str, int]
    input_size: tuple[int, int]


def count_flops(model: OverLoCK, input_size: tuple[int, int] = (224, 224), batch: int = 1) -> FlopReport:
    """FLOPs of one eval-mode forward pass at `input_size` (H, W)."""
    was_training = model.training
    model.eval()
    image = torch.zeros(batch, model.spec.in_channels, *input_size)
    analysis = FlopCountAnalysis(model, image)
    for name, handle in OVERLOCK_HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    try:
        with warnings.catch_warnings():  # fvcore traces with torch.jit, which now warns on every use
            warnings.simplefilter("ignore", DeprecationWarning)
            total = int(analysis.total())
        report = FlopReport(total, dict(analysis.by_module()), dict(analysis.by_operator()), input_size)
    finally:
        model.train(was_training)
    return report
