"""builder: compiles a validated spec into a `torch.nn.Module`.

`build()` is the one way from anything `archspec.load` accepts to a model; `load_official()` reads
the published checkpoints' layout; `count_flops()` measures cost with fvcore.
"""

from __future__ import annotations

import re

import torch

from ..archspec import Spec, SpecSource, load
from ..errors import SpecError, is_out_of_memory
from .network import OverLoCK, PyramidNet, SpecModel
from .official import convert_official, load_official, official_to_overlock

__all__ = [
    "MODELS",
    "OverLoCK",
    "PyramidNet",
    "SpecModel",
    "build",
    "convert_official",
    "inference_params",
    "load_official",
    "official_to_overlock",
]

# Topology (the spec's `topology`) -> the model class that builds it.
MODELS: dict[str, type[SpecModel]] = {"dds": OverLoCK, "pyramid": PyramidNet}


def build(
    spec: SpecSource, deploy: bool = False, *, features_only: bool = False, overrides: list[str] | None = None
) -> SpecModel:
    """Build the model a spec describes.

    `deploy=True` builds the re-parameterised form (every DilatedRepConv as one conv with bias),
    the layout of the published `_deploy` checkpoints. `features_only=True` drops the heads and
    returns the four pyramid levels for detection/segmentation.
    """
    resolved: Spec = load(spec, overrides)
    if resolved.head.num_classes is None and not features_only:
        raise SpecError(
            "head.num_classes is open (null): set it in the spec or with --set head.num_classes=N "
            "(`overlock train` takes it from the data)"
        )
    try:
        return MODELS[resolved.topology](resolved, deploy=deploy, features_only=features_only)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise SpecError(
            f"the model of spec {resolved.name or '<unnamed>'} does not fit in memory: {_allocation(exc)}; "
            "reduce widths, depths or mlp_ratio"
        ) from None


def inference_params(spec: Spec) -> int:
    """Parameters of the model as deployed: re-parameterised, without the auxiliary head (what papers
    report). Built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        model = MODELS[spec.topology](spec, deploy=True)
    aux = model.aux_head
    return sum(p.numel() for p in model.parameters()) - (sum(p.numel() for p in aux.parameters()) if aux else 0)


def _allocation(exc: BaseException) -> str:
    """torch's "you tried to allocate N bytes", shortened to what a user needs."""
    text = str(exc)
    found = re.search(r"tried to allocate (\d+) bytes", text)
    if found:
        return f"one weight tensor alone needs {int(found.group(1)) / 2**30:,.1f} GiB"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
