"""archspec: what an OverLoCK-style network is, as validated data (pydantic v2, no torch).

`load()` is the one way from a preset name, YAML file, dict or Spec (plus `--set` overrides) to
a validated `Spec`; `builder.build()` is the one way from a Spec to a module.
"""

from .loader import SpecSource, format_path, load, loads, parse_override, preset_description, preset_dir, preset_names
from .schema import (
    DILATED_REPCONV_BRANCHES,
    SUPPORTED_LARGE_KERNELS,
    BaseNet,
    BlockStage,
    Context,
    FocusNet,
    FocusStage,
    Head,
    Norm,
    Spec,
    Stem,
)

__all__ = [
    "DILATED_REPCONV_BRANCHES",
    "SUPPORTED_LARGE_KERNELS",
    "BaseNet",
    "BlockStage",
    "Context",
    "FocusNet",
    "FocusStage",
    "Head",
    "Norm",
    "Spec",
    "SpecSource",
    "Stem",
    "format_path",
    "load",
    "loads",
    "parse_override",
    "preset_description",
    "preset_dir",
    "preset_names",
]
