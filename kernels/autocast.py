"""Autocast's cast, done once by hand where overlock's code knows better than per-op casting."""

from __future__ import annotations

import torch


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype where autocast is on for x's device, else x itself (as autocast casts a
    conv's inputs: float32, float16 and bfloat16; float64 stays).

    Two uses: a custom op, which autocast does not cast, casts its inputs as the op it replaces
    would be (kernels/depthwise.py); and a map that only convolutions and matrix products read is
    cast once where it is made (builder/layers.py). Each of those ops would cast it afresh and keep
    its own copy for the backward, where overlock's recomputation of the float32 map does not see
    it; cast once, they read and keep the map itself. The same values reach them either way.
    """
    device = x.device.type
    if x.is_meta:  # shapes only (memory estimates); autocast has no meta device and raises on asking
        return x
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x
