"""What `overlock build` reports: per sub-network and stage, the spec's numbers, block parts and parameters.

One function computes the rows from the built model (so the counts are what was built, not what
the spec promises); the CLI only renders them, as a rich table or as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..archspec import Block, DDSSpec
from .network import SpecModel


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass
class Row:
    subnet: str
    stage: str
    width: str
    depth: int
    mixer: str
    ffn: str
    se: str
    params: int


def _stage_row(subnet: str, stage: str, width: str, depth: int, block: Block, module: nn.Module) -> Row:
    kind = "" if block.kind == "dynamic" or subnet != "focus" else " (static)"
    ffn = block.ffn + ("" if block.local_conv else ", no local conv")
    return Row(subnet, stage + kind, width, depth, block.mixer.describe(), ffn, "yes" if block.se else "no",
               count_params(module))  # fmt: skip


def _part(subnet: str, stage: str, width: str, module: nn.Module | None) -> Row:
    return Row(subnet, stage, width, 0, "-", "-", "-", count_params(module))


def summarize(model: SpecModel) -> dict:
    spec = model.spec
    rows = _dds_rows(model) if isinstance(spec, DDSSpec) else _pyramid_rows(model)
    if model.features_only:
        outputs = getattr(model, "pyramid", None)
        rows.append(_part("pyramid", "outputs", "-", outputs))
    else:
        head = spec.head
        width = f"{head.projection}->{head.num_classes}" if head.projection else f"->{head.num_classes}"
        rows.append(_part("head", "main", width, model.head))
        if model.aux_head is not None:
            rows.append(_part("head", "aux", f"{spec.overview.width}->{head.num_classes}", model.aux_head))
    subnets: dict[str, int] = {}
    for row in rows:
        subnets[row.subnet] = subnets.get(row.subnet, 0) + row.params
    total = count_params(model)
    assert total == sum(subnets.values()), "every parameter belongs to exactly one summary row"
    deployed = not any(hasattr(m, "branches") for m in model.modules())
    return {
        "name": spec.name,
        "topology": spec.topology,
        "params": total,
        "deploy": deployed,
        "subnetworks": subnets,
        "stages": [asdict(r) for r in rows],
    }


def _stem_row(model: SpecModel, stem: nn.Module) -> Row:
    spec = model.spec
    first = spec.stages_in_order()[0][1].width
    width = (
        f"{spec.in_channels}->{spec.stem_width}->{first}"
        if spec.stem.type == "conv"
        else f"{spec.in_channels}->{first}"
    )
    return Row("base" if isinstance(spec, DDSSpec) else "stem", "stem", width, 0, spec.stem.type, "-", "-",
               count_params(stem))  # fmt: skip


def _dds_rows(model: SpecModel) -> list[Row]:
    spec = model.spec
    c = spec.context_width
    rows = [_stem_row(model, model.base.stem)]
    for i, (stage, module) in enumerate(zip(spec.base.stages, model.base.stages, strict=True)):
        block = spec.resolved_block(f"base.stages.{i}")
        rows.append(_stage_row("base", f"stage {i + 1}", str(stage.width), stage.depth, block, module))
    ov = spec.overview
    rows.append(
        _stage_row("overview", "stage", str(ov.width), ov.depth, spec.resolved_block("overview"), model.overview)
    )
    rows.append(_part("context", "prior P0", f"{ov.width}->{c}", model.context))
    if model.focus_input is not None:
        rows[-1].params += count_params(model.focus_input)
    for i, (stage, module) in enumerate(zip(spec.focus.stages, model.focus.stages, strict=True)):
        block = spec.resolved_block(f"focus.stages.{i}")
        rows.append(_stage_row("focus", f"stage {i + 1}", f"{stage.width}+{c}", stage.depth, block, module))
    return rows


def _pyramid_rows(model: SpecModel) -> list[Row]:
    spec = model.spec
    rows = [_stem_row(model, model.stem)]
    for i, (stage, module) in enumerate(zip(spec.stages, model.stages, strict=True)):
        block = spec.resolved_block(f"stages.{i}")
        rows.append(_stage_row("stages", f"stage {i + 1}", str(stage.width), stage.depth, block, module))
    if model.feedback is not None:
        fb = spec.feedback
        rows.append(
            _part("feedback", f"{fb.source + 1}->{fb.target + 1}", str(spec.stages[fb.target].width), model.feedback)
        )
    return rows
