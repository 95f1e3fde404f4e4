"""The OverLoCK network: Base-Net -> Overview-Net -> context prior -> Focus-Net -> heads.

Module names mirror the spec (`base.stages.1.blocks.0`, `overview.blocks.0`,
`focus.stages.0.blocks.3`), so a parameter's name says where in the spec it comes from. The model
never reads files: it is constructed from a validated `Spec`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..archspec import BlockStage, Spec
from .blocks import BasicBlock, ContMix, DynamicBlock
from .conventions import TimmConventions
from .layers import GRN, DilatedRepConv, LayerNorm2d, LayerScale, conv_bn


def stem(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """Four 3x3 convs (two of stride 2) to 1/4 resolution."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    plan = [(in_channels, hidden, 2), (hidden, hidden, 1), (hidden, out_channels, 2), (out_channels, out_channels, 1)]
    for i, (cin, cout, stride) in enumerate(plan, start=1):
        layers[f"conv{i}"] = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(cout)
        if i < len(plan):
            layers[f"act{i}"] = nn.GELU()
    return nn.Sequential(layers)


class BlockStageModule(nn.Module):
    """Optional /2 downsample (conv3x3 s2 + BN) followed by basic blocks."""

    def __init__(
        self, stage: BlockStage, in_channels: int | None, rates: list[float], spec: Spec, deploy: bool
    ) -> None:
        super().__init__()
        self.downsample = conv_bn(in_channels, stage.width, 3, 2) if in_channels is not None else None
        self.blocks = nn.Sequential(
            *(
                BasicBlock(stage, rate, norm=spec.norm.block, res_scale=spec.residual_scaling, deploy=deploy)
                for rate in rates
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class BaseNet(nn.Module):
    """Encodes low- and mid-level features; returns every stage's output (the last is x16)."""

    def __init__(self, spec: Spec, rates: list[float], deploy: bool) -> None:
        super().__init__()
        stages = spec.base.stages
        self.stem = stem(spec.in_channels, spec.stem_width, stages[0].width)
        self.stages = nn.ModuleList()
        start = 0
        for i, stage in enumerate(stages):
            previous = stages[i - 1].width if i else None
            self.stages.append(BlockStageModule(stage, previous, rates[start : start + stage.depth], spec, deploy))
            start += stage.depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class FocusDownsample(nn.Module):
    """Halves features and prior together: x via conv3x3 s2 + BN to the new width, P likewise."""

    def __init__(self, in_width: int, out_width: int, context_width: int) -> None:
        super().__init__()
        self.x = conv_bn(in_width, out_width, 3, 2)
        self.prior = conv_bn(context_width, context_width, 3, 2)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x(x), self.prior(prior)


class FocusStageModule(nn.Module):
    def __init__(self, index: int, spec: Spec, rates: list[float], deploy: bool) -> None:
        super().__init__()
        stage = spec.focus.stages[index]
        c = spec.context_width
        self.width = stage.width
        self.downsample = FocusDownsample(spec.focus.stages[index - 1].width, stage.width, c) if index else None
        self.blocks = nn.ModuleList(
            DynamicBlock(
                stage,
                c,
                rate,
                # The very first Focus-Net block starts from P = P0: nothing to re-inject.
                reinject_prior=spec.context.reinject_prior and not (index == 0 and j == 0),
                gate=spec.context.gate,
                norm=spec.norm.block,
                res_scale=spec.residual_scaling,
                deploy=deploy,
            )
            for j, rate in enumerate(rates)
        )

    def forward(self, x: torch.Tensor, prior: torch.Tensor, prior0: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            f = block(x, prior, prior0)
            x, prior = f[:, : self.width], f[:, self.width :]
        return f


class FocusNet(nn.Module):
    """Refines x16 under the context prior; returns cat(x, P) of every stage."""

    def __init__(self, spec: Spec, rates: list[float], deploy: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        start = 0
        for i, stage in enumerate(spec.focus.stages):
            self.stages.append(FocusStageModule(i, spec, rates[start : start + stage.depth], deploy))
            start += stage.depth

    def forward(self, x: torch.Tensor, prior0: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        prior = None
        for stage in self.stages:
            if stage.downsample is not None:
                x, prior = stage.downsample(x, prior)
            # P0 at this stage's resolution: bilinear from /32 where the sizes differ.
            here = prior0 if prior0.shape[-2:] == x.shape[-2:] else _resize(prior0, x.shape[-2:])
            if prior is None:
                prior = here
            f = stage(x, prior, here)
            outputs.append(f)
            x, prior = f[:, : stage.width], f[:, stage.width :]
        return outputs


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ClassifierHead(nn.Module):
    """conv1x1 (no bias) -> BN -> SiLU -> global average pool -> dropout -> conv1x1 -> logits."""

    def __init__(self, in_channels: int, projection: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, projection, 1, bias=False)
        self.bn = nn.BatchNorm2d(projection)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Conv2d(projection, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.act(self.bn(self.proj(x)))))).flatten(1)


class AuxHead(nn.Module):
    """BN -> global average pool -> conv1x1 on the Overview-Net output (training only)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.bn(x))).flatten(1)


class PyramidOutputs(nn.Module):
    """Dense-prediction outputs (ARCHITECTURE.md section 2): normed pyramid levels, the deepest one
    enriched with the Overview-Net context through a small layer-scaled projection."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        c = spec.context_width
        widths = [s.width for s in spec.base.stages[:-1]] + [s.width + c for s in spec.focus.stages]
        self.norms = nn.ModuleList(LayerNorm2d(w) for w in widths)
        self.context_norm = LayerNorm2d(spec.overview.width)
        self.context_proj = nn.Conv2d(spec.overview.width, widths[-1], 1)
        self.context_scale = LayerScale(widths[-1], 1e-5)

    def forward(self, levels: list[torch.Tensor], context: torch.Tensor) -> list[torch.Tensor]:
        out = [norm(level) for norm, level in zip(self.norms, levels, strict=True)]
        extra = self.context_proj(self.context_norm(context))
        if extra.shape[-2:] != out[-1].shape[-2:]:
            extra = _resize(extra, out[-1].shape[-2:])
        out[-1] = out[-1] + self.context_scale(extra)
        return out


class OverLoCK(TimmConventions, nn.Module):
    """A deep-stage-decomposition ConvNet built from a Spec ("overview first, look closely next").

    Training mode returns {"main", "aux"} logits when the spec has an aux head, eval mode the main
    logits; with `features_only` the model has no heads and returns the pyramid levels.
    """

    def __init__(self, spec: Spec, deploy: bool = False, features_only: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.features_only = features_only
        n_base, n_focus = sum(s.depth for s in spec.base.stages), sum(s.depth for s in spec.focus.stages)
        rates = torch.linspace(0, spec.drop_path_rate, spec.total_blocks).tolist()
        c = spec.context_width
        self.base = BaseNet(spec, rates[:n_base], deploy)
        self.overview = BlockStageModule(
            spec.overview, spec.base.stages[-1].width, rates[n_base : n_base + spec.overview.depth], spec, deploy
        )
        self.context = nn.Module()
        self.context.proj = nn.Conv2d(spec.overview.width, c, 1)  # P0 = conv1x1(ctx)
        # Without Base-Net features, Focus-Net starts from the upsampled overview (top-down only).
        self.focus_input = (
            None if spec.context.base_features else conv_bn(spec.overview.width, spec.focus.stages[0].width)
        )
        self.focus = FocusNet(spec, rates[len(rates) - n_focus :], deploy)
        last = spec.focus.stages[-1].width + c
        if features_only:
            self.pyramid = PyramidOutputs(spec)
        else:
            num_classes = spec.head.num_classes
            assert num_classes is not None, "builder.build resolves open num_classes"
            self.head = ClassifierHead(last, spec.head.projection, num_classes, spec.head.dropout)
            self.aux_head = AuxHead(spec.overview.width, num_classes) if spec.head.aux_head else None
        self.apply(_init_weights)

    # -- forward -----------------------------------------------------------------------------------
    def _stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        base_out = self.base(x)
        ctx = self.overview(base_out[-1])
        prior0 = self.context.proj(ctx)
        if self.focus_input is not None:
            start = self.focus_input(_resize(ctx, base_out[-1].shape[-2:]))
        else:
            start = base_out[-1]
        return base_out, self.focus(start, prior0), ctx

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cat(x, P) after the last Focus-Net stage, Overview-Net context) before the heads."""
        _, focus_out, ctx = self._stages(x)
        return focus_out[-1], ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor] | list[torch.Tensor]:
        if self.features_only:
            base_out, focus_out, ctx = self._stages(x)
            return self.pyramid(base_out[:-1] + focus_out, ctx)
        features, ctx = self.forward_features(x)
        logits = self.head(features)
        if self.training and self.aux_head is not None:
            return {"main": logits, "aux": self.aux_head(ctx)}
        return logits

    # -- utilities ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reparameterize(self) -> OverLoCK:
        """Fold every DilatedRepConv into one conv in place (eval outputs stay equal)."""
        for module in self.modules():
            if isinstance(module, DilatedRepConv):
                module.reparameterize()
        return self

    def set_contmix_backend(self, backend: str) -> None:
        """Pick the ContMix implementation of every Focus-Net block (see `kernels.BACKENDS`)."""
        kernels.check_backend(backend)
        for module in self.modules():
            if isinstance(module, ContMix):
                module.contmix_backend = backend

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW must not decay: norms, biases, layer scales, position biases."""
        skip: set[str] = set()
        exempt = (nn.BatchNorm2d, nn.LayerNorm, GRN, LayerScale)
        for module_name, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if isinstance(module, exempt) or name == "bias" or name.startswith("rpb") or param.ndim <= 1:
                    skip.add(full)
        return skip


def _init_weights(module: nn.Module) -> None:
    """Reference initialisation: truncated normal (std 0.02) convs, zero biases (section 6).

    The reference truncates at +-2 absolute, i.e. 100 standard deviations: a clamped normal draw is
    the same distribution, without erfinv, which made building B take ~9 s on CPU.
    """
    if isinstance(module, nn.Conv2d | nn.Linear):
        with torch.no_grad():
            module.weight.normal_(std=0.02).clamp_(-2.0, 2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
