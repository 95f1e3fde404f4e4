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
COLORS = {
    "stem": "#d9d9d9",
    "base": "#cfe2f3",
    "overview": "#fce5cd",
    "prior": "#fce5cd",
    "focus": "#d9ead3",
    "head": "#ead1dc",
    "step": "#ffffff",
    "reinject": "#f4cccc",
    "gate": "#fff2cc",
}


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


@dataclass
class Arrow:
    """A drawn connection: 'flow' (features x), 'prior' (P0 as the first P), 'reinject' (P0 mixed
    back into P), 'context' (P passed on, updated), 'feedback' or 'aux'; `label` is written along it."""

    src: str
    dst: str
    style: str
    label: str = ""


def layout(spec: archspec.Spec, size: tuple[int, int]) -> tuple[list[Box], list[Arrow]]:
    """Boxes and arrows of the network (the inside of a Focus-Net block is `focus_block_steps`)."""
    boxes = [Box("stem", 0, 0, "stem", _stem_lines(spec, size))]
    arrows: list[Arrow] = []
    if isinstance(spec, archspec.DDSSpec):
        previous = "stem"
        for i, stage in enumerate(spec.base.stages):
            key = f"base.stages.{i}"
            boxes.append(Box(key, i + 1, 0, "base", _stage_lines(spec, f"Base-Net {i + 1}", key, stage, size, i)))
            arrows.append(Arrow(previous, key, "flow"))
            previous = key
        n = len(spec.base.stages)
        ov = Box(
            "overview", n + 1, 0, "overview", _stage_lines(spec, "Overview-Net", "overview", spec.overview, size, n)
        )
        boxes.append(ov)
        arrows.append(Arrow(previous, "overview", "flow"))
        if spec.head.aux_head:
            boxes.append(
                Box("aux", n + 2, 0, "head", ["Aux head", "(training only)", f"{spec.head.num_classes} classes"])
            )
            arrows.append(Arrow("overview", "aux", "flow"))
        c = spec.context_width
        prior_lines = ["Context prior P0", f"conv1x1 -> {c} ch", _res(size, n)]
        boxes.append(Box("prior", n + 1.5, 1, "prior", prior_lines))
        arrows.append(Arrow("overview", "prior", "prior"))
        feed = previous if spec.context.base_features else "overview"
        reinject = spec.context.reinject_prior
        for j, stage in enumerate(spec.focus.stages):
            key = f"focus.stages.{j}"
            level = n - 1 + j
            lines = _stage_lines(spec, f"Focus-Net {j + 1}", key, stage, size, level)
            boxes.append(Box(key, n + j, 2, "focus", [*lines[:-1], *_context_lines(spec, key), lines[-1]]))
            arrows.append(Arrow(feed, key, "flow", "x" if j else ""))
            if j == 0:
                # P0 upsampled to this stage's resolution is the first P; later blocks mix it back in.
                arrows.append(Arrow("prior", key, "prior", f"P0 at {_res(size, level).split()[0]}"))
            else:
                arrows.append(Arrow(feed, key, "context", "P"))
                if reinject:
                    arrows.append(Arrow("prior", key, "reinject", f"P0 at {_res(size, level).split()[0]}"))
            feed = key
        m = len(spec.focus.stages)
        head = ["Head", "cat(x, P)", *_head_text(spec.head)]
        boxes.append(Box("head", n + m, 2, "head", head))
        arrows.append(Arrow(feed, "head", "flow"))
    else:
        previous = "stem"
        for i, stage in enumerate(spec.stages):
            key = f"stages.{i}"
            boxes.append(Box(key, i + 1, 0, "base", _stage_lines(spec, f"Stage {i + 1}", key, stage, size, i)))
            arrows.append(Arrow(previous, key, "flow"))
            previous = key
        boxes.append(Box("head", len(spec.stages) + 1, 0, "head", ["Head", *_head_text(spec.head)]))
        arrows.append(Arrow(previous, "head", "flow"))
        if spec.feedback is not None:
            arrows.append(Arrow(f"stages.{spec.feedback.source}", f"stages.{spec.feedback.target}", "feedback"))
    return boxes, arrows


def _gated(spec: archspec.DDSSpec, path: str) -> bool:
    """The gate SiLU(BN(conv1x1(z))) exists in dynamic blocks only, and only with context.gate."""
    return spec.context.gate and spec.resolved_block(path).kind == "dynamic"


def _context_lines(spec: archspec.DDSSpec, path: str) -> list[str]:
    """What a Focus-Net stage does with the prior: its width, and the gate."""
    gate = "gate: × SiLU(conv1x1 z)" if _gated(spec, path) else "no gate"
    width = next(stage.width for here, stage, _ in spec.stages_in_order() if here == path)
    return [f"x {width} + P {spec.context_width} ch", gate]


def focus_block_steps(spec: archspec.DDSSpec) -> list[Box]:
    """The inside of a Focus-Net block (ARCHITECTURE.md section 4), as the drawing's side panel.

    Generated from the first Focus-Net stage's resolved block and `context`: the re-injection
    step only with reinject_prior, the gate only in a gated dynamic block, the mixer as resolved.
    """
    path = "focus.stages.0"
    block = spec.resolved_block(path)
    steps: list[Box] = []
    if spec.context.reinject_prior:
        steps.append(
            Box(
                "reinject",
                0,
                0,
                "reinject",
                ["re-inject prior", "P = α·P + β·P0", "in every block but", "Focus-Net's first"],
            )
        )
    dynamic = block.kind == "dynamic"
    steps.append(
        Box("fuse", 0, 0, "step", ["fuse", "f = cat(x, P)", "z = fusion(f)" if dynamic else "basic block on f"])
    )
    if dynamic:
        mixer = block.mixer
        if getattr(mixer, "guided", False):
            centres = getattr(mixer, "region_centers", None)
            where = f"P's {centres}x{centres} region centres" if centres else "P"
            mix = ["ContMix on z", "queries from x,", *textwrap.wrap(f"keys from {where}", 20)]
        else:
            mix = ["mixer on z", *textwrap.wrap(mixer.describe(), 22)]
        steps.append(Box("mix", 0, 0, "step", mix))
        if _gated(spec, path):
            steps.append(Box("gate", 0, 0, "gate", ["gate", "out = out × g,", "g = SiLU(BN(conv1x1 z))"]))
        steps.append(Box("ffn", 0, 0, "step", ["FFN", "on cat(x, P)"]))
    steps.append(Box("split", 0, 0, "step", ["split", "-> x and updated P", "(last block: cat(x, P))"]))
    return steps


def _head_text(head) -> list[str]:
    proj = [f"conv1x1 -> {head.projection}"] if head.projection else ["norm"]
    return [*proj, f"{head.num_classes if head.num_classes else '?'} classes"]


STYLES = {
    "flow": {"color": "#333333", "ls": "-", "rad": 0.0},
    "prior": {"color": "#cc4125", "ls": "--", "rad": 0.0},
    "context": {"color": "#cc4125", "ls": "-", "rad": 0.0},
    "reinject": {"color": "#cc4125", "ls": ":", "rad": 0.0},
    "feedback": {"color": "#674ea7", "ls": "-", "rad": 0.45},
    "aux": {"color": "#333333", "ls": ":", "rad": 0.0},
}
LEGEND = {
    "flow": "features x",
    "prior": "context prior P0 (the first P)",
    "context": "P: updated by every block, passed on\n(conv3x3 stride 2 between stages)",
    "reinject": "P0 re-injected: P = α·P + β·P0",
    "feedback": "feedback (stages re-run)",
}
LINE = 0.22  # text line height, in the drawing's units
STEP_WIDTH, STEP_GAP = 2.1, 0.3  # the small boxes of the Focus-Net block panel


def _height(lines: list[str], least: float = 1.0) -> float:
    return max(least, LINE * len(lines) + 0.3)


def draw(spec: archspec.Spec, output: Path, input_size: tuple[int, int] = (224, 224)) -> list[Box]:
    """Draw `spec` to `output` (.svg, .png or .pdf, written atomically); returns the boxes drawn."""
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise OverlockError(f"-o {output}: give a file ending in {', '.join('.' + f for f in FORMATS)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    boxes, arrows = layout(spec, input_size)
    dds = isinstance(spec, archspec.DDSSpec)
    steps = focus_block_steps(spec) if dds else []
    cols = int(max(b.col for b in boxes)) + 1
    bw, dx = 2.1, 2.6
    tallest = max(_height(b.lines) for b in boxes)
    dy = max(2.3, tallest + 0.6)
    where: dict[str, tuple[float, float, float, float]] = {}  # key -> centre x, y, width, height
    for box in boxes:
        where[box.key] = (box.col * dx, -box.row * dy, bw, _height(box.lines))
    bottom = min(y - h / 2 for _, y, _, h in where.values())
    top = max(y + h / 2 for _, y, _, h in where.values())
    panel = _place_panel(spec, steps, where, dx, dy, bw, cols, bottom) if steps else None
    if panel is not None:
        bottom = min(bottom, panel[1] - panel[3])
    width = (cols - 1) * dx + bw + 0.6
    height = top - bottom + (1.6 if getattr(spec, "feedback", None) else 1.2)
    fig, ax = plt.subplots(figsize=(width * 0.75, height * 0.75))
    for box in boxes:
        _draw_box(ax, box, *where[box.key])
    if panel is not None:
        _draw_panel(ax, steps, panel, where)
    for arrow in arrows:
        _draw_arrow(ax, arrow, where, arrows)
    kinds = [k for k in LEGEND if any(a.style == k for a in arrows)]
    ax.legend(
        [Line2D([0], [0], color=STYLES[k]["color"], ls=STYLES[k]["ls"], lw=1.5) for k in kinds],
        [LEGEND[k] for k in kinds],
        fontsize=8,
        frameon=False,
        **_legend_place(ax, spec, where),
    )
    topology = "DDS" if dds else "pyramid"
    ax.set_title(
        f"{spec.name or 'spec'} ({topology}) at {input_size[0]}x{input_size[1]}: boxes are width x depth",
        fontsize=11,
        loc="left",
    )
    ax.set_xlim(-bw / 2 - 0.3, (cols - 1) * dx + bw / 2 + 0.3)
    ax.set_ylim(bottom - 0.5, top + (1.0 if getattr(spec, "feedback", None) else 0.3))
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    from ..checkpoint import write_atomic

    # SVG keeps its labels as text (searchable, selectable), not as glyph outlines.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        write_atomic(output, lambda handle: fig.savefig(handle, format=suffix, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return boxes + steps


def _legend_place(ax, spec, where) -> dict:
    """DDS: the free cell right of the context prior (between the two heads); pyramid: upper left."""
    if not isinstance(spec, archspec.DDSSpec):
        return {"loc": "upper left"}
    x, y, w, _ = where["prior"]
    return {"loc": "center left", "bbox_to_anchor": (x + w / 2 + 0.2, y), "bbox_transform": ax.transData}


def _draw_box(ax, box: Box, x: float, y: float, w: float, h: float, small: bool = False) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.04,rounding_size=0.12",
            fc=COLORS[box.kind],
            ec="#333333",
            lw=0.9 if small else 1.2,
        )
    )
    top = y + (len(box.lines) - 1) * LINE / 2
    for k, line in enumerate(box.lines):
        stage_size = not small and box.kind not in ("head", "prior") and k == 2  # width x depth of a stage
        ax.text(
            x,
            top - k * LINE,
            line,
            ha="center",
            va="center",
            fontsize=9.5 if k == 0 else 9 if stage_size else 7 if small else 7.5,
            family="monospace" if k == 1 and not small and box.kind != "head" else None,
            fontweight="bold" if k == 0 or stage_size else None,
        )


def _place_panel(spec, steps, where, dx, dy, bw, cols, bottom) -> tuple[float, float, float, float]:
    """(left, top, width, height) of the Focus-Net block panel: left of Focus-Net when the columns
    under Base-Net are free (3 or more Base-Net stages), else in a row of its own below."""
    n = len(spec.base.stages)
    if n >= 3:
        left, right = -bw / 2, (n - 1) * dx + bw / 2
        top = -dy + _height(["", "", ""]) / 2 + 0.2  # level with the prior box's top
    else:
        left, right = -bw / 2, (cols - 1) * dx + bw / 2
        top = bottom - 0.5
    per_row = max(1, int((right - left - 0.2 + STEP_GAP) // (STEP_WIDTH + STEP_GAP)))
    rows = -(-len(steps) // per_row)
    sh = max(_height(s.lines, 0.9) for s in steps)
    return left, top, right - left, 0.55 + rows * (sh + STEP_GAP)


def _draw_panel(ax, steps: list[Box], panel, where) -> None:
    """The inside of a Focus-Net block as a snake of small steps, in a dashed frame."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    left, top, w, h = panel
    ax.add_patch(
        FancyBboxPatch(
            (left, top - h), w, h, boxstyle="round,pad=0.02,rounding_size=0.15", fc="#f7fbf5", ec="#6aa84f", ls="--"
        )
    )
    ax.text(left + 0.15, top - 0.22, "inside every Focus-Net block", fontsize=9, fontweight="bold", va="center")
    sw, gap = STEP_WIDTH, STEP_GAP
    sh = max(_height(s.lines, 0.9) for s in steps)
    per_row = max(1, int((w - 0.2 + gap) // (sw + gap)))
    span = per_row * sw + (per_row - 1) * gap
    x0 = left + (w - span) / 2 + sw / 2
    centres = []
    for i, step in enumerate(steps):
        row, k = divmod(i, per_row)
        k = k if row % 2 == 0 else per_row - 1 - k  # snake: every other row runs right to left
        cx, cy = x0 + k * (sw + gap), top - 0.55 - sh / 2 - row * (sh + gap)
        centres.append((cx, cy))
        _draw_box(ax, step, cx, cy, sw, sh, small=True)
    for (ax0, ay0), (ax1, ay1) in zip(centres, centres[1:], strict=False):
        if ay0 == ay1:
            sign = 1 if ax1 > ax0 else -1
            start, end = (ax0 + sign * sw / 2, ay0), (ax1 - sign * sw / 2, ay1)
        else:
            start, end = (ax0, ay0 - sh / 2), (ax1, ay1 + sh / 2)
        ax.add_patch(
            FancyArrowPatch(
                start, end, arrowstyle="-|>", mutation_scale=10, color="#333333", lw=1.1, shrinkA=1, shrinkB=1
            )
        )


def _draw_arrow(ax, arrow: Arrow, where, arrows: list[Arrow]) -> None:
    from matplotlib.patches import FancyArrowPatch

    (x0, y0, w0, h0), (x1, y1, w1, h1) = where[arrow.src], where[arrow.dst]
    s = STYLES[arrow.style]
    # Arrows sharing both ends (x and P between Focus-Net stages) run side by side.
    twins = [a for a in arrows if (a.src, a.dst) == (arrow.src, arrow.dst)]
    shift = 0.0 if len(twins) == 1 else 0.5 * (twins.index(arrow) - (len(twins) - 1) / 2)
    if y0 == y1:  # same row: right edge to left edge (or over the top for feedback)
        if arrow.style == "feedback":
            start, end = (x0, y0 + h0 / 2 + 0.05), (x1, y1 + h1 / 2 + 0.05)
        else:
            start, end = (x0 + w0 / 2, y0 - shift), (x1 - w1 / 2, y1 - shift)
    else:  # down a row: bottom edge to top edge
        start, end = (x0 + shift, y0 - h0 / 2), (x1 + shift, y1 + h1 / 2)
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
    if arrow.label:
        # Same row: above the middle. Down a row: beside the arrow near its end, on the side it
        # leans to, so that the labels of arrows fanning out of one box do not run into each other.
        t = 0.5 if y0 == y1 else 0.6
        lx, ly = start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])
        side = "center" if y0 == y1 or end[0] == start[0] else "right" if end[0] < start[0] else "left"
        ax.text(
            lx + {"center": 0.0, "right": -0.12, "left": 0.12}[side],
            ly + (0.13 if y0 == y1 else 0.0),
            arrow.label,
            ha=side,
            va="bottom" if y0 == y1 else "center",
            fontsize=7,
            color=s["color"],
            bbox={"fc": "white", "ec": "none", "pad": 0.5, "alpha": 0.85},
        )
