"""AdamW with the OverLoCK parameter groups: weight decay only where it regularises.

Norm weights, biases, layer scales and relative position biases get no decay: shrinking them
toward zero changes what the network computes instead of limiting its capacity. The model says
which parameters those are (`model.no_weight_decay()`); a module without that method falls back
to "every parameter with fewer than two dimensions", which covers norms and biases.

Where every parameter lives on a device with PyTorch's fused AdamW kernel (CPU, CUDA), the
optimizer is the fused one: one pass over each parameter instead of a dozen element-wise ops,
the same update (float rounding aside). On the CPU, where PyTorch's default is its per-parameter
loop, that is several times faster, a few percent of a training step (`python
benchmarks/optimizer.py`; benchmarks/results/issue10_speed.md, round 9).
"""

from __future__ import annotations

import torch
from torch import nn


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that must not be decayed."""
    if hasattr(model, "no_weight_decay"):
        return set(model.no_weight_decay())
    return {name for name, param in model.named_parameters() if param.ndim <= 1}


# Devices with a fused AdamW kernel in every torch this project supports.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def fused_adamw_applies(params: list[torch.Tensor]) -> bool:
    """Whether `torch.optim.AdamW(..., fused=True)` takes these parameters: floating point, on one
    device type that has the kernel."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= set(FUSED_ADAMW_DEVICES) and all(p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with two groups: decayed weights first, then the no-decay set (weight_decay=0);
    fused where the parameters' device has the kernel."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    fused = fused_adamw_applies(decay + no_decay) or None  # None: PyTorch's own default
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


# The options that pick how the update is computed, not what it is.
IMPLEMENTATION_OPTIONS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping this optimizer's implementation.

    A checkpoint's param groups carry the implementation they were saved with (a run begun with
    the per-parameter loop, or on a device with another kernel); loading them as they are would
    switch a resumed run to it. The implementation is this machine's choice, so the groups get the
    optimizer's own before loading (which also moves the step counters where that one keeps them).
    """
    own = {key: optimizer.defaults[key] for key in IMPLEMENTATION_OPTIONS if key in optimizer.defaults}
    groups = [{**group, **own} for group in state["param_groups"]]
    optimizer.load_state_dict({**state, "param_groups": groups})
