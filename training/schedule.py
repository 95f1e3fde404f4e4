"""Learning-rate schedule: linear warm-up, then cosine decay, evaluated per optimizer step.

A pure function of the step number rather than a stateful torch scheduler: resuming only needs
the step counter, and the value at any step can be tested directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """lr(step) for `total_steps` steps: ramps to `peak_lr` over `warmup_steps`, then cosine to `min_lr`.

    Warm-up starts at peak_lr / warmup_steps (never at 0, which would waste the first step) and
    reaches `peak_lr` at step `warmup_steps - 1`; the cosine then runs from `peak_lr` at step
    `warmup_steps` to `min_lr` at step `total_steps` (one past the last step).
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0:
            return self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
