"""timm's model conventions for overlock networks, as a mixin the model class inherits.

Detection, segmentation and training libraries built around timm expect a model to answer a
handful of questions: how many classes and features (`num_classes`, `num_features`), which
modules produce the feature pyramid (`feature_info`, `out_indices`), how to run the head alone
(`forward_head`) or the backbone up to its intermediate levels (`forward_intermediates`), how to
swap the classifier (`reset_classifier`, `get_classifier`), how parameters group by depth for
layer-wise lr decay (`group_matcher`), and what input the weights expect (`pretrained_cfg`).

The mixin knows nothing of a topology's internals. It relies on module names
(`[base.]stem`, `[base.|focus.]stages.N.downsample`, `...stages.N.blocks.M`, `overview.*`,
`head.pre_logits`, `head.drop`, `head.fc`) and on what the model computes: the pyramid levels are found
by running the model once on a small input and taking, per stride, the last stage whose output
has that stride (for the deep-stage decomposition: Base-Net stages 0 and 1, then the Focus-Net
stages, which supersede Base-Net stage 2 and the Overview-Net; for a plain pyramid: every stage).
`set_grad_checkpointing` lives on the model class itself.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..training.augment import IMAGENET_MEAN, IMAGENET_STD

#: Modules that may produce a pyramid level: a stage of any sub-network.
_STAGE = re.compile(r"^(?:base\.|focus\.)?stages\.\d+$")
#: Side of the input used to discover the levels (every /32 map is still 2x2 there).
_PROBE_SIZE = 64


class _StopEarly(Exception):
    """Raised by a forward hook to end a forward once the deepest requested level is computed."""


class FeatureInfo(list):
    """A list of {"num_chs", "reduction", "module", "index"} dicts with timm's accessors."""

    def _get(self, key: str, idx: int | list[int] | None) -> Any:
        if idx is None:
            return [level[key] for level in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | list[int] | None = None) -> Any:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | list[int] | None = None) -> Any:
        return self._get("reduction", idx)

    def module_name(self, idx: int | list[int] | None = None) -> Any:
        return self._get("module", idx)


class TimmConventions:
    """timm's model API (see the module docstring); mixed into `OverLoCK` (an `nn.Module`)."""

    default_img_size: int = 224

    # -- the pyramid levels --------------------------------------------------------------------
    def _pyramid_levels(self) -> FeatureInfo:
        """Every level (all out indices), discovered once by a probe forward and cached."""
        cached = self.__dict__.get("_overlock_levels")
        if cached is not None:
            return cached
        outputs: dict[str, torch.Size] = {}
        hooks = [
            module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out.shape))
            for name, module in self.named_modules()
            if _STAGE.match(name)
        ]
        parameter = next(self.parameters())
        probe = torch.zeros(1, self.spec.in_channels, _PROBE_SIZE, _PROBE_SIZE, dtype=parameter.dtype)
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                self(probe.to(parameter.device))
        finally:
            self.train(was_training)
            for hook in hooks:
                hook.remove()
        last_per_stride: dict[int, tuple[str, torch.Size]] = {}
        for name, shape in outputs.items():  # dicts keep execution order
            last_per_stride[_PROBE_SIZE // shape[-1]] = (name, shape)
        levels = FeatureInfo(
            {"num_chs": int(shape[1]), "reduction": stride, "module": name, "index": i}
            for i, (stride, (name, shape)) in enumerate(sorted(last_per_stride.items()))
        )
        self.__dict__["_overlock_levels"] = levels
        return levels

    @property
    def out_indices(self) -> tuple[int, ...]:
        """The levels a features-only model returns (all of them unless `set_out_indices` chose)."""
        chosen = self.__dict__.get("_overlock_out_indices")
        return chosen if chosen is not None else tuple(range(len(self._pyramid_levels())))

    def set_out_indices(self, indices: list[int] | tuple[int, ...]) -> None:
        """Make a features-only model's forward return only these levels (negative counts from the end)."""
        count = len(self._pyramid_levels())
        resolved = tuple(i % count for i in indices if -count <= i < count)
        if len(resolved) != len(tuple(indices)) or not resolved:
            raise ValueError(f"out_indices {tuple(indices)}: this model has {count} levels (0..{count - 1})")
        self.__dict__["_overlock_out_indices"] = resolved
        old = self.__dict__.pop("_overlock_select_hook", None)
        if old is not None:
            old.remove()
        if resolved != tuple(range(count)):
            self.__dict__["_overlock_select_hook"] = self.register_forward_hook(
                lambda _m, _i, out: [out[i] for i in resolved] if isinstance(out, list) else out
            )

    @property
    def feature_info(self) -> FeatureInfo:
        """Channels, stride and producing module of each level (only `out_indices` on features-only models)."""
        levels = self._pyramid_levels()
        if getattr(self, "features_only", False):
            return FeatureInfo(levels[i] for i in self.out_indices)
        return levels

    # -- classifier ----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        head = getattr(self, "head", None)
        if head is None or isinstance(head.fc, nn.Identity):
            return 0
        return head.fc.out_channels

    @property
    def num_features(self) -> int:
        """Channels of `forward_features`' output (what the head's projection reads)."""
        head = getattr(self, "head", None)
        if head is not None:
            return head.in_channels
        return self._pyramid_levels()[-1]["num_chs"]

    @property
    def head_hidden_size(self) -> int:
        """Channels of the pre-logits (after the head's 1x1 projection)."""
        head = getattr(self, "head", None)
        return head.hidden_size if head is not None else self.num_features

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for `num_classes` (0: none, forward returns pre-logits); the backbone is kept.

        The aux head (training only) is reset alike, or dropped for 0; the spec's class count follows.
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: overlock heads pool by average only")
        fc = self.head.fc
        device, dtype = (fc.weight.device, fc.weight.dtype) if hasattr(fc, "weight") else (None, None)
        hidden = self.head_hidden_size
        self.head.fc = nn.Conv2d(hidden, num_classes, 1).to(device, dtype) if num_classes else nn.Identity()
        aux = getattr(self, "aux_head", None)
        if aux is not None:
            if num_classes:
                aux.fc = nn.Conv2d(aux.fc.in_channels, num_classes, 1).to(device, dtype)
            else:
                self.aux_head = None
        if num_classes:
            self.spec = self.spec.model_copy(
                update={"head": self.spec.head.model_copy(update={"num_classes": num_classes})}
            )

    def forward_head(self, x: torch.Tensor | tuple[torch.Tensor, ...], pre_logits: bool = False) -> torch.Tensor:
        """The classifier on `forward_features`' output; `pre_logits` stops after pooling."""
        if isinstance(x, tuple):  # forward_features returns (features, Overview-Net context)
            x = x[0]
        x = self.head.pre_logits(x)
        if pre_logits:
            return x.flatten(1)
        return self.head.fc(self.head.drop(x)).flatten(1)

    # -- intermediates ---------------------------------------------------------------------------
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The pyramid levels (timm semantics: an int n means the last n, a list picks levels).

        A features-only model returns its normed levels (`norm` is implied); a classifier returns
        the raw stage outputs and `forward_features`' output. `stop_early` ends the forward once
        the deepest requested level is computed, as timm's models do; the final features are then
        that level's output (for the deep-stage decomposition, levels 0 and 1 come from Base-Net,
        so Overview-Net and Focus-Net are skipped; the deepest level always needs the whole network).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: overlock models produce NCHW maps only")
        levels = self._pyramid_levels()
        count = len(levels)
        if indices is None:
            chosen = list(range(count))
        elif isinstance(indices, int):
            chosen = list(range(count - indices, count))
        else:
            chosen = [i % count for i in indices]
        features_only = getattr(self, "features_only", False)
        deepest = max(chosen)
        stop = stop_early and deepest < count - 1 and self._final_at_first_output(deepest)
        if features_only and not stop:
            hook = self.__dict__.get("_overlock_select_hook")
            everything = self.forward.__func__(self, x) if hook is not None else self(x)
            picked = [everything[i] for i in chosen]
            return picked if intermediates_only else (everything[-1], picked)
        modules = dict(self.named_modules())
        captured: dict[int, torch.Tensor] = {}

        def capture(index: int, output: torch.Tensor) -> None:
            captured[index] = output
            if stop and index == deepest:
                raise _StopEarly

        hooks = [
            modules[levels[i]["module"]].register_forward_hook(lambda _m, _i, out, i=i: capture(i, out)) for i in chosen
        ]
        features = None
        try:
            features = self.forward_levels(x) if features_only else self.forward_features(x)
        except _StopEarly:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        if features_only:  # stopped early: the levels as forward would have returned them
            picked = [self._level_output(i, captured[i]) for i in chosen]
            return picked if intermediates_only else (picked[chosen.index(deepest)], picked)
        picked = [captured[i] for i in chosen]
        if intermediates_only:
            return picked
        if features is None:
            return captured[deepest], picked
        return (features[0] if isinstance(features, tuple) else features), picked

    def _final_at_first_output(self, index: int) -> bool:
        """Whether level `index` is final when its module first returns (a topology that runs a
        stage again, like a pyramid with feedback, says otherwise for those levels)."""
        return True

    def _level_output(self, index: int, raw: torch.Tensor) -> torch.Tensor:
        """What a features-only forward returns for level `index` (not the deepest) from its stage output."""
        return raw

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ):
        """timm's hook to drop unused layers; overlock keeps every layer (Focus-Net needs them all)."""
        if prune_head and hasattr(self, "head"):
            self.reset_classifier(0)
        count = len(self._pyramid_levels())
        return list(range(count - indices, count)) if isinstance(indices, int) else list(indices)

    # -- parameter groups ------------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters by depth: stem, then each stage's downsample and blocks.

        Groups are ordered as the sub-networks run (Base-Net, Overview-Net, context projection,
        Focus-Net); heads match nothing and so form the last group, as in timm.
        """
        names = {name for name, _ in self.named_modules()}
        matcher: dict[str, Any] = {"stem": r"^(?:base\.)?stem\."}
        stage = r"\.(\d+)" if coarse else r"\.(\d+)\.blocks\.(\d+)"
        for key, prefix in (("stages", "stages"), ("base", "base.stages")):
            if f"{prefix}.0" in names:
                escaped = re.escape(prefix)
                matcher[key] = [(rf"^{escaped}\.(\d+)\.downsample\.", (0,)), (rf"^{escaped}{stage}\.", None)]
        if "overview" in names:
            blocks = r"^overview\.blocks\." if coarse else r"^overview\.blocks\.(\d+)\."
            matcher["overview"] = [(r"^overview\.downsample\.", (0,)), (blocks, None)]
        if "focus.stages.0" in names:
            matcher["focus"] = [
                (r"^(?:context|focus_input)\.", (-1,)),
                (r"^focus\.stages\.(\d+)\.downsample\.", (0,)),
                (rf"^focus\.stages{stage}\.", None),
            ]
        return matcher

    # -- what the weights expect ---------------------------------------------------------------
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's description of the expected input; settable (timm's factories assign it)."""
        given = self.__dict__.get("_overlock_pretrained_cfg")
        if given is not None:
            return given
        size = self.default_img_size
        return {
            "url": "",
            "num_classes": self.num_classes,
            "input_size": (self.spec.in_channels, size, size),
            "pool_size": (size // 32, size // 32),
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "first_conv": "base.stem.conv1" if hasattr(self, "base") else "stem.conv1",
            "classifier": "head.fc",
        }

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict[str, Any]) -> None:
        self.__dict__["_overlock_pretrained_cfg"] = dict(value)

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: dict[str, Any]) -> None:
        self.pretrained_cfg = value
