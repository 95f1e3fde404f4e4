"""`overlock diagram`: a drawing of a spec's network, laid out like the paper's overview figure.

Everything drawn comes from the validated spec (no model is built): each stage is a box with its
width x depth, its resolved block (`Spec.resolved_block(path).describe()`) and its resolution at the
given input size. DDS: Base-Net and Overview-Net on the top row, Focus-Net below at the resolutions
it runs at, the context prior flowing from Overview-Net into every Focus-Net stage. Pyramid: one
row, with the feedback arrow when the spec has one.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from .. import archspec
from ..errors import OverlockError

FORMATS = ("svg", "png", "pdf")
COLORS = {"stem": "#d9d9d9", "base": "#cfe2f3", "overview": "#fce5cd", "focus": "#d9ead3", "head": "#ead1dc"}


@dataclass
class Box:
    """One drawn part: where (column, row), what colour, and its text lines (title first)."""

    key: str
    col: float
    row: int
    kind: str
    lines: list[str]


def _halve(size: tuple[int, int], times: int) -> tuple[int, int]:
    """Spatial size after `times` stride-2 convs (kernel 3, padding 1: ceil(n / 2) each)."""
    h, w = size
    for _ in range(times):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def _res(size: tuple[int, int], level: int) -> str:
    """'HxW (/stride)' at pyramid level `level` (0 = the stem's /4)."""
    h, w = _halve(size, 2 + level)
    return f"{h}x{w} (/{4 * 2**level})"


def _stage_lines(spec: archspec.Spec, title: str, path: str, stage, size: tuple[int, int], level: int) -> list[str]:
    block = spec.resolved_block(path)
    desc = textwrap.wrap(f"{block.kind}: {block.describe()}", 22)
    return [title, f"{path}", f"{stage.width} x {stage.depth}", *desc, _res(size, level)]


def _stem_lines(spec: archspec.Spec, size: tuple[int, int]) -> list[str]:
    kind = "4 conv3x3" if spec.stem.type == "conv" else "patch 4x4"
    return ["Stem", kind, f"-> {spec.stages_in_order()[0][1].width} ch", _res(size, 0)]


def layout(spec: archspec.Spec, size: tuple[int, int]) -> tuple[list[Box], list[tuple[str, str, str]]]:
    """Boxes and arrows (from key, to key, style: 'flow' | 'prior' | 'feedback' | 'aux')."""
    boxes = [Box("stem", 0, 0, "stem", _stem_lines(spec, size))]
    arrows: list[tuple[str, str, str]] = []
    if isinstance(spec, archspec.DDSSpec):
        previous = "stem"
        for i, stage in enumerate(spec.base.stages):
            key = f"base.stages.{i}"
            boxes.append(Box(key, i + 1, 0, "base", _stage_lines(spec, f"Base-Net {i + 1}", key, stage, size, i)))
            arrows.append((previous, key, "flow"))
            previous = key
        n = len(spec.base.stages)
        ov = Box(
            "overview", n + 1, 0, "overview", _stage_lines(spec, "Overview-Net", "overview", spec.overview, size, n)
        )
        boxes.append(ov)
        arrows.append((previous, "overview", "flow"))
        if spec.head.aux_head:
            boxes.append(
                Box("aux", n + 2, 0, "head", ["Aux head", "(training only)", f"{spec.head.num_classes} classes"])
            )
            arrows.append(("overview", "aux", "flow"))
        boxes.append(Box("prior", n + 1.5, 1, "overview", ["Context prior P0", f"conv1x1 -> {spec.context_width} ch"]))
        arrows.append(("overview", "prior", "prior"))
        feed = previous if spec.context.base_features else "overview"
        for j, stage in enumerate(spec.focus.stages):
            key = f"focus.stages.{j}"
            lines = _stage_lines(spec, f"Focus-Net {j + 1}", key, stage, size, n - 1 + j)
            boxes.append(Box(key, n + j, 2, "focus", lines))
            arrows.append((feed, key, "flow"))
            arrows.append(("prior", key, "prior"))
            feed = key
        m = len(spec.focus.stages)
        head = ["Head", "cat(x, P)", *_head_text(spec.head)]
        boxes.append(Box("head", n + m, 2, "head", head))
        arrows.append((feed, "head", "flow"))
    else:
        previous = "stem"
        for i, stage in enumerate(spec.stages):
            key = f"stages.{i}"
            boxes.append(Box(key, i + 1, 0, "base", _stage_lines(spec, f"Stage {i + 1}", key, stage, size, i)))
            arrows.append((previous, key, "flow"))
            previous = key
        boxes.append(Box("head", len(spec.stages) + 1, 0, "head", ["Head", *_head_text(spec.head)]))
        arrows.append((previous, "head", "flow"))
        if spec.feedback is not None:
            arrows.append((f"stages.{spec.feedback.source}", f"stages.{spec.feedback.target}", "feedback"))
    return boxes, arrows


def _head_text(head) -> list[str]:
    proj = [f"conv1x1 -> {head.projection}"] if head.projection else ["norm"]
    return [*proj, f"{head.num_classes if head.num_classes else '?'} classes"]


def draw(spec: archspec.Spec, output: Path, input_size: tuple[int, int] = (224, 224)) -> list[Box]:
    """Draw `spec` to `output` (.svg, .png or .pdf, written atomically); returns the boxes drawn."""
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise OverlockError(f"-o {output}: give a file ending in {', '.join('.' + f for f in FORMATS)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    boxes, arrows = layout(spec, input_size)
    cols = max(b.col for b in boxes) + 1
    rows = max(b.row for b in boxes) + 1
    bw, bh, dx, dy = 2.1, 1.9, 2.6, 2.3
    fig, ax = plt.subplots(figsize=(cols * dx * 0.85 + 0.5, rows * dy * 0.85 + 1.2))
    where: dict[str, tuple[float, float, float]] = {}
    for box in boxes:
        x, y = box.col * dx, -box.row * dy
        height = bh if len(box.lines) > 3 else bh * 0.55
        where[box.key] = (x, y, height)
        ax.add_patch(
            FancyBboxPatch(
                (x - bw / 2, y - height / 2),
                bw,
                height,
                boxstyle="round,pad=0.04,rounding_size=0.12",
                fc=COLORS[box.kind],
                ec="#333333",
                lw=1.2,
            )
        )
        title, rest = box.lines[0], box.lines[1:]
        step = min(0.22, (height - 0.2) / max(len(box.lines), 1))
        top = y + (len(box.lines) - 1) * step / 2
        ax.text(x, top, title, ha="center", va="center", fontsize=9.5, fontweight="bold")
        for k, line in enumerate(rest, start=1):
            bold = box.kind != "head" and k == 2  # width x depth of a stage
            ax.text(
                x,
                top - k * step,
                line,
                ha="center",
                va="center",
                fontsize=9 if bold else 7.5,
                family="monospace" if k == 1 else None,
                fontweight="bold" if bold else None,
            )
    styles = {
        "flow": dict(color="#333333", ls="-", rad=0.0),
        "prior": dict(color="#cc4125", ls="--", rad=0.0),
        "feedback": dict(color="#674ea7", ls="-", rad=0.45),
        "aux": dict(color="#333333", ls=":", rad=0.0),
    }
    for src, dst, style in arrows:
        (x0, y0, h0), (x1, y1, h1) = where[src], where[dst]
        s = styles[style]
        if y0 == y1:  # same row: right edge to left edge (or over the top for feedback)
            if style == "feedback":
                start, end = (x0, y0 + h0 / 2 + 0.05), (x1, y1 + h1 / 2 + 0.05)
            else:
                start, end = (x0 + bw / 2, y0), (x1 - bw / 2, y1)
        else:  # down a row: bottom edge to top edge
            start, end = (x0, y0 - h0 / 2), (x1, y1 + h1 / 2)
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=12,
                color=s["color"],
                ls=s["ls"],
                lw=1.4,
                connectionstyle=f"arc3,rad={s['rad']}",
                shrinkA=2,
                shrinkB=2,
            )
        )
    handles = [("features", "#333333", "-")]
    if isinstance(spec, archspec.DDSSpec):
        handles.append(("context prior", "#cc4125", "--"))
    if getattr(spec, "feedback", None) is not None:
        handles.append(("feedback (stages re-run)", "#674ea7", "-"))
    from matplotlib.lines import Line2D

    ax.legend(
        [Line2D([0], [0], color=c, ls=ls, lw=1.5) for _, c, ls in handles],
        [h[0] for h in handles],
        loc="lower left",
        fontsize=8,
        frameon=False,
    )
    topology = "DDS" if isinstance(spec, archspec.DDSSpec) else "pyramid"
    ax.set_title(
        f"{spec.name or 'spec'} ({topology}) at {input_size[0]}x{input_size[1]}: boxes are width x depth",
        fontsize=11,
        loc="left",
    )
    ax.set_xlim(-bw / 2 - 0.3, (cols - 1) * dx + bw / 2 + 0.3)
    ax.set_ylim(-(rows - 1) * dy - bh / 2 - 0.8, bh / 2 + (1.4 if getattr(spec, "feedback", None) else 0.6))
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    from ..checkpoint import write_atomic

    # SVG keeps its labels as text (searchable, selectable), not as glyph outlines.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        write_atomic(output, lambda handle: fig.savefig(handle, format=suffix, dpi=110))
    plt.close(fig)
    return boxes
