"""archspec: what an OverLoCK-style network is, as validated data (pydantic v2, no torch).

`load()` is the one way from a preset name, YAML file, dict or Spec (plus `--set` overrides) to
a validated `Spec` (a `DDSSpec` or a `PyramidSpec`, by the spec's `topology`); `builder.build()`
is the one way from a Spec to a module. Token mixers a block may name are in `mixers.py`.
"""

from .loader import (
    SpecSource,
    format_path,
    load,
    parse_override,
    preset_description,
    preset_dir,
    preset_names,
    spec_json_schema,
)
from .mixers import MIXER_CONFIGS, MIXER_TYPES, MixerConfig
from .rules import DILATED_REPCONV_BRANCHES, SUPPORTED_LARGE_KERNELS
from .schema import (
    TOPOLOGIES,
    BaseNet,
    Block,
    BlockStage,
    Context,
    DDSSpec,
    Downsample,
    Feedback,
    FocusNet,
    FocusStage,
    Head,
    Norm,
    PyramidHead,
    PyramidSpec,
    Spec,
    Stem,
)

__all__ = [
    "DILATED_REPCONV_BRANCHES",
    "MIXER_CONFIGS",
    "MIXER_TYPES",
    "SUPPORTED_LARGE_KERNELS",
    "TOPOLOGIES",
    "BaseNet",
    "Block",
    "BlockStage",
    "Context",
    "DDSSpec",
    "Downsample",
    "Feedback",
    "FocusNet",
    "FocusStage",
    "Head",
    "MixerConfig",
    "Norm",
    "PyramidHead",
    "PyramidSpec",
    "Spec",
    "SpecSource",
    "Stem",
    "format_path",
    "load",
    "parse_override",
    "preset_description",
    "preset_dir",
    "preset_names",
    "spec_json_schema",
]
