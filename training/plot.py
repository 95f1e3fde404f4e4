"""The run's PNG of loss and accuracy curves (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step and per epoch, validation loss, train/validation accuracy per epoch.

    The x axis is epochs (fractional for steps), so step and epoch curves share it.
    """
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    if steps:
        ax_loss.plot(
            [r["epoch_progress"] for r in steps],
            [r["loss"] for r in steps],
            color="tab:blue",
            alpha=0.3,
            lw=0.8,
            label="train loss (step)",
        )
    if epochs:
        x = [r["epoch"] for r in epochs]
        ax_loss.plot(x, [r["train_loss"] for r in epochs], "o-", color="tab:blue", label="train loss (epoch)")
        ax_loss.plot(x, [r["val_loss"] for r in epochs], "s-", color="tab:orange", label="val loss")
        ax_acc.plot(x, [100 * r["train_acc"] for r in epochs], "o-", color="tab:blue", label="train top-1")
        ax_acc.plot(x, [100 * r["val_top1"] for r in epochs], "s-", color="tab:orange", label="val top-1")
        if any("ema_val_top1" in r for r in epochs):
            ema = [(r["epoch"], 100 * r["ema_val_top1"]) for r in epochs if "ema_val_top1" in r]
            ax_acc.plot(*zip(*ema, strict=True), "^-", color="tab:green", label="EMA val top-1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
