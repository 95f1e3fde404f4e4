"""AdamW with the OverLoCK parameter groups: weight decay only where it regularises.

Norm weights, biases, layer scales and relative position biases get no decay: shrinking them
toward zero changes what the network computes instead of limiting its capacity. The model says
which parameters those are (`model.no_weight_decay()`); a module without that method falls back
to "every parameter with fewer than two dimensions", which covers norms and biases.
"""

from __future__ import annotations

import torch
from torch import nn


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that must not be decayed."""
    if hasattr(model, "no_weight_decay"):
        return set(model.no_weight_decay())
    return {name for name, param in model.named_parameters() if param.ndim <= 1}


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with two groups: decayed weights first, then the no-decay set (weight_decay=0)."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
