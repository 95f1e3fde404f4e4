"""Exponential moving average of the weights (the reference trains with EMA 0.9999).

The decay warms up as min(decay, (1 + n) / (10 + n)) over the n updates so far: with a fixed
0.999+ decay a short run's EMA would still be mostly the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A frozen copy of a model whose floating-point state follows the live one."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(live[name].detach(), 1.0 - decay)
            else:
                value.copy_(live[name])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
