"""The reference's fallback without a neighbourhood-attention extension ("unfold" backend): a baseline to measure against, not to use.

The authors' code, when its neighbourhood-attention extension is missing, unfolds the *valid* K x K windows of the value map with
`F.unfold` (no padding: (H-K+1) x (W-K+1) windows), then replicate-pads the unfolded tensor by K//2
on each side, which hands every border position the window of its nearest valid neighbour: exactly
the clamped windows of ARCHITECTURE.md section 5. It materialises K*K copies of the values and keeps
the probability map and those copies for autograd. It runs with plain autograd (no custom op, no
recompute), as the authors' code does, so that benchmarks compare against the real thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference


def aggregate(probs: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """NA(probs, value) through F.unfold + replicate padding (differentiable by autograd)."""
    batch, heads, height, width, channels = value.shape
    k = kernel_size
    dtype = reference.compute_dtype(probs, value)
    planes = value.to(dtype).permute(0, 1, 4, 2, 3).reshape(batch, heads * channels, height, width)
    windows = F.unfold(planes, k)  # (B, h*c*K*K, (H-K+1)*(W-K+1))
    windows = windows.reshape(batch, heads * channels * k * k, height - k + 1, width - k + 1)
    windows = F.pad(windows, (k // 2,) * 4, mode="replicate")  # (B, h*c*K*K, H, W)
    windows = windows.reshape(batch, heads, channels, k * k, height, width)
    weights = probs.to(dtype).permute(0, 1, 4, 2, 3).unsqueeze(2)  # (B, h, 1, K*K, H, W)
    out = (windows * weights).sum(3)  # (B, h, c, H, W)
    return out.permute(0, 1, 3, 4, 2).to(value.dtype)


def contmix(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """softmax(logits + rpb) as a full probability map, then the unfold aggregation."""
    return aggregate(reference.probabilities(logits, rpb, kernel_size), value, kernel_size)
