"""The OverLoCK training loss: CE(main) + aux_weight * CE(aux) (ARCHITECTURE.md section 7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ModelOutput = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class LossParts:
    """The total loss (what is back-propagated) and its parts (what is logged)."""

    total: torch.Tensor
    main: torch.Tensor
    aux: torch.Tensor | None
    logits: torch.Tensor


class OverlockLoss(nn.Module):
    """Label-smoothed cross-entropy on the main head, plus the auxiliary head's when present.

    The model returns a dict {"main", "aux"} in training mode when its spec has an aux head, and
    plain logits otherwise (or in eval mode); both shapes are accepted so the same loss also
    scores validation batches.
    """

    def __init__(self, aux_weight: float = 0.4, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.aux_weight, self.label_smoothing = aux_weight, label_smoothing

    def forward(self, output: ModelOutput, target: torch.Tensor) -> LossParts:
        logits = output["main"] if isinstance(output, dict) else output
        main = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        aux_logits = output.get("aux") if isinstance(output, dict) else None
        if aux_logits is None:
            return LossParts(main, main.detach(), None, logits)
        aux = F.cross_entropy(aux_logits.float(), target, label_smoothing=self.label_smoothing)
        return LossParts(main + self.aux_weight * aux, main.detach(), aux.detach(), logits)
