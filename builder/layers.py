"""Small layers shared by OverLoCK blocks (ARCHITECTURE.md sections 3 and 4).

Each layer computes exactly what the reference computes (same op order where rounding could
differ), because the presets must reproduce the published models' outputs for the same weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import kernels
from ..archspec import DILATED_REPCONV_BRANCHES
from ..kernels.autocast import autocast_input
from ..kernels.depthwise import batch_normed_sum, batch_normed_sum_applies, depthwise_conv2d
from ..kernels.native import cpuinfo_value


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels only, on NCHW tensors (eps 1e-6 as in the reference). Under
    autocast the output is in autocast's dtype: the 1x1 convs after it read it (`autocast_input`)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return autocast_input(x.permute(0, 3, 1, 2))


def block_norm(kind: str, channels: int) -> nn.Module:
    """The norm in front of token mixers and MLPs: `norm.block` of the spec."""
    return LayerNorm2d(channels) if kind == "layernorm" else nn.BatchNorm2d(channels)


# Floor of the sum of squares in GRN's channels_last energy: keeps sqrt's gradient finite for an
# all-zero map (its energy stays ~1e-15, not 0).
GRN_ENERGY_FLOOR = 1e-30
GRN_MEAN_EPS = 1e-6  # added to the channels' mean energy before dividing by it


def grn_energy(x: torch.Tensor, squares: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2 norm over H, W of every (b, c) map, mask of the maps where its gradient is not zero), (B, C, 1, 1).

    `squares`: those maps' sums of squares, (B, C, 1, 1), where the op that made x summed them already.
    """
    if squares is None:
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            energy = torch.linalg.vector_norm(x, ord=2, dim=(-1, -2), keepdim=True)
            return energy, energy > 0
        # vector_norm over H, W of channels_last data is 3-25x slower than a sum of squares.
        squares = x.square().sum(dim=(-1, -2), keepdim=True)
    return squares.clamp_min(GRN_ENERGY_FLOOR).sqrt(), squares > GRN_ENERGY_FLOOR


def grn_statistics(
    x: torch.Tensor, gamma: torch.Tensor, squares: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRN's (energy, live mask, channel mean of the energy + eps, scale = 1 + gamma * energy / mean),
    each (B, C, 1, 1) but the mean's (B, 1, 1, 1): GRN(x) = x * scale + beta."""
    energy, live = grn_energy(x, squares)
    mean = energy.mean(dim=1, keepdim=True) + GRN_MEAN_EPS
    return energy, live, mean, torch.addcmul(torch.ones_like(energy), gamma, energy / mean)


class _GRNFunction(torch.autograd.Function):
    """GRN with a hand-written backward: 3x faster forward+backward than autograd's (224 x 56 x 56, cl).

    Autograd's backward of x * (1 + gamma * n(x)) + beta makes ~8 passes over the map (the product
    rule's two terms, the square's backward, their sum, three reductions). Written out,
    with A = sum_hw(g * x), e the energy, m = mean_c(e) + eps, n = e / m:
        grad_beta = sum_bhw g,  grad_gamma = sum_b A * n,  dn = A * gamma,
        de = dn / m - sum_c(dn * e) / (C m^2),  grad_x = g * scale + x * de / e,
    i.e. two reductions and one multiply-add over the map: on float32 channels_last CPU maps two
    passes in C (`kernels.grn`: the reductions together, then the gradient). With
    `gradient_in_place` the multiply-add writes over g (see `GRN.forward`).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, squares, gradient_in_place):
        energy, live, mean, scale = grn_statistics(x, gamma, squares)
        ctx.save_for_backward(x, gamma, energy, live, mean, scale)
        ctx.gradient_in_place = gradient_in_place
        ctx.mark_non_differentiable(scale)
        return torch.addcmul(beta, x, scale), scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        x, gamma, energy, live, mean, scale = ctx.saved_tensors
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        # The gradient in x's layout (mixed layouts make every pass strided; the Focus-Net fusion's
        # GRN gets an NCHW gradient for channels_last data).
        grad = grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        in_place = ctx.gradient_in_place and not grad.requires_grad  # (not a graph of a double backward)
        compiled = kernels.grn.native_applies(grad, x)  # both passes over the map in C
        if compiled:
            response, grad_sums = kernels.grn.backward_sums(grad, x)
            grad_beta = grad_sums.sum(dim=0, keepdim=True)
        else:
            grad_beta = grad.sum(dim=(0, 2, 3), keepdim=True)
            response = (grad * x).sum(dim=(-1, -2), keepdim=True)
        grad_gamma, coef = _grn_backward_coefficients(response, gamma, energy, live, mean)
        if compiled:
            grad_x = kernels.grn.input_grad(grad, x, scale, coef, overwrite=in_place)
            return grad_x, grad_gamma, grad_beta, None, None
        grad_x = grad.mul_(scale) if in_place else grad * scale
        grad_x.addcmul_(x, coef)
        return grad_x, grad_gamma, grad_beta, None, None


def _grn_backward_coefficients(
    response: torch.Tensor, gamma: torch.Tensor, energy: torch.Tensor, live: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRN's (grad_gamma, coef) from A = sum_hw(g * x), all (B, C, 1, 1) but grad_gamma: x's gradient
    is then g * scale + x * coef (the formulas of `_GRNFunction`)."""
    grad_gamma = (response * (energy / mean)).sum(dim=0, keepdim=True)
    d_normed = response * gamma
    d_energy = d_normed / mean - (d_normed * energy).sum(dim=1, keepdim=True) / (energy.shape[1] * mean * mean)
    return grad_gamma, torch.where(live, d_energy / energy, 0.0)


class _GRNPointwiseFunction(torch.autograd.Function):
    """fc2(GRN(x)) in training, where neither GRN's output nor its gradient is ever a map.

    With g = x * s + beta (s: GRN's per-image, per-channel scale), out = g W^T + b and dout the
    output's gradient, every reduction of the backward comes from P_b = dout_b^T x_b, one (out, C)
    matrix per image (one batched product over the map):
        grad_W = sum_b P_b * s_b + outer(sum dout, beta),   grad_b = sum dout,
        A_b = sum_hw(dg_b * x_b) = sum_o W * P_b,   grad_beta = sum_bhw dg = (sum dout) W,
    and x's gradient, dg * s + x * coef with dg = dout W, is dout_b (W * s_b) + x_b * coef: a
    scaling of x and a product added onto it. GRN's output (which fc2's weight gradient would
    read) is neither kept nor remade, and its gradient (GRN's input) is never allocated; with
    `overwrite_input` x's gradient is written over x itself, a map the backward remade for this
    op alone. ConvMLP's backward then holds two hidden-width maps at once (x and the remade fc1
    output), not three, and makes three passes over them fewer (see `ConvMLP.forward`).
    The forward is GRN's and fc2's own ops; the gradients are theirs up to float rounding.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bias, squares, overwrite_input):
        energy, live, mean, scale = grn_statistics(x, gamma, squares)
        normed = torch.addcmul(beta, x, scale)
        out = pixel_linear(normed.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
        ctx.save_for_backward(x, gamma, beta, weight, energy, live, mean, scale)
        ctx.overwrite_input, ctx.has_bias = overwrite_input, bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, gamma, beta, weight, energy, live, mean, scale = ctx.saved_tensors
        batch, channels = x.shape[:2]
        rows = grad.permute(0, 2, 3, 1).contiguous().view(batch, -1, grad.shape[1])  # (B, HW, out)
        inputs = x.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # a view: x is channels_last
        w = weight.flatten(1)  # (out, C)
        products = torch.bmm(rows.transpose(1, 2), inputs)  # P_b, (B, out, C)
        total = rows.sum(dim=(0, 1))  # (out,)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_weight = (products * scale.view(batch, 1, channels)).sum(dim=0)
            grad_weight = grad_weight.addr_(total, beta.flatten()).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = total
        response = (products * w).sum(dim=1).view(batch, channels, 1, 1)
        grad_beta = (total @ w).view_as(beta)
        grad_gamma, coef = _grn_backward_coefficients(response, gamma, energy, live, mean)
        if ctx.overwrite_input:
            grad_x = inputs.mul_(coef.view(batch, 1, channels))
        else:
            grad_x = inputs * coef.view(batch, 1, channels)
        grad_x.baddbmm_(rows, w * scale.view(batch, 1, channels))
        grad_x = grad_x.view(batch, *x.shape[2:], channels).permute(0, 3, 1, 2)
        return grad_x, grad_gamma, grad_beta, grad_weight, grad_bias, None, None


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2): rescales channels by their relative L2 energy."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def coefficients(self, x: torch.Tensor, squares: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with GRN(x) = x * scale + shift; scale (B, C, 1, 1), shift (1, C, 1, 1)."""
        return grn_statistics(x, self.gamma, squares)[3], self.beta

    def forward(
        self,
        x: torch.Tensor,
        with_recipe: bool = False,
        squares: torch.Tensor | None = None,
        input_recipe: Callable[[], torch.Tensor] | None = None,
        gradient_in_place: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """GRN(x); with_recipe: also a function that recomputes it bit for bit (for `recompute_saved`).

        `squares`: x's sums of squares over H, W as (B, C, 1, 1), when the op that made x has them
        (`kernels.gelu_dwconv3x3`): they carry no gradient, GRN differentiates through x itself.
        `input_recipe`: where x itself is not kept either, the function that recomputes x; the
        returned recipe then calls it instead of holding x.
        `gradient_in_place`: the backward writes x's gradient over the output's gradient, for a
        caller that promises the output's gradient is a fresh map nothing else reads (ConvMLP's:
        one op reads GRN's output and no hook sees either): one hidden-width map fewer.
        """
        # x + beta + gamma * x * normed, written as x * (1 + gamma * normed) + beta: one pass over x
        # instead of three (the per-channel factor is tiny). With gradients, in float32/64 and
        # eagerly, the hand-written backward (autocast, tracers and torch.compile get the plain ops).
        fused = (
            torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.float64)
            and not x.is_meta
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.jit.is_tracing()
            and not exporting()
            and not torch.compiler.is_compiling()  # inductor fuses the plain ops itself
        )
        if fused:
            out, scale = _GRNFunction.apply(x, self.gamma, self.beta, squares, gradient_in_place)
            shift = self.beta
        else:  # under autocast the output in its dtype: the MLP's second 1x1 conv reads it
            scale, shift = self.coefficients(x, squares)
            out = autocast_input(torch.addcmul(shift, x, scale))
        if not with_recipe:
            return out
        if input_recipe is not None:  # a closure over x would keep x alive as long as the graph
            return out, lambda: autocast_input(torch.addcmul(shift, input_recipe(), scale))
        return out, lambda: autocast_input(torch.addcmul(shift, x, scale))


class LayerScale(nn.Module):
    """Per-channel affine scale, w * x + b, stored as a depthwise 1x1 conv like the reference.

    The parameters keep the published checkpoints' shapes ((C, 1, 1, 1) and (C,)), but the forward
    is one element-wise multiply-add: PyTorch's CPU backend runs a depthwise 1x1 conv through a
    slow per-channel path (it cost 5-8% of an XT step). fvcore counts no element-wise op, so the
    FLOP count drops by C*H*W per layer scale (well under 0.1% of a preset).
    """

    def __init__(self, channels: int, init_value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class KeepsFolds:
    """Mixin for modules whose eval forward folds weights (a BN into the conv before it, dilated
    branches into one kernel, a residual into a centre tap): each fold is computed once and kept
    while the tensors it comes from are unchanged, instead of a dozen small ops on every call
    (inference at batch 1, where every op is short: XT 1.06x, T 1.10x; batch 8: 1.01-1.02x;
    `benchmarks/layers_ab.py --only "folds recomputed every call"`).

    A kept fold is valid while each source is the same storage at the same version (PyTorch's
    version counter, bumped by every in-place write: `load_state_dict`, edits under
    `torch.no_grad()`) and no optimizer has stepped since (`OPTIMIZER_STEPS`: fused optimizers
    write the weights without bumping their versions); the entry holds a view of each source, so a
    freed storage's address cannot come back as a different weight. `.train()`/`.eval()` and
    device or dtype moves clear the folds. Writes through `.data` bypass the version counter (as
    they bypass autograd's own checks): call `.eval()` again after them. Folds are computed afresh where a gradient flows
    into a source, while a tracer, compiler or exporter records, and for tensors that are not
    plain ones (meta, functorch, subclasses).
    """

    def kept_fold(self, key: str, sources: list[torch.Tensor | None], fold: Callable[[], object]) -> object:
        """fold(), or the value it returned for these sources before."""
        if recording():
            return fold()
        tensors = [t for t in sources if t is not None]
        if grad_flows(tensors):
            return fold()
        try:
            stamp = [OPTIMIZER_STEPS[0], *((t.data_ptr(), t._version) for t in tensors)]
        except RuntimeError:  # no storage (functorch's wrapped tensors)
            return fold()
        folds = self.__dict__.get("_folds")
        kept = folds.get(key) if folds is not None else None
        if kept is not None and kept[0] == stamp:
            return kept[2]
        with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
            value = fold()
            if all(type(t) in (torch.Tensor, nn.Parameter) and not t.is_meta for t in tensors):
                self.__dict__.setdefault("_folds", FoldStore())[key] = (stamp, [t.detach() for t in tensors], value)
        return value

    def forget_folds(self) -> None:
        self.__dict__.pop("_folds", None)

    def train(self, mode: bool = True):
        self.forget_folds()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.forget_folds()
        return super()._apply(fn, *args, **kwargs)


# How many optimizer steps this process has taken (any optimizer): a fold kept before the latest
# one is stale. `torch._fused_adamw_` (AdamW(fused=True), `overlock train`'s on the CPU) writes the
# parameters in place without bumping their version counters.
OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class FoldStore(dict):
    """A module's kept folds; copies and pickles of the module start without them."""

    def __deepcopy__(self, memo: dict) -> FoldStore:
        return FoldStore()

    def __reduce__(self):
        return (FoldStore, ())


def grad_flows(tensors) -> bool:
    """Whether autograd records a gradient into any of these tensors (None entries skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def bn_tensors(bn: nn.BatchNorm2d) -> list[torch.Tensor | None]:
    """What a fold of `bn` reads."""
    return [bn.weight, bn.bias, bn.running_mean, bn.running_var]


class ResDWConv(KeepsFolds, nn.Conv2d):
    """x + depthwise conv(x): the cheap local mixing in front of every block and inside MLPs.

    In float32/float64 the identity is folded into the kernel's centre tap (one conv, no extra
    pass over x for the sum); in half precision (autocast) the sum stays outside, so the residual
    stream keeps full precision (1 + w in bf16 would round w away).
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = not x.is_meta and torch.is_autocast_enabled(x.device.type)  # meta: shapes only (estimates)
        if x.dtype not in (torch.float32, torch.float64) or autocast:
            return x + self._conv_forward(x, self.weight, self.bias)  # not super(): TorchScript lacks it
        return self._conv_forward(x, self.folded_weight(), self.bias)

    def folded_weight(self) -> torch.Tensor:
        """The kernel with the identity in its centre tap: conv(x, folded) = x + conv(x, weight)."""
        return self.kept_fold("identity", [self.weight], self._identity_in_centre)

    def _identity_in_centre(self) -> torch.Tensor:
        centre = self.kernel_size[0] // 2
        weight = self.weight.clone()
        weight[:, :, centre, centre] += 1.0
        return weight


class Pointwise(nn.Conv2d):
    """A 1x1 conv (nn.Conv2d's parameters, names and state dict) that runs channels_last data as a matrix product.

    On channels_last CPU data the channels are innermost, so the conv is one matrix product over
    them (`pixel_linear`: oneDNN's linear where this CPU runs it faster, else F.linear); as `F.linear`
    on the (B, H, W, C) view it is 5-30% faster than oneDNN's 1x1 conv, forward
    and backward (autograd's mm-based backward; XT shapes, one thread: 745 -> 679 ms for every 1x1
    conv of a training step). The result is the same product (float rounding aside) and comes back
    channels_last. NCHW data, other devices and traced or exported graphs take the conv.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if cpu_channels_innermost(x):
            product = pixel_linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)
            return product.permute(0, 3, 1, 2)
        return super()._conv_forward(x, weight, bias)


# Products with at least this many rows (images x pixels) run through oneDNN's linear, in training
# (`onednn_linear`: its input gradients too) and at inference. It adds the bias as it writes each output tile; F.linear (MKL's addmm) first fills the whole output
# with the bias and then accumulates into it, a second pass over a map that no longer fits in cache.
# Measured (one thread, interleaved medians, `python benchmarks/pointwise.py`) on an Intel Xeon:
# 1.2-1.5x on XT's 56x56 and 28x28 maps and ContMix's kernel projection (25088, 6272 and 12544 rows
# at batch 8), 0.9-1.0x on 14x14 and 7x7 maps (1568 and 392 rows), whose outputs stay in cache.
# On other vendors' CPUs MKL does not take its fastest code paths and oneDNN's linear wins nearly
# everywhere (AMD EPYC, AVX-512: 1.03-1.11x at 1568 and most 392-row shapes, 1.07x over all of XT's
# products; the whole XT inference 1.03x, deploy form 1.04x, T 1.02x), so there every product takes it.
# In training there (round 12): XT's step 1.02x (1.08x with the other core busy) against F.linear's addmm and mm.
def onednn_linear_min_rows(vendor: str | None) -> int:
    """The row count from which a product takes oneDNN's linear on a CPU of this vendor (None: unknown)."""
    return 4096 if vendor in ("GenuineIntel", None) else 0


ONEDNN_LINEAR_MIN_ROWS = onednn_linear_min_rows(cpuinfo_value("vendor_id"))


def pixel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear over the last dimension of a CPU map's (..., C) view; through oneDNN where it is faster.

    `onednn_linear_applies` decides, in training as at inference: a product's forward and its
    recomputation in the backward (`recompute_saved`) then take the same kernel, so a recomputed
    map is bit for bit the one the forward made. The same product, float rounding aside.
    """
    if onednn_linear_applies(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) by oneDNN's linear (float32 CPU tensors), differentiable
    (`_OneDNNLinear` where a gradient is taken)."""
    if grad_flows((x, weight, bias)):
        return _OneDNNLinear.apply(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """oneDNN's linear, which has no autograd formula of its own, with F.linear's gradients: the
    input's as oneDNN's linear of the output gradient with the transposed weight (as tall a product
    as the forward; on the AMD EPYC MKL's mm ran XT's first-stage ones at 21-28 GMAC/s), the
    weight's and the bias's as autograd computes them for F.linear (mm and sum). A backward that
    builds a graph (`create_graph=True`, e.g. a gradient penalty) takes differentiable ops instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if not torch.is_grad_enabled():
            grad = grad.contiguous()
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        # The weight's gradient first: an input the backward remade (`recompute_saved`, the MLP's
        # GRN output) is then freed before the input's gradient, a map of its size, is made.
        del x
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():
                grad_x = grad.matmul(weight)
            else:
                grad_x = torch.ops.mkldnn._linear_pointwise(grad, weight.t().contiguous(), None, "none", [], "")
        return grad_x, grad_weight, grad_bias


def onednn_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN's linear may compute F.linear(x, weight, bias), and is the faster on this CPU
    (`ONEDNN_LINEAR_MIN_ROWS`): float32 CPU tensors outside autocast (which would cast F.linear's
    inputs) and torch.compile (inductor picks its own kernels)."""
    return (
        x.device.type == "cpu"
        and x.numel() >= max(1, ONEDNN_LINEAR_MIN_ROWS) * x.shape[-1]
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and _onednn_linear_available()
    )


@functools.cache
def _onednn_linear_available() -> bool:
    """PyTorch built with oneDNN and its fused linear op (the one inductor's CPU backend calls)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_channels_innermost(x: torch.Tensor) -> bool:
    """`cpu_channels_last`, or a channel slice of such a map (the Focus-Net splits cat(x, prior) and
    ContMix its normed input that way): its (B, H, W, C) view is a matrix with unit channel stride,
    which a matrix product reads in place (oneDNN's 1x1 conv takes PyTorch's slow path there)."""
    if cpu_channels_last(x):
        return True
    if x.device.type != "cpu" or x.dim() != 4 or torch.jit.is_tracing() or exporting():
        return False
    batch, channels, height, width = x.shape
    pixel = x.stride(3)
    return (
        x.stride(1) == 1
        and pixel >= channels
        and x.stride(2) == width * pixel
        and (batch == 1 or x.stride(0) == height * width * pixel)
    )


def split_channels(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x[:, :width], x[:, width:]) as `torch.split`, whose backward concatenates the two gradients.

    Slicing would give the same views, but its backward writes each gradient into a fresh NCHW map
    of zeros, so a channels_last map's gradient turns NCHW there, and every add and conv backward it
    meets mixes layouts (XT training step: ~50 such adds on 14x14 maps, 2-3x slower than unmixed).
    """
    return tuple(x.split([width, x.shape[1] - width], dim=1))


def cpu_channels_last(x: torch.Tensor) -> bool:
    """A 4-D channels_last map on the CPU, outside tracing and export: its (B, H, W, C) permuted view
    is a plain contiguous tensor, which some CPU kernels run faster than the map itself."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not (torch.jit.is_tracing() or exporting())
    )


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu, run on the (B, H, W, C) view of a channels_last CPU map.

    ATen's CPU GELU is ~1.8x slower forward and ~1.4x slower backward on a 4-D channels_last tensor
    than on the same memory seen as a contiguous NHWC tensor (224 x 56 x 56 maps, one thread);
    other elementwise ops (add, mul, SiLU, sigmoid) run alike on both. Same values, same layout out.
    """
    if not x.is_contiguous() and cpu_channels_last(x):
        return F.gelu(x.permute(0, 2, 3, 1), approximate=approximate).permute(0, 3, 1, 2)
    return F.gelu(x, approximate=approximate)


class GELU(nn.GELU):
    """nn.GELU through `gelu` (the fast view of channels_last CPU maps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate)


def exporting() -> bool:
    """True while torch.export / the ONNX exporter trace the model (sizes may be symbolic then).

    Eager runs (and fvcore's FLOP tracer) keep the plain kernels; the export paths below compute the
    same values with operations whose sizes follow the input instead of being frozen into the graph.
    """
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def recording() -> bool:
    """True while torch.compile, a tracer (fvcore's jit trace) or an exporter records the forward:
    the eager-only memory savers (`recompute_saved` recipes) step aside, as the graph plans its own."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or exporting()


_size_generic_trace = False


@contextmanager
def size_generic_trace() -> Iterator[None]:
    """While active, `torch.jit.trace` records sizes as computations on the input's shape.

    A plain trace (fvcore's FLOP counter) freezes every size-dependent choice at the traced size;
    inside this context ContMix computes its mixing size with tensor ops and always takes the
    resize path (the identity at an unchanged size), and resolution changes between levels are
    always recorded, so one TorchScript trace serves every input size (`overlock export --format
    torchscript --dynamic-size`, which checks this at other sizes).
    """
    global _size_generic_trace
    previous, _size_generic_trace = _size_generic_trace, True
    try:
        yield
    finally:
        _size_generic_trace = previous


def generic_trace() -> bool:
    """True while `size_generic_trace` is active and a jit trace is being recorded."""
    return _size_generic_trace and torch.jit.is_tracing()


def pooling_matrix(length: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, length) averaging weights of adaptive average pooling's bins along one axis.

    Bin i covers [floor(i * L / S), ceil((i + 1) * L / S)), exactly as `nn.AdaptiveAvgPool2d` splits
    it; built from `arange`s so that `length` may be a symbolic size.
    """
    index = torch.arange(bins, device=like.device)
    start = torch.div(index * length, bins, rounding_mode="floor")
    end = torch.div((index + 1) * length + bins - 1, bins, rounding_mode="floor")
    position = torch.arange(length, device=like.device)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def resize_bilinear(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=False), through PyTorch's channels_last
    kernel on CUDA.

    Its CUDA kernel for NCHW maps runs one thread per output position, each looping over batch x
    channels: 0.98 ms for XT's 7x7 -> 14x14 context prior at batch 64 on an H100 (profiled), 2% of
    the step, for a map of a few MB. The channels_last kernel runs one thread per element; the
    result goes back to the input's layout. Tracing and export see the plain call.
    """
    if x.device.type == "cuda" and x.dim() == 4 and x.is_contiguous() and not (torch.jit.is_tracing() or exporting()):
        nhwc = x.contiguous(memory_format=torch.channels_last)
        return F.interpolate(nhwc, size=size, mode="bilinear", align_corners=False).contiguous()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def adaptive_avg_pool(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, (height, width))` as two matrix products (exports for any size).

    Equal to the pooling kernel within float rounding (each bin is a weighted sum instead of a sum
    divided once); both sizes of x and the output sizes may be symbolic.
    """
    rows = pooling_matrix(x.shape[-2], height, x)
    cols = pooling_matrix(x.shape[-1], width, x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class RegionPool(nn.Module):
    """ContMix's SxS region centres: adaptive average pooling that exports for every input size.

    `nn.AdaptiveAvgPool2d` exports to ONNX as a fixed AveragePool whose window is computed from the
    traced size, so the graph only fits that size. Eagerly this runs the pooling kernel; under
    torch.export / ONNX export it runs `adaptive_avg_pool`, whose bins follow the input. No
    parameters, so state dicts are unchanged.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():
            return adaptive_avg_pool(x, self.size, self.size)
        return F.adaptive_avg_pool2d(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """The mean over H and W, (B, C, 1, 1), as a sum scaled once: what nn.AdaptiveAvgPool2d(1) computes.

    The mean's backward writes the gradient out as a fresh NCHW map, which a channels_last input's
    other gradient is then added to in mixed layouts (2-3x slower than unmixed); the sum's backward
    hands on a broadcast view instead. Tracers keep the pooling op (fvcore counts its FLOPs).
    """
    return x.sum(dim=(-2, -1), keepdim=True) / (x.shape[-2] * x.shape[-1])


class SqueezeExcite(nn.Module):
    """Channel attention: sigmoid(fc2(GELU(fc1(avgpool(x))))) * x, hidden width max(16, C // 8)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(16, channels // 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        with_recipe: bool = False,
        input_recipe: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """SE(x); with_recipe: also a function that recomputes it bit for bit from x and the gate,
        which the product keeps for its backward anyway (for `recompute_saved`). `input_recipe`:
        where the caller remakes x in the backward, its recipe (the output's recipe then reads x
        through it, so x need not be held for it)."""
        pooled = self.pool(x) if torch.jit.is_tracing() or exporting() else channel_means(x)
        gate = torch.sigmoid(self.fc2(self.act(self.fc1(pooled))))
        out = autocast_input(x * gate)  # the FFN's 1x1 conv reads it
        source = input_recipe if input_recipe is not None else (lambda: x)
        return (out, lambda: autocast_input(source() * gate)) if with_recipe else out


# Off inside gradient checkpointing (builder/network.py), whose own saved-tensor hooks must see
# every tensor the block saves.
RECOMPUTE_SAVED = contextvars.ContextVar("overlock_recompute_saved", default=True)


@contextmanager
def recomputation_off() -> Iterator[None]:
    """`recompute_saved` off: every tensor an op saves is kept as it is (gradient checkpointing,
    whose own saved-tensor hooks must see them all; the memory estimate of a block it recomputes)."""
    token = RECOMPUTE_SAVED.set(False)
    try:
        yield
    finally:
        RECOMPUTE_SAVED.reset(token)


@dataclass(frozen=True)
class _Recompute:
    """What `recompute_saved` keeps in place of a saved tensor: the shape and strides of the saved view."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # elements from the recomputed tensor's first element to the view's
    index: int = 0  # which of the watched maps (`_recomputed`)


def _span_end(tensor: torch.Tensor) -> int:
    """The address just past the last element a (non-empty, non-negatively strided) tensor reads."""
    last = sum((size - 1) * step for size, step in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.data_ptr() + (last + 1) * tensor.element_size()


def recompute_saved(
    tensor: torch.Tensor, recipe: Callable[[], torch.Tensor]
) -> contextlib.AbstractContextManager[None]:
    """Ops run inside that save `tensor` for their backward keep `recipe` instead, and call it then.

    For activations that are cheap to recompute from tensors the graph keeps anyway (a GELU's
    output from its input, GRN's output from its input and per-channel scale): the recomputed
    value is the same op on the same inputs, so the gradients are bit for bit those of the plain
    run, and one full activation map per use is not held between forward and backward.
    """
    return _recomputed([(tensor, recipe)]) if _remakes(tensor) else contextlib.nullcontext()


def _remakes(tensor: torch.Tensor) -> bool:
    """Whether the saves of `tensor` may be replaced by a recipe here."""
    # torch.compile plans what to keep and what to recompute itself (and breaks its graph at
    # saved-tensor hooks), so it gets a plain nullcontext, which it traces through. Meta tensors
    # (memory estimates) take the hooks too: the estimate then counts what a real forward keeps.
    return (
        not torch.compiler.is_compiling()  # first: dynamo cannot trace ContextVar.get
        and RECOMPUTE_SAVED.get()
        and tensor.requires_grad
        and torch.is_grad_enabled()
    )


def shared_recipe(recipe: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`recipe` for two saved tensors unpacked one after the other in one backward (a map and a
    recomputed op's output that reads it): the first call computes, the next call gets that value
    and it is forgotten, so the map is computed once and held only between the two unpacks."""
    held: list[torch.Tensor] = []

    def shared() -> torch.Tensor:
        return held.pop() if held else (held.append(value := recipe()), value)[1]

    return shared


class RecomputedOnce:
    """The recipe of a map that several ops save (a block's input after its local conv is kept by
    the norm and by the LayerScale on the skip): run at the first unpack in the backward, held
    until the last, instead of once per unpack.

    `recompute_saved` counts the saves it replaces (`packed`) and the unpacks (`unpacked`), which
    may come from several of its contexts. A direct call (another map's recipe that reads this
    one) computes it too and holds it while unpacks are still to come, but counts nothing. Unlike
    `shared_recipe` (one value for exactly two readers, one of them a direct call), the number of
    readers is whatever the forward saved; a second backward of a retained graph recomputes.
    """

    def __init__(self, recipe: Callable[[], torch.Tensor]) -> None:
        self.recipe = recipe
        self.value: torch.Tensor | None = None
        self.pending = 0

    def __call__(self) -> torch.Tensor:
        if self.value is not None:
            return self.value
        value = self.recipe()
        if self.pending > 0:
            self.value = value
        return value

    def packed(self) -> None:
        self.pending += 1

    def unpacked(self) -> torch.Tensor:
        value = self()
        self.pending -= 1
        if self.pending <= 0:
            self.value = None
        return value


def keeping(tensor: torch.Tensor, recipe: RecomputedOnce | None) -> contextlib.AbstractContextManager[None]:
    """`recompute_saved(tensor, recipe)`, or nothing where there is no recipe."""
    return contextlib.nullcontext() if recipe is None else recompute_saved(tensor, recipe)


def keeping_each(*pairs: tuple[torch.Tensor, RecomputedOnce | None]) -> contextlib.AbstractContextManager[None]:
    """`keeping` for several maps that one op saves (a product keeps both factors): saved-tensor
    hooks do not nest, only the innermost pair sees an op's saves, so one pair watches them all."""
    kept = [(tensor, recipe) for tensor, recipe in pairs if recipe is not None and _remakes(tensor)]
    return _recomputed(kept) if kept else contextlib.nullcontext()


class _Watched:
    """A map whose saves `_recomputed` replaces: its identity (never the tensor: the hooks live as
    long as the graph) and its recipe."""

    def __init__(self, tensor: torch.Tensor, recipe: Callable[[], torch.Tensor]) -> None:
        self.pointer, self.stride, self.itemsize = tensor.data_ptr(), tensor.stride(), tensor.element_size()
        self.storage = _storage_identity(tensor)
        self.end = _span_end(tensor)
        self.recipe = recipe

    def holds(self, saved: torch.Tensor) -> bool:
        """Whether `saved` is the map or a view of it: a tensor of its storage within its span."""
        return (
            self.pointer <= saved.data_ptr()
            and _span_end(saved) <= self.end
            and saved.element_size() == self.itemsize
            and _storage_identity(saved) == self.storage
        )


def _storage_identity(tensor: torch.Tensor) -> int:
    """Which storage `tensor` is a view of: its StorageImpl's address. (Not the data pointer: every
    meta storage's is 0, while a meta tensor's `data_ptr()` still counts bytes from its storage's
    start, so spans compare within one storage on every device.)"""
    return tensor.untyped_storage()._cdata


@contextlib.contextmanager
def _recomputed(pairs: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]) -> Iterator[None]:
    """The saved-tensor hooks of `recompute_saved` and `keeping_each`."""
    # The op may save a view of a map (a 1x1 conv run as `F.linear` saves the (N, C) matrix view,
    # the query projection a channel slice): any tensor of its storage whose elements lie within
    # its span is such a view, remade as the same view (shape, strides, offset) of the recipe's value.
    watched = [_Watched(tensor, recipe) for tensor, recipe in pairs]
    # The recipe runs in the backward under the forward's autocast state (its ops' dtypes then match).
    device = pairs[0][0].device.type
    # (meta, the estimates' device, has no autocast state and never runs a backward)
    autocast = (
        (False, None) if device == "meta" else (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    )

    def pack(saved: torch.Tensor) -> object:
        if saved.numel() > 0:
            for index, map_ in enumerate(watched):
                if map_.holds(saved):
                    if isinstance(map_.recipe, RecomputedOnce):
                        map_.recipe.packed()
                    offset = (saved.data_ptr() - map_.pointer) // map_.itemsize
                    return _Recompute(tuple(saved.shape), saved.stride(), offset, index)
        return saved

    def unpack(packed: object) -> torch.Tensor:
        if isinstance(packed, _Recompute):
            map_ = watched[packed.index]
            recipe = map_.recipe
            with torch.no_grad(), torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
                value = recipe.unpacked() if isinstance(recipe, RecomputedOnce) else recipe()
            if value.stride() != map_.stride:
                raise RuntimeError(
                    f"recompute_saved: the recipe's layout {value.stride()} is not the original's {map_.stride}"
                )
            return value.as_strided(packed.shape, packed.stride, value.storage_offset() + packed.offset)
        return packed

    del pairs
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# The MLP remakes fc1's output in the backward on maps of this many positions or more (stages 1 and
# 2 at 224 input) and keeps it on smaller ones (14x14, 7x7), where it is a small map whose product
# costs as much time per byte as anywhere: keeping those, a training step ran 1.03x (XT, T) for 5
# (XT) and 11 (T) MiB per image more tensors alive, 47 and 89 against convnext_tiny's 94 (round 13
# of benchmarks/results/issue10_speed.md). At larger inputs more stages remake it.
FC1_REMADE_MIN_POSITIONS = 28 * 28


class ConvMLP(nn.Module):
    """conv1x1 -> GELU -> (y + dwconv3x3 y) -> GRN -> conv1x1: the MLP of every OverLoCK block."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.fc1 = Pointwise(in_channels, hidden)
        self.act = GELU()
        self.dwconv = ResDWConv(hidden)
        self.grn = GRN(hidden)
        self.fc2 = Pointwise(hidden, out_channels)

    def forward(self, x: torch.Tensor, input_recipe: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """`input_recipe`: where the caller recomputes x in the backward, its recipe (the hidden
        map's recipe reads x through it, so x need not be held for it)."""
        # (tested before RECOMPUTE_SAVED.get(), which dynamo cannot trace)
        plain = recording()
        hidden = self.fc1(x)
        remade = None if plain else self._remade_hidden(x, input_recipe)
        source = remade if remade is not None else (lambda: hidden)
        if not plain and self._fused_middle(hidden):
            weight, bias = self.dwconv.folded_weight(), self.dwconv.bias
            if self._inference_grn(hidden):
                # GELU -> dwconv -> GRN in one compiled op, each image rescaled while it is in cache,
                # written over fc1's output, which nothing else reads (unless a hook on fc1 took it).
                grn = self.grn
                with standing_in(self.dwconv):
                    out = kernels.gelu_dwconv.gelu_dwconv3x3_grn(
                        hidden,
                        weight,
                        bias,
                        grn.gamma,
                        grn.beta,
                        GRN_ENERGY_FLOOR,
                        GRN_MEAN_EPS,
                        overwrite=not hooked(self.fc1),
                    )
                return self.fc2(out)
            # GELU -> dwconv -> GRN's energy in one pass (kernels/gelu_dwconv.py); it keeps only
            # `hidden` for its backward. GRN's input is recomputed: the op's forward once more
            # (about a third of its backward's time) for one hidden map fewer held between forward
            # and backward. On large maps GRN -> fc2 is one op that needs no more (below); its
            # backward writes GRN's input gradient over the remade input, and the middle op's
            # backward its own over the remade fc1 output: two hidden maps alive at once.
            # Elsewhere (small maps, hooks on GRN or fc2) GRN's output is recomputed too, fc2's
            # backward and GRN's take the same remade input (`shared_recipe`), and GRN's gradient
            # is written over fc2's (fc2's weight gradient made first, `_OneDNNLinear`): three.
            over_remade = remade is not None and _remakes(hidden)
            with keeping(hidden, remade), standing_in(self.dwconv):
                mixed, squares = kernels.gelu_dwconv3x3(hidden, weight, bias, gradient_over_input=over_remade)
            if self._grn_pointwise(mixed):
                # GRN -> fc2 as one op whose backward needs neither GRN's output nor its gradient
                # (`_GRNPointwiseFunction`): it keeps GRN's input, remade in the backward, and
                # writes that input's gradient over the remade map.
                grn, fc2 = self.grn, self.fc2
                with recompute_saved(mixed, lambda: kernels.gelu_dwconv3x3(source(), weight, bias)[0]):
                    with standing_in(grn):
                        return _GRNPointwiseFunction.apply(
                            mixed, grn.gamma, grn.beta, fc2.weight, fc2.bias, squares, _remakes(mixed)
                        )
            remix = shared_recipe(lambda: kernels.gelu_dwconv3x3(source(), weight, bias)[0])
            with recompute_saved(mixed, remix):
                out, recipe = self.grn(
                    mixed,
                    with_recipe=True,
                    squares=squares,
                    input_recipe=remix,
                    gradient_in_place=self._grn_gradient_in_place(),
                )
            with recompute_saved(out, recipe):
                return self.fc2(out)
        if plain or not (torch.is_grad_enabled() and RECOMPUTE_SAVED.get()):
            return self.fc2(self.grn(self.dwconv(self.act(hidden))))
        with keeping(hidden, remade):
            activated = self.act(hidden)
        # The two hidden-width maps that only the next op needs are recomputed in the backward
        # (GRN's input is kept anyway): with fc1's output, three of the MLP's four hidden maps.
        # (`gelu`, not the module: a recomputation must not fire the module's hooks a second time.)
        with recompute_saved(activated, lambda: gelu(source(), self.act.approximate)):
            mixed = self.dwconv(activated)
        out, recipe = self.grn(mixed, with_recipe=True, gradient_in_place=self._grn_gradient_in_place())
        with recompute_saved(out, recipe):
            return self.fc2(out)

    def _remade_hidden(self, x: torch.Tensor, input_recipe: Callable[[], torch.Tensor] | None) -> RecomputedOnce | None:
        """The recipe of fc1's output, or None where it must be kept.

        fc1's output, 2-4x as wide as x, is the widest map the MLP keeps for its backward (the op
        after it needs it); the backward remakes it from x, which fc1 keeps anyway for its weight
        gradient: one more fc1 product per MLP (3-6% of a training step, measured) for a quarter
        of what a training step holds. Only on maps of `FC1_REMADE_MIN_POSITIONS` or more; not when
        hooks watch fc1 (one may have changed its output).
        """
        if hooked(self.fc1) or not torch.is_grad_enabled():  # no graph, nothing kept
            return None
        if x.shape[-2] * x.shape[-1] < FC1_REMADE_MIN_POSITIONS:
            return None
        source = input_recipe if input_recipe is not None else (lambda: x)
        return RecomputedOnce(lambda: self.fc1.forward(source()))

    def _grn_gradient_in_place(self) -> bool:
        """Whether GRN's backward may write over the gradient fc2's backward hands it: fc2 makes it
        afresh and is GRN's only reader, so only a hook could hold it."""
        return not (gradient_watched(self.grn) or gradient_watched(self.fc2))

    def _grn_pointwise(self, mixed: torch.Tensor) -> bool:
        """Whether GRN -> fc2 may run as `_GRNPointwiseFunction` (training, a gradient to record): a
        float32 channels_last CPU map, fc2 a plain `Pointwise`, and no hook on GRN or fc2 (their
        calls and gradients must be seen). Off while a tracer or compiler records.

        Only on maps of at least twice as many positions as fc2 has outputs: its backward's two
        (out, C) matrices per image must be smaller than the image's map it saves (on T's 7x7 maps,
        640 outputs, they were five times larger, and a step's tensors at their peak 1.1x).
        """
        return (
            torch.is_grad_enabled()
            and mixed.shape[-2] * mixed.shape[-1] >= 2 * self.fc2.out_channels
            and mixed.dtype == torch.float32
            and cpu_channels_last(mixed)
            and type(self.fc2) is Pointwise
            and not (recording() or gradient_watched(self.grn) or gradient_watched(self.fc2))
        )

    def _inference_grn(self, hidden: torch.Tensor) -> bool:
        """Whether GRN may join the compiled op: nothing needs a gradient, no hook watches GRN."""
        watched = (hidden, self.dwconv.weight, self.dwconv.bias, self.grn.gamma, self.grn.beta)
        return not grad_flows(watched) and not hooked(self.grn)

    def _fused_middle(self, hidden: torch.Tensor) -> bool:
        """Whether GELU -> dwconv -> GRN's energy may run as the one compiled op: exact GELU, the
        3x3 ResDWConv in float32 outside autocast, a map the op takes (`native_applies`), and no
        hooks on the modules it stands in for (they must see their calls)."""
        return (
            self.act.approximate == "none"
            and self.dwconv.kernel_size == (3, 3)
            and kernels.gelu_dwconv.native_applies(hidden, self.dwconv.weight, self.dwconv.bias)  # CPU only
            and not torch.is_autocast_enabled("cpu")
            and not (hooked(self.act) or hooked(self.dwconv))
        )


class Mlp(nn.Module):
    """conv1x1 -> GELU -> conv1x1: the vanilla FFN of the paper's baselines (ViT/ConvNeXt style)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.fc1 = Pointwise(in_channels, hidden)
        self.act = GELU()
        self.fc2 = Pointwise(hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> FoldingSequential:
    """conv (no bias) + BN, the reference's downsampling and projection unit."""
    if kernel_size == 1 and stride == 1:
        conv = Pointwise(in_channels, out_channels, bias=False)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    return FoldingSequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels)))


def fuse_bn(
    kernel: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN into the conv in front of it (with or without a bias of its own)."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    shift = bn.running_mean if bias is None else bn.running_mean - bias
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - shift * scale


# While a profile watches the model (bench.module_scopes), what opens a module's named range.
PROFILE_SCOPE: contextvars.ContextVar[Callable[[nn.Module], contextlib.AbstractContextManager] | None] = (
    contextvars.ContextVar("profile_scope", default=None)
)


def standing_in(module: nn.Module) -> contextlib.AbstractContextManager:
    """Around work a fused or folded path does in place of calling `module` (which then fires no
    hooks): while a profile watches, `module`'s named range, so the profile still times it as that
    part; otherwise nothing."""
    if recording():  # (before the ContextVar, which dynamo cannot trace) a graph has no profile ranges
        return contextlib.nullcontext()
    scope = PROFILE_SCOPE.get()
    return contextlib.nullcontext() if scope is None else scope(module)


# The attribute that marks a hook as an observer (`observer`).
_OBSERVER = "overlock_observer"


def observer(hook: Callable) -> Callable:
    """Mark a forward (pre-)hook that only watches, returning nothing: a profiler range around the
    call. `hooked` does not count it, so the model runs the path it runs without it (fused ops,
    folded BNs, recomputed maps) and a profile times that path; the hook fires on the modules that
    path calls."""
    setattr(hook, _OBSERVER, True)
    return hook


def hooked(module: nn.Module) -> bool:
    """True if forward hooks would see this module's call (then it must really be called); hooks
    marked `observer` do not count."""
    tables = (
        module._forward_hooks,
        module._forward_pre_hooks,
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
    )
    return any(not getattr(hook, _OBSERVER, False) for table in tables if table for hook in table.values())


def gradient_watched(module: nn.Module) -> bool:
    """True if a hook could see, and keep, a gradient that flows through this module: a forward hook
    (`hooked`: it may put a tensor hook on the input or output) or a backward hook. A backward that
    writes over a gradient it was handed asks this of the modules that gradient passes."""
    tables = (
        module._backward_hooks,
        module._backward_pre_hooks,
        nn.modules.module._global_backward_hooks,
        nn.modules.module._global_backward_pre_hooks,
    )
    return hooked(module) or any(tables)


def foldable_bn(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether `bn(conv(x))` may run as one convolution with the BN folded in (the caller knows how to
    get the conv's kernel): an eval-mode BN with running statistics, no hooks on either module, and no
    tracer or exporter watching (fvcore counts the BN's FLOPs; exported graphs keep the model's own
    structure)."""
    return (
        isinstance(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.running_var is not None
        and not (torch.jit.is_tracing() or exporting() or hooked(conv) or hooked(bn))
    )


# The activations whose output a training FoldingSequential recomputes, as functions of the module
# and its input that fire no hooks (the module's own forward, op for op).
ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    GELU: lambda act, y: gelu(y, act.approximate),
    nn.GELU: lambda act, y: F.gelu(y, approximate=act.approximate),
    nn.SiLU: lambda act, y: F.silu(y),
}


def recomputable_bn(bn: nn.Module) -> bool:
    """Whether a BN's output may be remade in the backward from its input (`batch_norm_again`): a
    BN normalising by its batch's statistics, no hooks on it (a hook may change an output the
    recomputation would not see), eagerly (compile and export plan memory themselves)."""
    return isinstance(bn, nn.BatchNorm2d) and bn.training and not recording() and not hooked(bn)


def recomputable_bn_activation(bn: nn.Module, act: nn.Module) -> bool:
    """Whether BN -> activation may keep only the BN's input for the backward: a recomputable BN
    (`recomputable_bn`) and an activation of `ACTIVATIONS` without hooks."""
    return recomputable_bn(bn) and type(act) in ACTIVATIONS and not hooked(act)


def batch_norm_again(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """A training BN's output once more from its input: the batch's statistics, running ones untouched."""
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


def batch_normed(
    bn: nn.Module, x: torch.Tensor, input_recipe: RecomputedOnce | None = None
) -> tuple[torch.Tensor, RecomputedOnce | None]:
    """bn(x), and where the BN is recomputable (`recomputable_bn`) and a graph is recorded, the
    recipe of its output (`batch_norm_again` from x, which the BN keeps for its backward anyway):
    the ops after it keep the recipe (`keeping`), a BN pass in the backward for one map fewer held.
    `input_recipe`: x's, where x is remade too (the BN keeps that, and the recipe reads x through it)."""
    with keeping(x, input_recipe):
        out = bn(x)
    if not (torch.is_grad_enabled() and recomputable_bn(bn)):
        return out, None
    source = input_recipe if input_recipe is not None else (lambda: x)  # x: the BN keeps it anyway
    return out, RecomputedOnce(lambda: batch_norm_again(bn, source()))


def large_kernel_batch_normed(
    conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor
) -> tuple[torch.Tensor, RecomputedOnce | None]:
    """`large_kernel_bn(conv, bn, x)`, and in training the recipe of its output (`batch_normed`)."""
    if not bn.training:
        return large_kernel_bn(conv, bn, x), None
    return batch_normed(bn, conv(x))


def called_with_recipe(
    module: nn.Module, x: torch.Tensor, input_recipe: RecomputedOnce | None = None
) -> tuple[torch.Tensor, RecomputedOnce | None]:
    """module(x), and the recipe of its output where the module gives one (`forward_with_recipe`:
    a FoldingSequential or LargeKernelBN ending in a training BN) and no hook watches it (a hook
    may change an output the recipe would not see). `input_recipe`: x's, where x is remade too."""
    if hooked(module) or recording() or not hasattr(module, "forward_with_recipe"):
        with keeping(x, input_recipe):
            return module(x), None
    with standing_in(module):
        return module.forward_with_recipe(x, input_recipe)


def excited(
    se: nn.Module, x: torch.Tensor, input_recipe: RecomputedOnce | None = None
) -> tuple[torch.Tensor, RecomputedOnce | None]:
    """se(x), and the recipe of its output (SE's input times its gate, both kept by the product)
    where no hook watches SE; `input_recipe`: x's, where x is remade too."""
    if hooked(se) or recording():  # (a hook might change x in place: then x is kept as it is)
        return se(x), None
    with keeping(x, input_recipe):
        out, recipe = se(x, with_recipe=True, input_recipe=input_recipe)
    return out, RecomputedOnce(recipe)


class FoldingSequential(KeepsFolds, nn.Sequential):
    """nn.Sequential (same names, same state dict) whose eval forward folds each BN into the conv
    before it, and whose training forward keeps one map, not three, for BN -> activation -> conv.

    In eval mode a BN is a per-channel affine map, so conv -> BN is one conv with a scaled kernel
    and a shifted bias (as `reparameterize` folds DilatedRepConv): one pass over the map fewer
    (the stem, downsampling, the ContMix query/key/output projections, the gate, the fusion's
    depthwise conv). The outputs are those of the two modules, float rounding aside.

    In training, a BN keeps its input for its backward, the activation after it keeps the BN's
    output and the conv after that the activation's output: three maps of one size. The last two
    are recomputed in the backward from the first (`recompute_saved`; the BN's output computed once
    for both, `RecomputedOnce`): a BN and an activation pass more per backward, bit for bit the same
    gradients (the stem's 112x112 maps, the Focus-Net's fusion and gate). Likewise a depthwise
    conv's output kept by the BN after it (the fusion's 3x3), a BN's output kept by the conv after
    it (the Focus-Net's proj), and where the caller keeps this module's output, that of a BN,
    activation or GRN at the end (`forward_with_recipe`, `called_with_recipe`).
    """

    def forward(self, x: torch.Tensor, input_recipe: RecomputedOnce | None = None) -> torch.Tensor:
        return self.forward_with_recipe(x, input_recipe)[0]

    def forward_with_recipe(
        self, x: torch.Tensor, input_recipe: RecomputedOnce | None = None
    ) -> tuple[torch.Tensor, RecomputedOnce | None]:
        """The forward, and the recipe of its output where the backward may remake it (a training
        BN's at the end, from its input). `input_recipe`: where the caller remakes x in the
        backward, its recipe (what the modules keep of x, and the recipes that read x, use it)."""
        modules = list(self)
        index = 0
        recipe = input_recipe  # x's, while the backward may remake x
        while index < len(modules):
            module = modules[index]
            follower = modules[index + 1] if index + 1 < len(modules) else None
            if follower is not None and isinstance(module, nn.Conv2d) and foldable_bn(module, follower):
                sources = [module.weight, module.bias, *bn_tensors(follower)]
                fold = functools.partial(fuse_bn, module.weight, follower, module.bias)
                kernel, bias = self.kept_fold(str(index), sources, fold)
                activation = modules[index + 2] if index + 2 < len(modules) else None
                post_op = conv_post_op(module, activation, x, kernel, bias)
                with standing_in(module):
                    if post_op is None:
                        x = module._conv_forward(x, kernel, bias)
                    else:  # the activation too, as oneDNN writes each output tile
                        x = torch.ops.mkldnn._convolution_pointwise(
                            x, kernel, bias, module.padding, module.stride, module.dilation, module.groups, *post_op
                        )
                recipe, index = None, index + (2 if post_op is None else 3)
            elif follower is not None and recomputable_bn_activation(module, follower):
                # the conv after them, which keeps the activation's output for its weight gradient
                consumer = modules[index + 2] if index + 2 < len(modules) else None
                consumer = consumer if isinstance(consumer, nn.Conv2d) else None
                x, recipe = _bn_activation(module, follower, consumer, x, recipe)
                index += 3 if consumer is not None else 2
            elif (
                follower is not None and recomputable_bn(follower) and cheap_to_redo(module) and torch.is_grad_enabled()
            ):
                # The BN keeps the conv's output, the conv keeps (or remakes) its input: the backward
                # remakes the output, one depthwise pass for one map fewer held (the fusion's 3x3).
                with keeping(x, recipe):
                    out = module(x)
                x, recipe, index = out, conv_again(module, x, recipe), index + 1
            elif recomputable_bn(module) and (follower is None or isinstance(follower, nn.Conv2d)):
                # a BN whose output the conv after it (or the caller) keeps: remade from its input
                (x, recipe), index = batch_normed(module, x, recipe), index + 1
            elif follower is None and isinstance(module, GRN) and not (hooked(module) or recording()):
                # a GRN at the end (the fusion's): its output, for the caller, from its input and scale
                (x, recipe), index = _grn_with_recipe(module, x, recipe), index + 1
            else:
                with keeping(x, recipe):
                    x = module(x)
                recipe, index = None, index + 1
        return x, recipe


# Activations oneDNN's convolution can apply to its output as it writes it (a post-op, as inductor's
# CPU backend fuses them): module type -> the op's (attr, scalars, algorithm) for that module.
CONV_POST_OPS: dict[type[nn.Module], Callable[[nn.Module], tuple[str, list, str]]] = {
    GELU: lambda act: ("gelu", [], act.approximate),
    nn.GELU: lambda act: ("gelu", [], act.approximate),
    nn.SiLU: lambda act: ("swish", [], ""),
    nn.ReLU: lambda act: ("relu", [], ""),
}


def conv_post_op(
    conv: nn.Module, activation: nn.Module | None, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None
) -> tuple[str, list, str] | None:
    """How conv -> (folded BN) -> activation runs as one oneDNN convolution at CPU inference, or None.

    The activation then costs no pass of its own over a map that has left the cache, and no map of
    its own to allocate (the stem's 112x112 maps: ~5 ms of XT's deploy forward at batch 8). Only a
    plain zero-padded convolution (a subclass with a forward of its own, such as `Pointwise`, keeps
    it) on a float32 channels_last CPU map, with no hooks on the activation, no gradient to record
    (the op has no backward) and no tracer, compiler or exporter watching. The same values, float
    rounding aside (the activation is computed on the same outputs).
    """
    if activation is None or type(activation) not in CONV_POST_OPS or hooked(activation):
        return None
    plain = type(conv)._conv_forward is nn.Conv2d._conv_forward and conv.padding_mode == "zeros"
    if not (plain and isinstance(conv.padding, tuple) and cpu_channels_last(x)):
        return None
    if recording() or grad_flows((x, kernel, bias)) or torch.is_autocast_enabled("cpu"):
        return None
    if not (x.dtype == kernel.dtype == torch.float32 and _onednn_conv_post_ops_available()):
        return None
    return CONV_POST_OPS[type(activation)](activation)


@functools.cache
def _onednn_conv_post_ops_available() -> bool:
    """PyTorch built with oneDNN and its fused convolution op (the one inductor's CPU backend calls)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def cheap_to_redo(module: nn.Module) -> bool:
    """A depthwise conv without hooks: remaking its output costs a pass over the map (not a product)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == module.in_channels == module.out_channels
        and not hooked(module)
        and not recording()
    )


def conv_again(conv: nn.Module, x: torch.Tensor, recipe: Callable[[], torch.Tensor] | None) -> RecomputedOnce:
    """The recipe of conv(x): its forward (no hooks) on x, or on x's recipe where x has one."""
    source = recipe if recipe is not None else (lambda: x)  # x: the conv keeps it anyway
    return RecomputedOnce(lambda: conv.forward(source()))


def _bn_activation(
    bn: nn.BatchNorm2d,
    act: nn.Module,
    consumer: nn.Module | None,
    x: torch.Tensor,
    recipe: RecomputedOnce | None = None,
) -> tuple[torch.Tensor, RecomputedOnce | None]:
    """consumer(act(bn(x))) (or act(bn(x)) and the recipe of it, for the caller's op that keeps it)
    with the BN's and the activation's outputs recomputed (a conv keeps its input once: the BN's
    output is unpacked twice, by the conv's recipe and the activation's, and computed once).
    `recipe`: x's, where the BN's input is remade too."""
    normed, again = batch_normed(bn, x, recipe)
    with keeping(normed, again):
        activated = act(normed)
    # (the activation's recipe calls the BN's first, which holds its value for the activation's unpack)
    remade = None if again is None else RecomputedOnce(lambda: ACTIVATIONS[type(act)](act, again()))
    if consumer is None:
        return activated, remade
    with keeping(activated, remade):
        return consumer(activated), None


def _grn_with_recipe(
    grn: GRN, x: torch.Tensor, recipe: RecomputedOnce | None
) -> tuple[torch.Tensor, RecomputedOnce | None]:
    """grn(x), and where a graph is recorded the recipe of its output (from x, or x's recipe)."""
    with keeping(x, recipe):
        out, remade = grn(x, with_recipe=True, input_recipe=recipe)
    return out, RecomputedOnce(remade) if torch.is_grad_enabled() else None


class DilatedRepConv(KeepsFolds, nn.Module):
    """UniRepLKNet's dilated re-parameterisable depthwise large-kernel conv.

    Training form: a KxK depthwise conv + BN plus parallel dilated small depthwise convs, each with
    its own BN, summed. `reparameterize()` folds it into one KxK depthwise conv with bias whose
    eval output is identical; `deploy=True` builds that form directly.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.lk = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=deploy)
        if deploy:
            return
        self.lk_bn = nn.BatchNorm2d(channels)
        self.branches = nn.ModuleDict()
        for k, dilation in DILATED_REPCONV_BRANCHES[kernel_size]:
            padding = (dilation * (k - 1) + 1) // 2
            conv = nn.Conv2d(channels, channels, k, padding=padding, dilation=dilation, groups=channels, bias=False)
            self.branches[f"k{k}_d{dilation}"] = nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(channels)))

    @property
    def deployed(self) -> bool:
        return not hasattr(self, "branches")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self.folded()
        if folded is not None:
            return depthwise_conv2d(x, *folded)
        if self._sums_in_one_op(x):
            return self._batch_normed_sum(x)
        x = autocast_input(x)  # once for the large kernel and every branch (seven convs at K = 13 to 17)
        out = self.lk_bn(depthwise_conv2d(x, self.lk.weight))
        for branch in self.branches.values():
            conv = functools.partial(depthwise_conv2d, x, branch.conv.weight, dilation=branch.conv.dilation[0])
            small = conv()
            # Each branch's BN keeps its input (the branch output) for its backward: recomputed
            # there from x instead (a small depthwise conv), so a block holds one map instead of
            # one per branch (six fewer for K >= 13). Same op on the same inputs: same gradients.
            with recompute_saved(small, conv):
                out = out.add_(branch.bn(small))  # in place: `out` is this loop's own sum, saved by nothing
        return out

    def folded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The one kernel and bias this module computes as it is now, or None if it must run branch by branch.

        Eval-mode BNs are affine maps: they and the branches fold on the fly (as `reparameterize`
        does), so the training form infers at the cost of the deploy form. Not while BNs use batch
        statistics, nor while tracing: fvcore's FLOP count of the training form counts every
        branch, as the published one does.
        """
        if self.deployed:
            return self.one_kernel()
        if not self.foldable():
            return None
        return self.kept_fold("merged", self.fold_sources(), self.merged_kernel)

    def one_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The one kernel and bias, computed now: `lk`'s own when deployed, else `merged_kernel`."""
        return (self.lk.weight, self.lk.bias) if self.deployed else self.merged_kernel()

    def foldable(self) -> bool:
        """Whether the module computes one kernel now (`folded` is not None)."""
        return self.deployed or not (any(bn.training for bn in self._norms()) or torch.jit.is_tracing())

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [self.lk_bn, *(branch.bn for branch in self.branches.values())]

    def _convs(self) -> list[nn.Conv2d]:
        return [self.lk, *(branch.conv for branch in self.branches.values())]

    def _sums_in_one_op(self, x: torch.Tensor) -> bool:
        """Whether the training form runs as `batch_normed_sum`: BNs normalising by the batch (with
        running statistics to update and more than one value per channel, else BN's own error), the
        CPU kernels' dtypes, eagerly, and no hooks on the convs or BNs (they would not fire)."""
        return (
            batch_normed_sum_applies(x)
            and x.numel() > x.shape[1]
            and all(bn.training and bn.running_mean is not None and bn.weight is not None for bn in self._norms())
            and not any(hooked(module) for module in self.modules() if module is not self)
        )

    def _batch_normed_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The training form in one op (`kernels.depthwise.batch_normed_sum`), each BN's running
        statistics updated as its own forward updates them."""
        norms, convs = self._norms(), self._convs()
        running = []
        for bn in norms:
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            running.append((bn.running_mean, bn.running_var, factor))
        return batch_normed_sum(
            x,
            [conv.weight for conv in convs],
            [conv.dilation[0] for conv in convs],
            [bn.weight for bn in norms],
            [bn.bias for bn in norms],
            [bn.eps for bn in norms],
            running,
        )

    def fold_sources(self) -> list[torch.Tensor | None]:
        """What `folded` reads."""
        if self.deployed:
            return [self.lk.weight, self.lk.bias]
        return [conv.weight for conv in self._convs()] + [t for bn in self._norms() for t in bn_tensors(bn)]

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single KxK kernel and bias equal to the eval-mode training form (differentiable)."""
        kernel, bias = fuse_bn(self.lk.weight, self.lk_bn)
        for branch in self.branches.values():
            small, small_bias = fuse_bn(branch.conv.weight, branch.bn)
            dilation = branch.conv.dilation[0]
            span = dilation * (small.shape[-1] - 1) + 1
            spread = small.new_zeros(small.shape[0], 1, span, span)
            spread[:, :, ::dilation, ::dilation] = small
            pad = (self.kernel_size - span) // 2
            kernel = kernel + F.pad(spread, [pad] * 4)
            bias = bias + small_bias
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every BN and every dilated branch into `lk` (in place)."""
        if self.deployed:
            return
        kernel, bias = self.merged_kernel()
        merged = nn.Conv2d(
            kernel.shape[0], kernel.shape[0], self.kernel_size, padding=self.kernel_size // 2, groups=kernel.shape[0]
        ).to(kernel.device, kernel.dtype)
        merged.weight.copy_(kernel)
        merged.bias.copy_(bias)
        self.lk = merged
        del self.lk_bn, self.branches
        self.forget_folds()


def large_kernel_bn(conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)); for a DilatedRepConv in eval mode one depthwise conv, the BN folded into its kernel.

    The BN after the large kernel (Base-Net blocks, the Focus-Net LePE) is per-channel affine in
    eval mode, so it folds into the (already merged) kernel and bias: one pass over the map fewer
    per block at inference. Training mode, other mixers, hooks and tracing (`foldable_bn`) run the
    two modules as they are.
    """
    if not (isinstance(conv, DilatedRepConv) and foldable_bn(conv, bn) and conv.foldable()):
        return bn(conv(x))

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = conv.one_kernel()
        return fuse_bn(kernel, bn, bias)

    kernel, bias = conv.kept_fold("with bn", conv.fold_sources() + bn_tensors(bn), fold)
    with standing_in(conv):
        return depthwise_conv2d(x, kernel, bias)


class LargeKernelBN(nn.Sequential):
    """Sequential(conv=DilatedRepConv, bn=BatchNorm2d) whose eval forward folds the BN (`large_kernel_bn`).

    Same module names and state dict as the plain Sequential it replaces (the Focus-Net LePE).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return large_kernel_bn(self.conv, self.bn, x)

    def forward_with_recipe(
        self, x: torch.Tensor, input_recipe: RecomputedOnce | None = None
    ) -> tuple[torch.Tensor, RecomputedOnce | None]:
        """The forward, and in training the recipe of its output (`large_kernel_batch_normed`)."""
        with keeping(x, input_recipe):
            return large_kernel_batch_normed(self.conv, self.bn, x)
