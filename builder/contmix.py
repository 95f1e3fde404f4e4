"""ContMix, the context-mixing dynamic convolution (ARCHITECTURE.md section 4)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .layers import (
    GELU,
    GRN,
    DilatedRepConv,
    FoldingSequential,
    LargeKernelBN,
    Pointwise,
    RegionPool,
    adaptive_avg_pool,
    conv_bn,
    cpu_channels_last,
    exporting,
    generic_trace,
    hooked,
    recompute_saved,
    resize_bilinear,
    shared_recipe,
    split_channels,
)


def logits_through_keys(proj: nn.Module) -> bool:
    """Whether ContMix computes its kernel logits as q (k^T W^T) + b instead of (q k^T) W^T + b.

    The same values (float rounding aside), with the projection W applied to the S*S region
    centres once per image and head instead of to every token's S*S affinities: at Focus-Net shapes
    (c = 16 channels per head, S*S = 49, k*k + K*K = 194) a token's product falls from 16*49 +
    49*194 to 16*194 MACs, and the backward keeps the queries instead of the wider affinities.
    Only where a gradient is taken: at inference on the CPU, oneDNN's linear on the affinities is
    faster (the logits' memory, not the MACs, is the cost there; `benchmarks/layers_ab.py`).
    Traces (fvcore's FLOP count), exports and hooks on the projection see the published form.
    (Where the C kernels form the logits themselves, `forms_logits_inside`, no map is computed at all.)
    """
    return torch.is_grad_enabled() and not (hooked(proj) or torch.jit.is_tracing() or exporting())


def logits_from_mixed_keys(queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B * heads, HW, c) @ (B * heads, c, k*k + K*K) (+ bias): the kernel logits from the queries
    and the projected keys (`logits_through_keys`), the bias added as the product is written."""
    return torch.bmm(queries, keys) if bias is None else torch.baddbmm(bias, queries, keys)


def forms_logits_inside(proj: nn.Module, backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ContMix hands its queries and projected keys to the kernels, which form the logits
    themselves (`kernels.contmix_from_queries`; float32 CPU, eagerly, the C library built), instead
    of computing the logits map. In training and at inference: no logits in memory beats both ways
    of computing them (`logits_through_keys`). Traces (fvcore's FLOP count), exports and hooks on
    the projection see the published form.
    """
    if hooked(proj) or torch.jit.is_tracing() or exporting():
        return False
    return kernels.logits_formed_inside(backend, *tensors)


class ContMix(nn.Module):
    """Context-mixing dynamic convolution.

    Each token's kernels come from its affinity to SxS region centres of a context: queries from
    the token's features, keys from the pooled context; a shared 1x1 conv turns the S*S affinities
    into the logits of a small and a large kernel, which (with relative position biases, softmax)
    aggregate the value's neighbourhoods through `kernels.contmix`.

    Inside a Focus-Net dynamic block the context is the prior P (`forward(z, normed)`: queries from
    the feature part of LN(cat(x, P)), keys from its context part); anywhere else it is the input
    itself (`forward(x)`, the authors' stand-alone ContMix layer), and `key_width` equals `width`.
    """

    def __init__(
        self, width: int, key_width: int, kernel_size: int, small_kernel_size: int, groups: int, region_centers: int
    ) -> None:
        super().__init__()
        self.width = width
        self.kernel_size = kernel_size
        self.small_kernel_size = small_kernel_size
        self.heads = 2 * groups
        self.scale = (width // self.heads) ** -0.5
        self.contmix_backend = "auto"
        self.query = conv_bn(width, width // 2)
        # Keys: the SxS region centres of the context.
        self.key = FoldingSequential(
            OrderedDict(
                pool=RegionPool(region_centers),
                **dict(conv_bn(key_width, width // 2).named_children()),
            )
        )
        self.kernel_proj = Pointwise(region_centers**2, small_kernel_size**2 + kernel_size**2)
        self.rpb_small = nn.Parameter(torch.zeros(self.heads, 2 * small_kernel_size - 1, 2 * small_kernel_size - 1))
        self.rpb_large = nn.Parameter(torch.zeros(self.heads, 2 * kernel_size - 1, 2 * kernel_size - 1))

    def mixing_size(self, height: int, width: int) -> tuple[int, int]:
        """Maps smaller than the large kernel are mixed at an upscaled size (reference behaviour).

        The reference: the short side becomes K and the long side int(K / short * long) when the
        short side is below K; otherwise the size is kept. Written branch-free, with 0/1 indicators
        from integer min/max, so that under torch.export (symbolic height and width) the choice is
        part of the graph, which then serves every input size, instead of a guard on the size.
        With plain ints it computes the same numbers (tests compare it with the reference formula).
        """
        k = self.kernel_size
        if isinstance(height, torch.Tensor):  # a size-generic jit trace: sizes are 0-dim int64 tensors
            maximum, to_int = torch.maximum, lambda v: v.trunc().long()
            step = lambda n: n.clamp(0, 1)  # noqa: E731
            # float64 tensor / tensor, as Python's k / width (a scalar numerator would be multiplied by
            # the reciprocal: 13 / 7 * 7 gave 12.999..., one less after truncation)
            real_k = torch.full((), float(k), dtype=torch.float64)
            real_height, real_width = height.double(), width.double()
        else:
            maximum, to_int = torch.sym_max, torch.sym_int
            step = lambda n: torch.sym_min(1, torch.sym_max(0, n))  # noqa: E731 - 1 if n > 0 else 0
            real_k, real_height, real_width = k, height, width

        tall = step(height - width + 1) * step(k - width)  # width is the short side and below K
        wide = step(width - height) * step(k - height)  # height is the short side and below K
        up_height = to_int(real_k / real_width * real_height)
        up_width = to_int(real_k / real_height * real_width)
        return (
            maximum(height, maximum(k * wide, up_height * tall)),
            maximum(width, maximum(k * tall, up_width * wide)),
        )

    def _projected_keys(self, key: torch.Tensor) -> torch.Tensor:
        """k^T W^T: the kernel projection applied to the region centres' keys (B, heads, c, S*S) ->
        (B, heads, c, k*k + K*K), once per image and head instead of to every token's affinities."""
        return torch.einsum("bgcl,pl->bgcp", key, self.kernel_proj.weight.flatten(1))

    def _mix_from_queries(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value_small: torch.Tensor,
        value_large: torch.Tensor,
        size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both kernels' mixing with their logits q (k^T W^T) + b formed inside the kernels
        (`kernels.contmix_from_queries`): the logits are never a map, forward or backward."""
        proj = self.kernel_proj
        keys = self._projected_keys(key)
        queries = query.unflatten(-1, size).permute(0, 1, 3, 4, 2)  # (B, heads, H, W, c), a view
        parts = [self.small_kernel_size**2, self.kernel_size**2]
        keys_small, keys_large = keys.split(parts, dim=-1)
        bias_small, bias_large = (None, None) if proj.bias is None else proj.bias.split(parts)
        out_small = kernels.contmix_from_queries(
            queries,
            keys_small,
            bias_small,
            self.rpb_small,
            value_small,
            self.small_kernel_size,
            backend=self.contmix_backend,
        )
        out_large = kernels.contmix_from_queries(
            queries,
            keys_large,
            bias_large,
            self.rpb_large,
            value_large,
            self.kernel_size,
            backend=self.contmix_backend,
        )
        return out_small, out_large

    def _mix_through_logits(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value_small: torch.Tensor,
        value_large: torch.Tensor,
        size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both kernels' mixing from the logits map (`kernels.contmix`): traced, exported, compiled,
        hooked, or on a backend other than the CPU's C kernels."""
        batch, heads = query.shape[:2]
        h, w = size
        proj = self.kernel_proj
        if logits_through_keys(proj):
            mixed_keys = self._projected_keys(key).flatten(0, 1)
            queries = query.transpose(-1, -2).flatten(0, 1)  # (B * heads, HW, c), a view

            def project_all() -> torch.Tensor:
                return logits_from_mixed_keys(queries, mixed_keys, proj.bias)

            recompute = project_all
        else:
            affinity = torch.einsum("bgcn,bgcl->bgnl", query, key)

            def project_all() -> torch.Tensor:
                # the S*S axis as channels, and back: (B, heads, HW, k*k + K*K)
                return proj(affinity.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

            def recompute() -> torch.Tensor:
                return proj._conv_forward(affinity.permute(0, 3, 1, 2), proj.weight, proj.bias).permute(0, 2, 3, 1)

        def kernel_logits(project: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, ...]:
            logits = project().reshape(batch, heads, h, w, -1)
            return logits.split([self.small_kernel_size**2, self.kernel_size**2], dim=-1)

        small, large = kernel_logits(project_all)
        # The logits of both kernels are the widest map ContMix keeps for its backward; the kernel
        # projection (kept anyway: its inputs and weight) recomputes them there, once for both ops.
        # (Not when hooks on the projection see its output: one may have changed it.)
        again = shared_recipe(lambda: kernel_logits(recompute))

        def keeping(logits: torch.Tensor, part: int) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext() if hooked(proj) else recompute_saved(logits, lambda: again()[part])

        with keeping(small, 0):
            out_small = kernels.contmix(
                small, self.rpb_small, value_small, self.small_kernel_size, backend=self.contmix_backend
            )
        with keeping(large, 1):
            out_large = kernels.contmix(
                large, self.rpb_large, value_large, self.kernel_size, backend=self.contmix_backend
            )
        return out_small, out_large

    def forward(self, z: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        """z: the values (B, d, H, W); normed: LN(cat(x, P)) (d + c channels: queries from the first
        d, keys from the rest), or a tensor of d channels giving both queries and keys (self context
        with values that differ from them, as in `ContMixBlock`), or None to take both from z."""
        height, width = z.shape[-2:]
        generic = generic_trace()
        if torch.jit.is_tracing() and not generic:  # jit traces (fvcore's FLOP counter) see sizes as tensors
            height, width = int(height), int(width)
        size = self.mixing_size(height, width)
        # Exported graphs always take the resize path: at an unchanged size it is the identity, and
        # the graph then serves every input size (eager runs skip it when it is not needed).
        resize = exporting() or generic or size != (height, width)
        if resize:
            z = resize_bilinear(z, size)
            if normed is not None:
                normed = resize_bilinear(normed, size)
        batch, d = z.shape[:2]
        h, w = size
        heads = self.heads
        if normed is None or normed.shape[1] == d:
            query_source = key_source = z if normed is None else normed
        else:
            query_source, key_source = split_channels(normed, d)
        query = self.query(query_source) * self.scale
        key = self.key(key_source)
        query = query.reshape(batch, heads, -1, h * w)
        key = key.reshape(batch, heads, -1, key.shape[-2] * key.shape[-1])
        if cpu_channels_last(z):
            # A view of the (B, H, W, d) memory, no copy; its gradient comes back channels_last like
            # z's other gradients (an NCHW one would make every add that sums them mix layouts).
            value = z.permute(0, 2, 3, 1).view(batch, h, w, 2, heads, -1).permute(3, 0, 4, 1, 2, 5)
        else:
            value = z.reshape(batch, 2, heads, d // (2 * heads), h, w).permute(1, 0, 2, 4, 5, 3)
        value_small, value_large = value.unbind(0)
        proj = self.kernel_proj
        if forms_logits_inside(proj, self.contmix_backend, value_small, query, key, proj.weight, self.rpb_small):
            out_small, out_large = self._mix_from_queries(query, key, value_small, value_large, size)
        else:
            out_small, out_large = self._mix_through_logits(query, key, value_small, value_large, size)
        # (B, 2h, H, W, c) -> (B, d, H, W) in the channels_last layout the convs after it prefer
        # (one copy, as the NCHW reshape was).
        out = torch.cat([out_small, out_large], dim=1).permute(0, 2, 3, 1, 4).reshape(batch, h, w, d)
        out = out.permute(0, 3, 1, 2)
        if exporting():
            out = adaptive_avg_pool(out, height, width)
        elif resize:
            out = F.adaptive_avg_pool2d(out, (height, width))
        return out


# The parts of the dynamic block around its mixer (ARCHITECTURE.md section 4), shared by
# blocks.DynamicBlock and ContMixBlock; module names are those of the published checkpoints.
def fusion_layer(in_channels: int, out_channels: int) -> FoldingSequential:
    """dwconv3x3 -> BN -> GELU -> conv1x1 -> GRN: in the dynamic block it merges features and prior into z."""
    return FoldingSequential(
        OrderedDict(
            dwconv=nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels),
            bn=nn.BatchNorm2d(in_channels),
            act=GELU(),
            proj=Pointwise(in_channels, out_channels),
            grn=GRN(out_channels),
        )
    )


def gate_layer(width: int) -> FoldingSequential:
    """SiLU(BN(conv1x1(z))): multiplies the mixed output."""
    gate = conv_bn(width, width)
    gate.add_module("act", nn.SiLU())
    return gate


def lepe_layer(width: int, kernel_size: int, deploy: bool) -> LargeKernelBN:
    """BN(DilatedRepConv(K)(z)): the local positional encoding added to the mixed output (the BN folds
    into the merged kernel in eval: `LargeKernelBN`)."""
    return LargeKernelBN(OrderedDict(conv=DilatedRepConv(width, kernel_size, deploy), bn=nn.BatchNorm2d(width)))


def output_projection(width: int, out_channels: int) -> FoldingSequential:
    """BN -> conv1x1 (with bias): the last step of the dynamic block's mixing branch."""
    return FoldingSequential(OrderedDict(bn=nn.BatchNorm2d(width), conv=Pointwise(width, out_channels)))


class ContMixBlock(nn.Module):
    """ContMix with the dynamic block's mixing branch around it, on the input alone (self context).

    The Focus-Net dynamic block without its context prior, as a token mixer for any block: the
    paper's Table 7 puts ContMix into a Swin-like test bed that has no Overview-Net, so there is no
    prior and the region centres come from the input itself. With every part on:

        z = fusion(x)                                  # optional: the dynamic block's fusion
        out = out_proj(ContMix(values z, queries and keys from x)) + lepe(z)
        out = gate(z) * out
        return proj(out)

    `fusion` off: z = x. `projections` off: no out_proj and no proj. The parts are the dynamic
    block's (same builders, same names).
    """

    def __init__(
        self,
        width: int,
        kernel_size: int,
        small_kernel_size: int,
        groups: int,
        region_centers: int,
        *,
        fusion: bool,
        gate: bool,
        lepe: bool,
        projections: bool,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.fusion = fusion_layer(width, width) if fusion else None
        self.gate = gate_layer(width) if gate else None
        self.lepe = lepe_layer(width, kernel_size, deploy) if lepe else None
        self.contmix = ContMix(width, width, kernel_size, small_kernel_size, groups, region_centers)
        self.out_proj = conv_bn(width, width) if projections else None
        self.proj = output_projection(width, width) if projections else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x if self.fusion is None else self.fusion(x)
        out = self.contmix(z, x)
        if self.out_proj is not None:
            out = self.out_proj(out)
        if self.lepe is not None:
            out = out + self.lepe(z)
        if self.gate is not None:
            out = self.gate(z) * out
        return out if self.proj is None else self.proj(out)
