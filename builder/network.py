"""The networks a spec describes: the OverLoCK DDS network and the plain pyramid baseline.

DDS: Base-Net -> Overview-Net -> context prior -> Focus-Net -> heads. Pyramid: stem -> stages
(optionally with a top-down feedback) -> head. Module names mirror the spec (`base.stages.1.blocks.0`,
`overview.blocks.0`, `focus.stages.0.blocks.3`, `stages.2.blocks.1`), so a parameter's name says
where in the spec it comes from. A model never reads files: it is constructed from a validated spec.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from ..archspec import BlockStage, DDSSpec, PyramidSpec
from .blocks import BasicBlock, ContMix, DynamicBlock, StaticFocusBlock
from .conventions import TimmConventions
from .layers import (
    GRN,
    DilatedRepConv,
    LayerNorm2d,
    LayerScale,
    Pointwise,
    block_norm,
    conv_bn,
    generic_trace,
    recomputation_off,
    resize_bilinear,
    split_channels,
)
from .mixers import DOWNSAMPLES, STEMS


# -- gradient checkpointing ------------------------------------------------------------------------
class Checkpointed(nn.Module):
    """A stage whose blocks can be recomputed in the backward instead of keeping their activations.

    `model.set_grad_checkpointing(True)` turns it on for every stage. Gradients are those of the
    plain run (the RNG state is replayed, so drop path drops the same samples), and BN running
    statistics are updated once, not again during the recomputation.
    """

    grad_checkpointing = False

    def run_block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                block, *args, use_reentrant=False, context_fn=lambda: (recomputation_off(), _recompute_context(block))
            )
        return block(*args)


@contextmanager
def _recompute_context(module: nn.Module):
    with recomputation_off(), _bn_stats_frozen(module):
        yield


@contextmanager
def _bn_stats_frozen(module: nn.Module):
    """During a checkpoint's recomputation: BN normalises with batch statistics as in the forward,
    but leaves its running statistics as the forward left them."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


# -- stages ----------------------------------------------------------------------------------------
class BlockStageModule(Checkpointed):
    """Optional /2 downsample followed by basic blocks (Base-Net, Overview-Net, pyramid stages)."""

    def __init__(
        self,
        stage: BlockStage,
        path: str,
        in_channels: int | None,
        rates: list[float],
        spec: DDSSpec | PyramidSpec,
        deploy: bool,
    ) -> None:
        super().__init__()
        block = spec.resolved_block(path)
        self.downsample = (
            DOWNSAMPLES[spec.downsample.type](in_channels, stage.width, spec.norm.block)
            if in_channels is not None
            else None
        )
        hidden = int(stage.width * stage.mlp_ratio)
        self.blocks = nn.ModuleList(
            BasicBlock(
                stage.width,
                hidden,
                block,
                stage.layer_scale,
                rate,
                res_scale=spec.residual_scaling,
                deploy=deploy,
                index=j,
            )
            for j, rate in enumerate(rates)
        )

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.run_block(block, x)
        return x

    def forward(self, x: torch.Tensor, downsample: bool = True) -> torch.Tensor:
        """downsample=False: x is already at the stage's resolution (a pyramid's feedback pass)."""
        if downsample and self.downsample is not None:
            x = self.downsample(x)
        return self.run_blocks(x)


def stem_and_stages(
    spec: DDSSpec | PyramidSpec, stages: list[BlockStage], prefix: str, rates: list[float], deploy: bool
) -> tuple[nn.Module, nn.ModuleList]:
    """The /4 stem and a chain of block stages, each halving the resolution after the first
    (Base-Net, or a whole pyramid); `rates` are the stages' stochastic-depth rates in order."""
    stem = STEMS[spec.stem.type](spec.in_channels, spec.stem_width, stages[0].width, spec.norm.block)
    modules = nn.ModuleList()
    start = 0
    for i, stage in enumerate(stages):
        previous = stages[i - 1].width if i else None
        block_rates = rates[start : start + stage.depth]
        modules.append(BlockStageModule(stage, f"{prefix}.{i}", previous, block_rates, spec, deploy))
        start += stage.depth
    return stem, modules


class BaseNet(nn.Module):
    """Encodes low- and mid-level features; returns every stage's output (the last is x16)."""

    def __init__(self, spec: DDSSpec, rates: list[float], deploy: bool) -> None:
        super().__init__()
        self.stem, self.stages = stem_and_stages(spec, spec.base.stages, "base.stages", rates, deploy)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class FocusDownsample(nn.Module):
    """Halves features and prior together: x to the new width, P at its width."""

    def __init__(self, in_width: int, out_width: int, context_width: int, kind: str, norm: str) -> None:
        super().__init__()
        self.x = DOWNSAMPLES[kind](in_width, out_width, norm)
        self.prior = DOWNSAMPLES[kind](context_width, context_width, norm)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x(x), self.prior(prior)


class FocusStageModule(Checkpointed):
    """Blocks that refine (x, P) together: dynamic blocks, or static (basic) ones on cat(x, P)."""

    def __init__(self, index: int, spec: DDSSpec, rates: list[float], deploy: bool) -> None:
        super().__init__()
        stage = spec.focus.stages[index]
        block = spec.resolved_block(f"focus.stages.{index}")
        c = spec.context_width
        self.width = stage.width
        self.downsample = (
            FocusDownsample(spec.focus.stages[index - 1].width, stage.width, c, spec.downsample.type, spec.norm.block)
            if index
            else None
        )
        hidden = int(stage.width * stage.mlp_ratio)
        common = {"res_scale": spec.residual_scaling, "deploy": deploy}
        blocks = []
        for j, rate in enumerate(rates):
            # The very first Focus-Net block starts from P = P0: nothing to re-inject.
            reinject = spec.context.reinject_prior and not (index == 0 and j == 0)
            if block.kind == "dynamic":
                blocks.append(
                    DynamicBlock(
                        stage.width, c, hidden, block, stage.kernel_size, stage.layer_scale, rate,
                        reinject_prior=reinject, gate=spec.context.gate, index=j, **common,
                    )
                )  # fmt: skip
            else:
                blocks.append(
                    StaticFocusBlock(
                        stage.width, c, hidden, block, stage.layer_scale, rate, reinject_prior=reinject, index=j,
                        **common,
                    )
                )  # fmt: skip
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, prior: torch.Tensor, prior0: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            f = self.run_block(block, x, prior, prior0)
            x, prior = split_channels(f, self.width)
        return f


class FocusNet(nn.Module):
    """Refines x16 under the context prior; returns cat(x, P) of every stage."""

    def __init__(self, spec: DDSSpec, rates: list[float], deploy: bool) -> None:
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
            same = prior0.shape[-2:] == x.shape[-2:] and not generic_trace()
            here = prior0 if same else resize_bilinear(prior0, x.shape[-2:])
            if prior is None:
                prior = here
            f = stage(x, prior, here)
            outputs.append(f)
            x, prior = split_channels(f, stage.width)
        return outputs


class ClassifierHead(nn.Module):
    """conv1x1 (no bias) -> BN -> SiLU -> global average pool -> dropout -> conv1x1 -> logits (OverLoCK);
    without a projection: norm -> global average pool -> dropout -> conv1x1 (Swin/ConvNeXt style)."""

    def __init__(self, in_channels: int, projection: int | None, num_classes: int, dropout: float, norm: str) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_size = projection or in_channels  # channels of the pre-logits
        if projection is None:
            self.norm = block_norm(norm, in_channels)
        else:
            self.proj = Pointwise(in_channels, projection, bias=False)  # a product on channels_last CPU maps
            self.bn = nn.BatchNorm2d(projection)
            self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Conv2d(self.hidden_size, num_classes, 1)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, hidden_size, 1, 1): everything before the dropout and the classifier."""
        x = self.norm(x) if hasattr(self, "norm") else self.act(self.bn(self.proj(x)))
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pre_logits(x))).flatten(1)


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

    def __init__(self, spec: DDSSpec) -> None:
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
        if extra.shape[-2:] != out[-1].shape[-2:] or generic_trace():
            extra = resize_bilinear(extra, out[-1].shape[-2:])
        out[-1] = out[-1] + self.context_scale(extra)
        return out


# -- models ----------------------------------------------------------------------------------------
class SpecModel(TimmConventions, nn.Module):
    """What every network built from a spec offers, whatever its topology.

    Training mode returns {"main", "aux"} logits when the model has an aux head, eval mode the main
    logits; with `features_only` the model has no heads and returns its feature levels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor] | list[torch.Tensor]:
        if self.features_only:
            return self.forward_levels(x)
        features, aux_input = self.forward_features(x)
        logits = self.head(features)
        if self.training and self.aux_head is not None:
            return {"main": logits, "aux": self.aux_head(aux_input)}
        return logits

    @torch.no_grad()
    def reparameterize(self) -> SpecModel:
        """Fold every re-parameterisable part (DilatedRepConv) into one conv in place (eval outputs stay equal)."""
        for module in self.modules():
            if isinstance(module, DilatedRepConv):
                module.reparameterize()
        return self

    def set_contmix_backend(self, backend: str) -> None:
        """Pick the ContMix implementation of every ContMix mixer (see `kernels.BACKENDS`)."""
        kernels.check_backend(backend)
        for module in self.modules():
            if isinstance(module, ContMix):
                module.contmix_backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of storing them (timm's name):
        less memory for large inputs, same gradients, about one more forward of compute."""
        for module in self.modules():
            if isinstance(module, Checkpointed):
                module.grad_checkpointing = enable

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


class OverLoCK(SpecModel):
    """A deep-stage-decomposition ConvNet built from a spec ("overview first, look closely next")."""

    def __init__(self, spec: DDSSpec, deploy: bool = False, features_only: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.features_only = features_only
        n_base, n_focus = sum(s.depth for s in spec.base.stages), sum(s.depth for s in spec.focus.stages)
        rates = torch.linspace(0, spec.drop_path_rate, spec.total_blocks, device="cpu").tolist()
        c = spec.context_width
        self.base = BaseNet(spec, rates[:n_base], deploy)
        self.overview = BlockStageModule(
            spec.overview,
            "overview",
            spec.base.stages[-1].width,
            rates[n_base : n_base + spec.overview.depth],
            spec,
            deploy,
        )
        self.context = nn.Module()
        self.context.proj = nn.Conv2d(spec.overview.width, c, 1)  # P0 = conv1x1(ctx)
        # Without Base-Net features, Focus-Net starts from the upsampled overview (top-down only).
        self.focus_input = (
            None if spec.context.base_features else conv_bn(spec.overview.width, spec.focus.stages[0].width)
        )
        self.focus = FocusNet(spec, rates[len(rates) - n_focus :], deploy)
        last = spec.focus.stages[-1].width + c
        self.aux_head = None
        if features_only:
            self.pyramid = PyramidOutputs(spec)
        else:
            head = spec.head
            assert head.num_classes is not None, "builder.build resolves open num_classes"
            self.head = ClassifierHead(last, head.projection, head.num_classes, head.dropout, spec.norm.block)
            self.aux_head = AuxHead(spec.overview.width, head.num_classes) if head.aux_head else None
        self.apply(_init_weights)

    def _stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        base_out = self.base(x)
        ctx = self.overview(base_out[-1])
        prior0 = self.context.proj(ctx)
        if self.focus_input is not None:
            start = self.focus_input(resize_bilinear(ctx, base_out[-1].shape[-2:]))
        else:
            start = base_out[-1]
        return base_out, self.focus(start, prior0), ctx

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cat(x, P) after the last Focus-Net stage, Overview-Net context) before the heads."""
        _, focus_out, ctx = self._stages(x)
        return focus_out[-1], ctx

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four dense-prediction levels (/4, /8, /16, /32) of ARCHITECTURE.md section 2."""
        base_out, focus_out, ctx = self._stages(x)
        return self.pyramid(base_out[:-1] + focus_out, ctx)

    def _level_output(self, index: int, raw: torch.Tensor) -> torch.Tensor:
        """Levels above the deepest are the stage output, normed (PyramidOutputs)."""
        return self.pyramid.norms[index](raw)


class PyramidNet(SpecModel):
    """The plain hierarchical baseline: stem (/4), stages that each halve the resolution, one head.

    With `feedback` (the paper's "recurrent" model): after one pass, the source stage's output is
    upsampled, concatenated to the target stage's input, projected back to its width (conv1x1 +
    BN), and the target stage and every later one run again with the same weights.
    """

    def __init__(self, spec: PyramidSpec, deploy: bool = False, features_only: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.features_only = features_only
        rates = torch.linspace(0, spec.drop_path_rate, spec.total_blocks, device="cpu").tolist()
        stages = spec.stages
        self.stem, self.stages = stem_and_stages(spec, stages, "stages", rates, deploy)
        fb = spec.feedback
        self.feedback = (
            conv_bn(stages[fb.target].width + stages[fb.source].width, stages[fb.target].width) if fb else None
        )
        self.aux_head = None  # a pyramid has no Overview-Net to put one on
        if not features_only:
            head = spec.head
            assert head.num_classes is not None, "builder.build resolves open num_classes"
            self.head = ClassifierHead(
                stages[-1].width, head.projection, head.num_classes, head.dropout, spec.norm.block
            )
        self.apply(_init_weights)

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, shallow to deep (after the feedback pass, if any)."""
        x = self.stem(x)
        inputs, outputs = [], []
        for stage in self.stages:
            x = stage.downsample(x) if stage.downsample is not None else x
            inputs.append(x)
            x = stage(x, downsample=False)  # through the stage module, so hooks on stages.N see it
            outputs.append(x)
        if self.feedback is not None:
            target, source = self.spec.feedback.target, self.spec.feedback.source
            entry = inputs[target]
            x = self.feedback(torch.cat([entry, resize_bilinear(outputs[source], entry.shape[-2:])], dim=1))
            for i in range(target, len(self.stages)):
                stage = self.stages[i]
                x = stage(x, downsample=i > target)
                outputs[i] = x
        return outputs

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(last stage's output, None): pyramids have no context and no aux head."""
        return self.forward_levels(x)[-1], None

    def _final_at_first_output(self, index: int) -> bool:
        """With feedback, the target stage and every later one run again."""
        return self.feedback is None or index < self.spec.feedback.target


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
