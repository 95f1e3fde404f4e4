"""Validation: top-1, top-5 and loss over a data split, exact across processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Dist


@dataclass
class EvalResult:
    """Metrics over all images of a split (summed over ranks before dividing)."""

    loss: float
    top1: float
    top5: float
    images: int

    def as_dict(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1, f"{prefix}top5": self.top5}


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CPU (no loss scaling needed), float16 on CUDA; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    dist: Dist,
    amp: bool = False,
) -> EvalResult:
    """Plain (unsmoothed) cross-entropy and top-k accuracy of `model` in eval mode.

    `model` may be a compiled wrapper; the caller switches the underlying module to eval mode.
    """
    loss_sum, top1, top5, count = 0.0, 0.0, 0.0, 0.0
    for images, labels in batches:
        images = images.to(dist.device, non_blocking=True)
        labels = labels.to(dist.device, non_blocking=True)
        with autocast(dist.device, amp):
            output = model(images)
        logits = (output["main"] if isinstance(output, dict) else output).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    loss_sum, top1, top5, count = dist.all_sum([loss_sum, top1, top5, count])
    count = max(count, 1.0)
    return EvalResult(loss=loss_sum / count, top1=top1 / count, top5=top5 / count, images=int(count))
