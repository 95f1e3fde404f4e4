"""overlock models in timm's registry: `import overlock.timm_models`, then `timm.create_model("overlock_t")`.

Importing this module registers every shipped preset as `overlock_<preset>` (overlock_xt,
overlock_t, overlock_s, overlock_b, overlock_pico); `register_spec(name, spec)` registers any
spec (a YAML path, a preset name or a `Spec`) under a name of your choice. timm stays optional:
only this module imports it (pip install 'overlock[timm]').

The module is not called `overlock/timm.py` on purpose: the repository root is the package, and
a `timm.py` there would shadow the real timm for anyone running Python from the checkout.

Supported `create_model` arguments: `num_classes` (0: no classifier, forward returns pre-logits),
`drop_path_rate`, `drop_rate` (the head's dropout), `in_chans`, `features_only` with
`out_indices`, `pretrained_cfg` / `pretrained_cfg_overlay` (stored on the model). overlock never
downloads weights: `pretrained=True` is refused; load weights with `checkpoint_path=` (a plain
state dict) or overlock's loaders (`overlock.builder.load_official`, `load_backbone`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.models import register_model

from . import archspec
from .builder import OverLoCK, build

__all__ = ["create", "register_spec", "registered"]

_REGISTERED: dict[str, archspec.SpecSource] = {}


def create(
    spec: archspec.SpecSource,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    drop_path_rate: float | None = None,
    drop_rate: float | None = None,
    in_chans: int | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | None = None,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    **unused: Any,
) -> OverLoCK:
    """Build `spec` the way timm's factory arguments ask (see the module docstring)."""
    unused.pop("cache_dir", None)
    if unused:
        raise TypeError(
            f"overlock models do not take {', '.join(sorted(unused))} (supported: see overlock.timm_models)"
        )
    if pretrained:
        raise ValueError(
            "overlock does not download weights: create the model with pretrained=False and load a local file "
            "with checkpoint_path=... or overlock.builder.load_official / load_backbone"
        )
    overrides = []
    if num_classes is not None:
        overrides.append(f"head.num_classes={max(num_classes, 1)}")
    if drop_path_rate is not None:
        overrides.append(f"drop_path_rate={drop_path_rate}")
    if drop_rate is not None:
        overrides.append(f"head.dropout={drop_rate}")
    if in_chans is not None:
        overrides.append(f"in_channels={in_chans}")
    resolved = archspec.load(spec, overrides)
    if resolved.head.num_classes is None and not features_only:
        resolved = archspec.load(resolved, ["head.num_classes=1000"])
    model = build(resolved, features_only=features_only)
    if num_classes == 0 and not features_only:
        model.reset_classifier(0)
    if features_only and out_indices is not None:
        model.set_out_indices(out_indices)
    cfg = dict(model.pretrained_cfg)
    if isinstance(pretrained_cfg, dict):
        cfg.update({k: v for k, v in pretrained_cfg.items() if v is not None and k in cfg})
    cfg.update(pretrained_cfg_overlay or {})
    model.pretrained_cfg = cfg
    return model


def register_spec(name: str, spec: archspec.SpecSource) -> Callable[..., OverLoCK]:
    """Register `spec` with timm as `name` (validated now, so a bad spec fails here, not in create_model)."""
    resolved = archspec.load(spec)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> OverLoCK:
        return create(resolved, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"overlock model {resolved.name or name} (spec registered by overlock.timm_models)"
    _REGISTERED[name] = resolved
    return register_model(entrypoint)


def registered() -> list[str]:
    """The names this module registered with timm."""
    return sorted(_REGISTERED)


for _preset in archspec.preset_names():
    register_spec(f"overlock_{_preset}", _preset)
