"""What `overlock build` reports: per sub-network and stage, the spec's numbers and the parameters.

One function computes the rows from the built model (so the counts are what was built, not what
the spec promises); the CLI only renders them, as a rich table or as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .network import OverLoCK


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass
class Row:
    subnet: str
    stage: str
    width: str
    depth: int
    kernels: str
    groups: str
    params: int


def summarize(model: OverLoCK) -> dict:
    spec = model.spec
    c = spec.context_width
    rows: list[Row] = [
        Row(
            "base",
            "stem",
            f"{spec.in_channels}->{spec.stem_width}->{spec.base.stages[0].width}",
            4,
            "3",
            "-",
            count_params(model.base.stem),
        )
    ]
    for i, (stage, module) in enumerate(zip(spec.base.stages, model.base.stages, strict=True)):
        rows.append(
            Row(
                "base",
                f"stage {i + 1}",
                str(stage.width),
                stage.depth,
                str(stage.kernel_size),
                "-",
                count_params(module),
            )
        )
    ov = spec.overview
    rows.append(
        Row("overview", "stage", str(ov.width), ov.depth, str(ov.kernel_size), "-", count_params(model.overview))
    )
    rows.append(
        Row(
            "context",
            "prior P0",
            f"{ov.width}->{c}",
            0,
            "1",
            "-",
            count_params(model.context) + count_params(model.focus_input),
        )
    )
    for i, (stage, module) in enumerate(zip(spec.focus.stages, model.focus.stages, strict=True)):
        rows.append(
            Row(
                "focus",
                f"stage {i + 1}",
                f"{stage.width}+{c}",
                stage.depth,
                f"{stage.kernel_size}/{stage.small_kernel_size}",
                f"{stage.groups} (h={2 * stage.groups}) S={stage.region_centers}",
                count_params(module),
            )
        )
    if not model.features_only:
        rows.append(
            Row(
                "head",
                "main",
                f"{spec.head.projection}->{spec.head.num_classes}",
                0,
                "1",
                "-",
                count_params(model.head),
            )
        )
        if model.aux_head is not None:
            rows.append(
                Row("head", "aux", f"{ov.width}->{spec.head.num_classes}", 0, "1", "-", count_params(model.aux_head))
            )
    else:
        rows.append(Row("pyramid", "outputs", "-", 0, "-", "-", count_params(model.pyramid)))
    subnets: dict[str, int] = {}
    for row in rows:
        subnets[row.subnet] = subnets.get(row.subnet, 0) + row.params
    total = count_params(model)
    assert total == sum(subnets.values()), "every parameter belongs to exactly one summary row"
    deployed = not any(hasattr(m, "branches") for m in model.modules())
    return {
        "name": spec.name,
        "params": total,
        "deploy": deployed,
        "subnetworks": subnets,
        "stages": [asdict(r) for r in rows],
    }
