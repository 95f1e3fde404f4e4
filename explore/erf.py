"""`overlock erf`: the effective receptive field of a stage, as the paper measures it (Figure 2,
after RepLKNet): the gradient of the centre position of the stage's output, summed over its
channels, with respect to the input image; absolute values summed over the input channels and
averaged over N images. Works with random weights, to compare architectures at init.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import OverlockError

THRESHOLDS = (0.2, 0.5, 0.9)


@dataclass
class ERF:
    layer: str
    input_size: tuple[int, int]
    images: int
    map: np.ndarray  # (H, W), mean |d centre / d input|
    square: dict[float, float]  # threshold -> area share of the smallest centred square holding that share
    pixels: dict[float, float]  # threshold -> area share of the fewest pixels holding that share

    def as_json(self) -> dict:
        return {
            "layer": self.layer,
            "input_size": list(self.input_size),
            "images": self.images,
            "area_share_square": {f"{t:g}": v for t, v in self.square.items()},
            "area_share_pixels": {f"{t:g}": v for t, v in self.pixels.items()},
        }


def layers(model: torch.nn.Module) -> list[str]:
    """Stage paths whose output can be measured ('base.stages.0', 'overview', 'focus.stages.1', 'stages.2')."""
    return [path for path, _, _ in model.spec.stages_in_order()]


def contribution_map(model: torch.nn.Module, layer: str, images: torch.Tensor, batch: int = 4) -> np.ndarray:
    """Mean over images of |d (sum over channels of the stage output at its centre) / d input|, summed over input channels."""
    known = layers(model)
    if layer not in known:
        raise OverlockError(f"--layer {layer!r} is not a stage of {model.spec.name}; valid: {', '.join(known)}")
    module = model.get_submodule(layer)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = module.register_forward_hook(hook)
    model.eval()  # BN uses its running statistics: one image's gradient does not depend on the others
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    try:
        for chunk in images.split(batch):
            x = chunk.clone().requires_grad_(True)
            captured.clear()
            model.forward_features(x)
            out = captured[-1]  # a stage that runs twice (feedback) is measured at its last run
            h, w = out.shape[-2:]
            out[:, :, h // 2, w // 2].sum().backward()
            total += x.grad.abs().sum(dim=1).sum(dim=0).double()
    finally:
        handle.remove()
    return (total / images.shape[0]).numpy()


def square_shares(scores: np.ndarray, thresholds=THRESHOLDS) -> dict[float, float]:
    """For each threshold t: the area (as a share of the image) of the smallest square centred on
    the image centre whose scores sum to at least t of the total (RepLKNet's high-contribution ratio)."""
    h, w = scores.shape
    total = scores.sum()
    cy, cx = h // 2, w // 2
    shares = {}
    for t in thresholds:
        share = 1.0
        for r in range(max(h, w)):
            window = scores[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1]
            if total <= 0 or window.sum() >= t * total:
                share = window.size / scores.size
                break
        shares[t] = share
    return shares


def pixel_shares(scores: np.ndarray, thresholds=THRESHOLDS) -> dict[float, float]:
    """For each threshold t: the fewest pixels (largest first) holding t of the total, as a share of the image."""
    flat = np.sort(scores.ravel())[::-1]
    cumulative = np.cumsum(flat)
    total = cumulative[-1]
    out = {}
    for t in thresholds:
        count = int(np.searchsorted(cumulative, t * total) + 1) if total > 0 else flat.size
        out[t] = min(count, flat.size) / flat.size
    return out


def input_images(source: str | None, count: int, size: tuple[int, int], channels: int, seed: int = 0) -> torch.Tensor:
    """N images: the first N of a data source's validation split (as `overlock eval` sees them), or
    standard-normal noise (what a normalised image looks like to the network) without a source."""
    if source is None:
        return torch.randn(count, channels, *size, generator=torch.Generator().manual_seed(seed))
    if size[0] != size[1]:
        raise OverlockError("--data gives square images; give a square --input-size with --data")
    from ..training.data import EvalView, load_data

    data = load_data(source, size[0], channels)
    view = EvalView(data.val, data.eval_transform)
    if len(view) < count:
        raise OverlockError(f"--images {count}: the validation split of {source} has only {len(view)} images")
    return torch.stack([view[i][0] for i in range(count)])


def measure_erf(model: torch.nn.Module, layer: str, images: torch.Tensor) -> ERF:
    scores = contribution_map(model, layer, images)
    return ERF(layer, tuple(images.shape[-2:]), images.shape[0], scores, square_shares(scores), pixel_shares(scores))


def plot_erf(erf: ERF, output: Path, title: str) -> None:
    """The map as a log-scaled heatmap: log10 of the map over its maximum, colours over its own range."""
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in ("png", "svg", "pdf"):
        raise OverlockError(f"-o {output}: give a file ending in .png, .svg or .pdf")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import write_atomic

    scores = erf.map / max(erf.map.max(), 1e-30)
    shown = np.log10(scores + 1e-6)  # log scale: the long tail a large kernel leaves stays visible
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    # colours span this map's own range (as in the paper's figure), at most six decades
    image = ax.imshow(shown, cmap="RdYlGn", vmin=max(float(shown.min()), -6.0), vmax=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="log10 contribution (max = 0)")
    shares = " / ".join(f"{100 * v:.1f}" for v in erf.square.values())
    held = "/".join(f"{int(100 * t)}" for t in erf.square)
    ax.set_title(f"{title}\n{erf.layer}, {erf.images} images, {erf.input_size[0]}x{erf.input_size[1]}", fontsize=9)
    ax.set_xlabel(f"{held}% of the total lie in {shares}% of the area", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    write_atomic(output, lambda handle: fig.savefig(handle, format=suffix, dpi=100))
    plt.close(fig)


def build_model(spec, weights: str | None = None) -> torch.nn.Module:
    """The spec's model with random weights (seed 0), or with `weights`: an overlock model file, a
    run checkpoint or a published state dict (what `overlock eval` reads); a mismatch is a
    CheckpointError naming the keys."""
    from ..builder import build, convert_official
    from ..checkpoint import MODEL_FORMAT
    from ..errors import CheckpointError
    from ..training import checkpoint
    from ..training.runner import _load_weights
    from .compare import measurable

    spec = measurable(spec)
    if weights is None:
        torch.manual_seed(0)
        return build(spec)
    state = checkpoint.load_file(weights)
    deploy = isinstance(state, dict) and state.get("format") == MODEL_FORMAT and bool(state.get("deploy"))
    model = build(spec, deploy=deploy)
    tensors = checkpoint.model_state(state)
    if set(tensors) != set(model.state_dict()) and not checkpoint.is_run_checkpoint(state):
        try:
            tensors = convert_official(model, tensors)
        except CheckpointError:
            pass
    _load_weights(model, tensors, weights, "check that SPEC (and --set) are the ones the weights were trained with")
    return model
