"""`overlock compare`: one row per spec (parameters, inference parameters, FLOPs; optionally
measured speed and memory, and the best validation top-1 of a short training run).

The rows are plain dicts (JSON-ready) so that `sweep` can store one per variant and resume, and
the CLI only renders them. `pareto_front` and `plot` draw the trade-off the rows describe.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import archspec
from ..errors import OverlockError, is_out_of_memory

#: Classes used to measure a spec whose head.num_classes is open (null): ImageNet's.
OPEN_CLASSES = 1000


@dataclass(frozen=True)
class TrainSettings:
    """The same short training run for every spec: `--train DATA --epochs N` (and a few knobs).
    `steps` (optimizer steps) replaces `epochs` where given: budgets shorter than an epoch."""

    data: str
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32
    img_size: int | None = None
    seed: int = 0

    def options(self, source: str, overrides: list[str]) -> dict[str, Any]:
        """Options for `training.runner.train` (the same dict `overlock train` builds)."""
        return {
            "spec": source,
            "overrides": list(overrides),
            "data": self.data,
            "epochs": None if self.steps else self.epochs,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "img_size": self.img_size,
            "seed": self.seed,
            "device": "cpu" if not torch.cuda.is_available() else "auto",
        }


def measurable(spec: archspec.Spec) -> archspec.Spec:
    """The spec with an open class count filled in (OPEN_CLASSES), so that it can be built."""
    if spec.head.num_classes is None:
        return archspec.load(spec, [f"head.num_classes={OPEN_CLASSES}"])
    return spec


def static_row(spec: archspec.Spec, input_size: tuple[int, int]) -> dict[str, Any]:
    """Parameters (training form, aux head included), inference parameters and FLOPs of the
    deploy form at `input_size`: what a paper's table reports."""
    from ..builder import build, inference_params
    from ..builder.flops import count_flops
    from ..builder.summary import count_params

    spec = measurable(spec)
    model = build(spec)
    params = count_params(model)
    deployed = model.reparameterize()
    try:
        flops = count_flops(deployed, input_size).total
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OverlockError(
            f"{spec.name}: not enough memory to trace at {input_size[0]}x{input_size[1]}; give a smaller --input-size"
        ) from None
    return {
        "name": spec.name,
        "topology": spec.topology,
        "params": params,
        "inference_params": inference_params(spec),
        "flops": flops,
        "input_size": list(input_size),
    }


def measure(
    model: torch.nn.Module, input_size: tuple[int, int], batch: int = 8, reps: int = 3, threads: int | None = None
) -> dict[str, Any]:
    """Inference images/s (median) and peak memory of the eval forward: `overlock bench`'s measurement
    (`threads`: intra-op threads while timing; None keeps torch's setting)."""
    from ..bench import BenchSettings, bench

    device = next(model.parameters()).device.type
    settings = BenchSettings(
        batch_size=batch, img_size=tuple(input_size), device=device, warmup=1, reps=reps, threads=threads
    )
    result = bench(model, settings, name=getattr(model.spec, "name", "") or "")
    return {
        "images_per_s": result.images_per_s,
        "peak_memory_mib": result.peak_memory_mib,
        "memory_kind": result.peak_memory_method,
        "batch": batch,
    }


def measured_row(spec: archspec.Spec, input_size: tuple[int, int], batch: int = 8) -> dict[str, Any]:
    """`measure` on the deploy form (what would be shipped)."""
    from ..builder import build

    model = build(measurable(spec), deploy=True)
    if torch.cuda.is_available():
        model = model.cuda()
    return measure(model, input_size, batch=batch)


def check_trainable(runs: list[tuple[str, str, list[str]]], settings: TrainSettings) -> None:
    """Check every (label, source, overrides) as `overlock train` would before its first step (options,
    data, class count, input channels, batch size against the training set, memory at the image size),
    so that a spec that cannot train fails in seconds, before the first of the others has trained.
    The data is read once per (source, image size, channels), not once per spec."""
    from ..training.config import TrainConfig, validated
    from ..training.data import load_data
    from ..training.distributed import Dist, pick_device
    from ..training.setup import plan_training

    loaded: dict[tuple, Any] = {}
    for label, source, overrides in runs:
        try:
            config = validated(TrainConfig, settings.options(source, overrides))
            key = (config.data, config.img_size, config.channels)
            if key not in loaded:
                loaded[key] = load_data(*key)
            plan_training(config, Dist(device=pick_device(config.device)), data=loaded[key])
        except OverlockError as exc:
            raise type(exc)(f"cannot train {label} (nothing was trained): {exc}") from None


def trained_row(source: str, overrides: list[str], settings: TrainSettings, out: Path) -> dict[str, Any]:
    """Train through `training.runner.train` (its output kept in `out`/train.log); best val top-1."""
    from rich.console import Console

    from ..checkpoint import write_atomic
    from ..training.runner import train

    log = io.StringIO()
    result = train(settings.options(source, overrides), out=out, overwrite=True, console=Console(file=log, width=120))
    write_atomic(out / "train.log", lambda handle: handle.write(log.getvalue().encode("utf-8")))
    if not result.outcome.finished:
        # Ctrl-C stops `train` at a step boundary and it returns normally; a row from half a run
        # would be stored as finished (and reused on resume), so stop here as an interrupt.
        raise KeyboardInterrupt
    return {
        "top1": result.best_top1,
        "best_epoch": result.best_epoch,
        "epochs": settings.epochs,
        "steps": settings.steps,
        "data": settings.data,
        "run_dir": str(out),
    }


def compare_one(
    source: str,
    overrides: list[str],
    input_size: tuple[int, int],
    *,
    measure_speed: bool = False,
    train: TrainSettings | None = None,
    train_dir: Path | None = None,
) -> dict[str, Any]:
    """One row of the table for `source` + `overrides` (validated here: SpecError if invalid)."""
    spec = archspec.load(source, overrides)
    row = {"source": source, "overrides": list(overrides), **static_row(spec, input_size)}
    if measure_speed:
        row.update(measured_row(spec, input_size))
    if train is not None:
        if train_dir is None:
            raise ValueError("train_dir is needed with train")
        row.update(trained_row(source, overrides, train, train_dir))
    return row


# ---------------------------------------------------------------------------------------------
# Trade-off: Pareto front and plot

#: Column -> True if larger is better.
BETTER_LARGER = {"top1": True, "images_per_s": True, "flops": False, "params": False, "inference_params": False}
LABELS = {
    "flops": "GFLOPs",
    "images_per_s": "images/s",
    "top1": "best val top-1 (%)",
    "params": "parameters (M)",
    "inference_params": "inference parameters (M)",
}
SCALE = {"flops": 1e-9, "params": 1e-6, "inference_params": 1e-6, "top1": 100.0, "images_per_s": 1.0}


def pareto_front(points: list[tuple[float, float]], x_larger: bool, y_larger: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (ties on both are kept)."""

    def at_least(a: float, b: float, larger: bool) -> bool:
        return a >= b if larger else a <= b

    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            at_least(ox, x, x_larger) and at_least(oy, y, y_larger) and (ox, oy) != (x, y)
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def plot_axes(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """x: measured images/s if every row has it, else FLOPs; y: top-1 if every row has it, else params."""
    x = "images_per_s" if rows and all("images_per_s" in r for r in rows) else "flops"
    y = "top1" if rows and all("top1" in r for r in rows) else "params"
    return x, y


def plot(rows: list[dict[str, Any]], output: Path, labels: list[str] | None = None) -> tuple[str, str, list[int]]:
    """Scatter of the rows (see `plot_axes`), each point labelled, the Pareto front joined and marked."""
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in ("png", "svg", "pdf"):
        raise OverlockError(f"--plot {output}: give a file ending in .png, .svg or .pdf")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import write_atomic

    xk, yk = plot_axes(rows)
    if labels is None:
        names = [r["name"] or r["source"] for r in rows]
        labels = names if len(set(names)) == len(names) else [r["source"] for r in rows]
    scale, names = dict(SCALE), dict(LABELS)
    if all(r["flops"] < 1e9 for r in rows):  # small inputs (a 32 px sweep): MFLOPs, not 0.00x GFLOPs
        scale["flops"], names["flops"] = 1e-6, "MFLOPs"
    points = [(r[xk] * scale[xk], r[yk] * scale[yk]) for r in rows]
    front = pareto_front(points, BETTER_LARGER[xk], BETTER_LARGER[yk])
    fig, ax = plt.subplots(figsize=(7, 4.8))
    others = [p for i, p in enumerate(points) if i not in front]
    if others:
        ax.scatter(*zip(*others, strict=True), color="#6d9eeb", s=28, label="variant", zorder=2)
    best = sorted((points[i] for i in front), key=lambda p: p[0])
    ax.scatter(*zip(*best, strict=True), color="#cc0000", s=46, marker="D", label="Pareto front", zorder=3)
    ax.plot(*zip(*best, strict=True), color="#cc0000", lw=1.2, ls="--", zorder=1)
    # Many points: the front gets full labels, the others their row number (the table's #), so that
    # labels do not pile up; every point stays identifiable.
    crowded = len(points) > 8
    for i, ((x, y), text) in enumerate(zip(points, labels, strict=True)):
        shown = f"{i + 1}: {text}" if i in front else str(i + 1) if crowded else text
        on_front = i in front  # below-right and red: clear of the numbers above the points
        note = ax.annotate(
            shown,
            (x, y),
            textcoords="offset points",
            xytext=(6, -11) if on_front else (3, 4),
            fontsize=7,
            color="#cc0000" if on_front else "black",
        )
        note.set_in_layout(False)
    ax.set_xlabel(names[xk] + (" (higher is better)" if BETTER_LARGER[xk] else " (lower is better)"))
    ax.set_ylabel(names[yk] + (" (higher is better)" if BETTER_LARGER[yk] else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(output, lambda handle: fig.savefig(handle, format=suffix, dpi=100))
    plt.close(fig)
    return xk, yk, front


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns every row can fill, in a fixed order."""
    columns = ["name", "params", "inference_params", "flops"]
    for optional in ("images_per_s", "peak_memory_mib", "top1"):
        if any(optional in r for r in rows):
            columns.append(optional)
    return columns


def format_cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("params", "inference_params"):
        return f"{value / 1e6:.3f}M"
    if column == "flops":
        return f"{value / 1e9:.3f}G"
    if column == "images_per_s":
        return f"{value:,.1f}"
    if column == "peak_memory_mib":
        return f"{value:,.0f} MiB"
    if column == "top1":
        return f"{100 * value:.2f}%"
    return str(value)


CSV_COLUMNS = [
    "name",
    "source",
    "overrides",
    "topology",
    "params",
    "inference_params",
    "flops",
    "input_size",
    "images_per_s",
    "peak_memory_mib",
    "top1",
    "best_epoch",
    "epochs",
    "data",
]


def to_csv(rows: list[dict[str, Any]]) -> str:
    import csv

    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        flat["overrides"] = " ".join(row.get("overrides", []))
        flat["input_size"] = "x".join(map(str, row.get("input_size", [])))
        writer.writerow(flat)
    return handle.getvalue()
