"""Loading state dicts in the layout of the published OverLoCK checkpoints.

The whole correspondence between the reference's parameter names and ours is the table below:
regular expressions applied in order to each official key. The modules never know about it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

# (official pattern, our replacement), applied in order. Inner names first, then the prefixes that
# place a block in the spec's tree (the published models have 3 Base-Net and 2 Focus-Net stages).
OFFICIAL_KEY_TABLE: list[tuple[str, str]] = [
    # DilatedRepConv internals (Base-Net blocks and LePE)
    (r"\.lk_origin\.", ".lk."),
    (r"\.origin_bn\.", ".lk_bn."),
    (r"\.dil_conv_k(\d+)_(\d+)\.", r".branches.k\1_d\2.conv."),
    (r"\.dil_bn_k(\d+)_(\d+)\.", r".branches.k\1_d\2.bn."),
    # Basic block (blocksN.j)
    (r"^(blocks\d\.\d+)\.proj\.0\.", r"\1.norm."),
    (r"^(blocks\d\.\d+)\.proj\.1\.", r"\1.large_kernel."),
    (r"^(blocks\d\.\d+)\.proj\.2\.", r"\1.bn."),
    (r"^(blocks\d\.\d+)\.proj\.3\.proj\.1\.", r"\1.se.fc1."),
    (r"^(blocks\d\.\d+)\.proj\.3\.proj\.3\.", r"\1.se.fc2."),
    (r"^(blocks\d\.\d+)\.proj\.4\.", r"\1.mlp.fc1."),
    (r"^(blocks\d\.\d+)\.proj\.6\.", r"\1.mlp.dwconv."),
    (r"^(blocks\d\.\d+)\.proj\.7\.", r"\1.mlp.grn."),
    (r"^(blocks\d\.\d+)\.proj\.8\.", r"\1.mlp.fc2."),
    (r"^(blocks\d\.\d+)\.ls\.", r"\1.layer_scale."),
    # Dynamic block (sub_blocksN.j)
    (r"^(sub_blocks\d\.\d+)\.x_scale\.", r"\1.alpha."),
    (r"^(sub_blocks\d\.\d+)\.h_scale\.", r"\1.beta."),
    (r"^(sub_blocks\d\.\d+)\.fusion\.0\.", r"\1.fusion.dwconv."),
    (r"^(sub_blocks\d\.\d+)\.fusion\.1\.", r"\1.fusion.bn."),
    (r"^(sub_blocks\d\.\d+)\.fusion\.3\.", r"\1.fusion.proj."),
    (r"^(sub_blocks\d\.\d+)\.fusion\.4\.", r"\1.fusion.grn."),
    (r"^(sub_blocks\d\.\d+)\.weight_query\.0\.", r"\1.contmix.query.conv."),
    (r"^(sub_blocks\d\.\d+)\.weight_query\.1\.", r"\1.contmix.query.bn."),
    (r"^(sub_blocks\d\.\d+)\.weight_key\.1\.", r"\1.contmix.key.conv."),
    (r"^(sub_blocks\d\.\d+)\.weight_key\.2\.", r"\1.contmix.key.bn."),
    (r"^(sub_blocks\d\.\d+)\.weight_proj\.", r"\1.contmix.kernel_proj."),
    (r"^(sub_blocks\d\.\d+)\.rpb1$", r"\1.contmix.rpb_small"),
    (r"^(sub_blocks\d\.\d+)\.rpb2$", r"\1.contmix.rpb_large"),
    (r"^(sub_blocks\d\.\d+)\.dyconv_proj\.0\.", r"\1.out_proj.conv."),
    (r"^(sub_blocks\d\.\d+)\.dyconv_proj\.1\.", r"\1.out_proj.bn."),
    (r"^(sub_blocks\d\.\d+)\.lepe\.0\.", r"\1.lepe.conv."),
    (r"^(sub_blocks\d\.\d+)\.lepe\.1\.", r"\1.lepe.bn."),
    (r"^(sub_blocks\d\.\d+)\.se_layer\.proj\.1\.", r"\1.se.fc1."),
    (r"^(sub_blocks\d\.\d+)\.se_layer\.proj\.3\.", r"\1.se.fc2."),
    (r"^(sub_blocks\d\.\d+)\.gate\.0\.", r"\1.gate.conv."),
    (r"^(sub_blocks\d\.\d+)\.gate\.1\.", r"\1.gate.bn."),
    (r"^(sub_blocks\d\.\d+)\.proj\.0\.", r"\1.proj.bn."),
    (r"^(sub_blocks\d\.\d+)\.proj\.1\.", r"\1.proj.conv."),
    (r"^(sub_blocks\d\.\d+)\.mlp\.0\.", r"\1.mlp.fc1."),
    (r"^(sub_blocks\d\.\d+)\.mlp\.2\.", r"\1.mlp.dwconv."),
    (r"^(sub_blocks\d\.\d+)\.mlp\.3\.", r"\1.mlp.grn."),
    (r"^(sub_blocks\d\.\d+)\.mlp\.4\.", r"\1.mlp.fc2."),
    # Where each block and downsample sits
    (r"^blocks1\.", "base.stages.0.blocks."),
    (r"^blocks2\.", "base.stages.1.blocks."),
    (r"^blocks3\.", "base.stages.2.blocks."),
    (r"^blocks4\.", "overview.blocks."),
    (r"^sub_blocks3\.", "focus.stages.0.blocks."),
    (r"^sub_blocks4\.", "focus.stages.1.blocks."),
    (r"^patch_embed1\.0\.", "base.stem.conv1."),
    (r"^patch_embed1\.1\.", "base.stem.bn1."),
    (r"^patch_embed1\.3\.", "base.stem.conv2."),
    (r"^patch_embed1\.4\.", "base.stem.bn2."),
    (r"^patch_embed1\.6\.", "base.stem.conv3."),
    (r"^patch_embed1\.7\.", "base.stem.bn3."),
    (r"^patch_embed1\.9\.", "base.stem.conv4."),
    (r"^patch_embed1\.10\.", "base.stem.bn4."),
    (r"^patch_embed2\.0\.", "base.stages.1.downsample.conv."),
    (r"^patch_embed2\.1\.", "base.stages.1.downsample.bn."),
    (r"^patch_embed3\.0\.", "base.stages.2.downsample.conv."),
    (r"^patch_embed3\.1\.", "base.stages.2.downsample.bn."),
    (r"^patch_embed4\.0\.", "overview.downsample.conv."),
    (r"^patch_embed4\.1\.", "overview.downsample.bn."),
    (r"^high_level_proj\.", "context.proj."),
    (r"^patch_embedx\.x_proj\.0\.", "focus.stages.1.downsample.x.conv."),
    (r"^patch_embedx\.x_proj\.1\.", "focus.stages.1.downsample.x.bn."),
    (r"^patch_embedx\.h_proj\.0\.", "focus.stages.1.downsample.prior.conv."),
    (r"^patch_embedx\.h_proj\.1\.", "focus.stages.1.downsample.prior.bn."),
    (r"^head\.0\.", "head.proj."),
    (r"^head\.1\.", "head.bn."),
    (r"^head\.4\.", "head.fc."),
    (r"^aux_head\.0\.", "aux_head.bn."),
    (r"^aux_head\.2\.", "aux_head.fc."),
]
_COMPILED = [(re.compile(pattern), repl) for pattern, repl in OFFICIAL_KEY_TABLE]
MAX_LISTED = 8


def official_to_overlock(key: str) -> str:
    """One published-checkpoint key -> the name of the same tensor in an overlock model."""
    for pattern, repl in _COMPILED:
        key = pattern.sub(repl, key)
    return key


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _shape_mismatches(weights: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> list[str]:
    return [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in weights.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]


def _mismatch_report(title: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    """The lines of a strict-loading error: what is missing, unexpected and mis-shaped."""
    parts = [title]
    if missing:
        parts.append(_listing("missing from the checkpoint", missing))
    if unexpected:
        parts.append(_listing("in the checkpoint but not in the model", unexpected))
    if mismatched:
        parts.append(_listing("shape mismatch", mismatched))
    return parts


def convert_official(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state dict for `model`, checking it strictly (names and shapes)."""
    state_dict = state_dict.get("model", state_dict) if "model" in state_dict else state_dict
    target = model.state_dict()
    converted = {official_to_overlock(k): v for k, v in state_dict.items()}
    missing = sorted(set(target) - set(converted))
    unexpected = sorted(set(converted) - set(target))
    mismatched = _shape_mismatches(converted, target)
    if missing or unexpected or mismatched:
        parts = _mismatch_report(
            "the state dict does not match the model built from this spec:", missing, unexpected, mismatched
        )
        if getattr(model, "features_only", False):
            parts.append(
                "  hint: this is a features-only model: load classification weights with "
                "overlock.builder.load_backbone(model, state_dict), which drops the heads and lists what is new"
            )
        deploy_ckpt = any(k.endswith("lk_origin.bias") for k in state_dict)
        deploy_model = any(k.endswith(".lk.bias") for k in target)
        if deploy_ckpt != deploy_model:
            form = "re-parameterised (deploy)" if deploy_ckpt else "training"
            parts.append(
                f"  hint: the checkpoint is in {form} form; build the model {'with' if deploy_ckpt else 'without'} --deploy"
            )
        else:
            parts.append(
                "  hint: is this the checkpoint of another variant? Build from the matching preset (xt, t, s, b)."
            )
        raise CheckpointError("\n".join(parts))
    return converted


def load_official(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a state dict in the published checkpoints' layout into `model`, strictly."""
    model.load_state_dict(convert_official(model, state_dict), strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# Classification weights into a features-only (dense-prediction) model

#: Top-level modules only a features-only model has (their weights are new, trained downstream).
FEATURES_ONLY_MODULES = ("pyramid",)
#: Top-level modules only a classifier has (their weights are dropped from the file).
CLASSIFIER_MODULES = ("head", "aux_head")


@dataclass
class BackboneLoad:
    """What `load_backbone` did besides loading the backbone: the names it reports."""

    new: list[str]
    dropped: list[str]

    def __str__(self) -> str:
        return "\n".join(
            [
                "loaded the backbone; not in the weights, left at their initialisation:",
                _listing("new (features-only outputs)", self.new),
                "in the weights but not used by a features-only model:",
                _listing("dropped (classifier heads)", self.dropped),
            ]
        )


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def load_backbone(model: nn.Module, state_dict: Mapping[str, Any]) -> BackboneLoad:
    """Load classification weights (ours or the published layout) into a `features_only` model.

    The heads in the file are dropped and the features-only outputs (pyramid norms and context
    projection) stay new; both are listed in the result. Everything else is strict: any other
    missing, unexpected or mis-shaped tensor is a CheckpointError, as in `load_official`.
    `state_dict` may also be anything `overlock.checkpoint.load_file` returns for a weights file
    (a model file such as a run's best.safetensors, a run checkpoint: their model weights are used).
    """
    from ..training.checkpoint import model_state

    target = model.state_dict()
    weights = dict(model_state(dict(state_dict)))
    if not set(weights) & set(target):  # the published layout?
        weights = {official_to_overlock(k): v for k, v in weights.items()}
    new = sorted(k for k in target if k not in weights)
    dropped = sorted(k for k in weights if k not in target)
    missing = [k for k in new if _top(k) not in FEATURES_ONLY_MODULES]
    unexpected = [k for k in dropped if _top(k) not in CLASSIFIER_MODULES]
    mismatched = _shape_mismatches(weights, target)
    if missing or unexpected or mismatched:
        title = "the classification weights do not match the backbone built from this spec:"
        raise CheckpointError("\n".join(_mismatch_report(title, missing, unexpected, mismatched)))
    model.load_state_dict({k: v for k, v in weights.items() if k in target}, strict=False)
    return BackboneLoad(new=new, dropped=dropped)
