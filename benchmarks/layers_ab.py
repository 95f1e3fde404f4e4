"""What each cheaper layer formulation of issue 10 gains, measured by switching it off in one process.

    python benchmarks/layers_ab.py                     # XT, batch 8, 224, one thread, inference + training step
    python benchmarks/layers_ab.py --preset t --modes train --rounds 3
    python benchmarks/layers_ab.py --modes train --only "custom op only 13+ on 28+,no custom depthwise op"
    python benchmarks/layers_ab.py --modes infer --deploy --batch-size 1 --only "folds recomputed every call"
    python benchmarks/layers_ab.py --preset t --memory 5 --only "fc1 outputs remade from 14x14 up"

Every variant runs the same model with one formulation put back to the reference's form (the
original forward of that layer class, kept here), or an alternative that was tried, interleaved
call by call; "all old" puts all of them back at once. The ratio old/new of the median time is what
the formulation gains.

`--memory N` measures a training step's memory instead of its time: each variant in N fresh
processes (alternating with the others', so a busy spell falls on all), each reporting the resident
peak (`bench.PeakMemory`, the median of three steps) and the tensors alive at the peak
(`bench.LiveMemory`), per image. A fresh process each, because the resident peak depends on how
earlier steps left glibc's heap, which a variant run after another would inherit.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from overlock import kernels
from overlock.bench import BenchSettings, LiveMemory, PeakMemory, make_step, prepare
from overlock.builder import blocks, build, contmix, layers, mixers, network
from overlock.kernels import cpu, depthwise, gelu_dwconv, grn
from overlock.training.optim import build_optimizer

KEPT = {  # originals the variants call
    "gelu_dwconv3x3_grn": gelu_dwconv.gelu_dwconv3x3_grn,
    "gelu_dwconv3x3": gelu_dwconv.gelu_dwconv3x3,
    "normed_recipe": blocks.normed_recipe,
    "ConvMLP.forward": layers.ConvMLP.forward,
}


def pointwise_before_round_12(self, x, weight, bias):
    """1x1 convs before round 12: oneDNN's linear at inference only, F.linear in training mode."""
    if not layers.cpu_channels_innermost(x):
        return torch.nn.Conv2d._conv_forward(self, x, weight, bias)
    inner, flat = x.permute(0, 2, 3, 1), weight.flatten(1)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (inner, flat, bias))
    if not self.training and not needs_grad and layers.onednn_linear_applies(inner, flat, bias):
        return torch.ops.mkldnn._linear_pointwise(inner, flat, bias, "none", [], "").permute(0, 3, 1, 2)
    return F.linear(inner, flat, bias).permute(0, 3, 1, 2)


def mlp_in_half_batches(self, x, input_recipe=None):
    """Tried in round 16: the MLP of a 28x28-or-larger map run on two halves of the batch, so the
    backward's hidden maps are half as large and fit more of the heap's holes (memory only)."""
    forward = KEPT["ConvMLP.forward"]
    if not (self.training and torch.is_grad_enabled() and x.shape[0] > 1 and x.shape[-2] * x.shape[-1] >= 28 * 28):
        return forward(self, x, input_recipe)
    half = x.shape[0] // 2
    parts = []
    for start, stop in ((0, half), (half, x.shape[0])):
        recipe = None if input_recipe is None else (lambda a=start, b=stop: input_recipe()[a:b])
        parts.append(forward(self, x[start:stop], recipe))
    return torch.cat(parts).contiguous(memory_format=torch.channels_last)


def input_grad_first(ctx, grad):
    """oneDNN's linear's backward before round 18: the input's gradient made while the input (a
    recomputed GRN output in the MLP) is still held, then the weight's."""
    x, weight = ctx.saved_tensors
    grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
    rows = grad.reshape(-1, grad.shape[-1])
    grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
    grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


def old_layer_scale(self, x):
    return F.conv2d(x, self.weight, self.bias, groups=x.shape[1])


def with_recipe(forward):
    """A GRN forward as ConvMLP calls it (`with_recipe=True`: also a function that recomputes it)."""

    def patched(self, x, with_recipe=False):
        out = forward(self, x)
        return (out, lambda: forward(self, x)) if with_recipe else out

    return patched


@with_recipe
def old_grn(self, x):
    energy = torch.norm(x, p=2, dim=(-1, -2), keepdim=True)
    normed = energy / (energy.mean(dim=1, keepdim=True) + 1e-6)
    return x + torch.addcmul(self.beta, self.gamma, x * normed)


@with_recipe
def autograd_grn(self, x):
    scale, shift = self.coefficients(x)
    return torch.addcmul(shift, x, scale)


def old_res_dw_conv(self, x):
    return x + torch.nn.Conv2d.forward(self, x)


def old_dilated_rep_conv(self, x):
    if self.deployed:
        return self.lk(x)
    out = self.lk_bn(self.lk(x))
    for branch in self.branches.values():
        out = out + branch(x)
    return out


def branch_outputs_kept(self, x):
    """DilatedRepConv's training forward before round 3: each branch's BN keeps the branch output."""
    folded = self.folded()
    if folded is not None:
        return layers.depthwise_conv2d(x, *folded)
    out = self.lk_bn(layers.depthwise_conv2d(x, self.lk.weight))
    for branch in self.branches.values():
        out = out + branch.bn(layers.depthwise_conv2d(x, branch.conv.weight, dilation=branch.conv.dilation[0]))
    return out


def stem_keeps_layout(self, x):
    return layers.FoldingSequential.forward(self, x)  # looked up at call time: may itself be patched


def residual_not_in_place(skip, branch, scale, drop, res_scale, remade=None):
    if scale is None:
        return skip + drop(branch)
    return scale(skip) + drop(branch) if res_scale else skip + drop(scale(branch))


def pointwise_as_conv(self, x, weight, bias):
    return torch.nn.Conv2d._conv_forward(self, x, weight, bias)


def gelu_on_the_map(x, approximate="none", inplace=False):
    """GELU before round 4: on the channels_last map itself."""
    return F.gelu(x, approximate=approximate)


def dilated_weight_grad_by_aten(height, width, kernel_size, dilation=1, method=depthwise.weight_grad_method):
    """The weight-gradient method table before round 4: dilated small kernels through PyTorch's own."""
    chosen = method(height, width, kernel_size, dilation)
    return "aten" if chosen == "polyphase" else chosen


def middle_by_pytorch(hidden, weight, bias):
    """ConvMLP before round 5: GELU, the 3x3 depthwise conv and GRN's energy as PyTorch ops."""
    return False


def weight_grads_by_pytorch(x, grad):
    """Depthwise weight gradients before round 5: FFT, batch-folded conv, sub-lattices or PyTorch's own."""
    return False


CONV_MLP_FORWARD = layers.ConvMLP.forward


def grn_input_kept(self, x):
    """ConvMLP before round 6: GRN keeps its input (the compiled op's output) for its backward."""
    hidden = self.fc1(x)
    if not self._fused_middle(hidden):
        return CONV_MLP_FORWARD(self, x)
    mixed, squares = gelu_dwconv.gelu_dwconv3x3(hidden, self.dwconv.folded_weight(), self.dwconv.bias)
    out, recipe = self.grn(mixed, with_recipe=True, squares=squares)
    with layers.recompute_saved(out, recipe):
        return self.fc2(out)


def unfolded_large_kernel_bn(conv, bn, x):
    return bn(conv(x))


def plain_depthwise(x, weight, bias=None, dilation=1):
    padding = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])


def large_kernels_only_depthwise(x, weight, bias=None, dilation=1):
    """The custom op as first written: only 13x13+ kernels on 28x28+ maps, FFT weight gradient."""
    large = weight.shape[-1] >= 13 and x.shape[-1] * x.shape[-2] >= depthwise.CHANNELS_LAST_MIN_POSITIONS
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad and not large:
        return plain_depthwise(x, weight, bias, dilation)
    return depthwise.depthwise_conv2d(x, weight, bias, dilation)  # its weight gradient is the FFT's there


def sliced_channels(x, width):
    """Channel splits before round 7: basic slicing, whose backward writes NCHW gradients."""
    return x[:, :width], x[:, width:]


def _maybe(module, x):
    return x if module is None else module(x)


def folding_sequential_before_round_15(self, x, input_recipe=None):
    """FoldingSequential before round 15: eval BNs folded into the conv before them, BN -> activation
    (-> conv) outputs remade; no depthwise output, BN or GRN output remade, no recipe of its output."""
    modules = list(self)
    index = 0
    while index < len(modules):
        module, follower = modules[index], modules[index + 1] if index + 1 < len(modules) else None
        if follower is not None and isinstance(module, torch.nn.Conv2d) and layers.foldable_bn(module, follower):
            fold = functools.partial(layers.fuse_bn, module.weight, follower, module.bias)
            sources = [module.weight, module.bias, *layers.bn_tensors(follower)]
            x = module._conv_forward(x, *self.kept_fold(str(index), sources, fold))
            index += 2
        elif follower is not None and layers.recomputable_bn_activation(module, follower):
            consumer = modules[index + 2] if index + 2 < len(modules) else None
            consumer = consumer if isinstance(consumer, torch.nn.Conv2d) else None
            x = layers._bn_activation(module, follower, consumer, x)[0]
            index += 3 if consumer is not None else 2
        else:
            x = module(x)
            index += 1
    return x, None


def called_plainly(module, x, input_recipe=None):
    """`called_with_recipe` before round 15: the module's output kept by whatever reads it."""
    with layers.keeping(x, input_recipe):
        return module(x), None


def normed_recipe_before_round_15(norm, x, remade):
    """A Focus-Net norm's output remade only from a remade input (a local conv's), before round 15."""
    return None if remade is None else KEPT["normed_recipe"](norm, x, remade)


def basic_block_before_round_15(self, x):
    """The Base-Net block before round 15: the norm's and the BN's outputs kept."""
    x, remade = blocks.local_conv(self.dwconv, x)
    with layers.keeping(x, remade):
        normed = self.norm(x)
    mixed = layers.large_kernel_bn(self.large_kernel, self.bn, normed)
    if self.se is None or layers.hooked(self.se) or layers.recording():
        y = self.mlp(_maybe(self.se, mixed))
    else:
        excited, recipe = self.se(mixed, with_recipe=True)
        recipe = layers.RecomputedOnce(recipe)
        with layers.recompute_saved(excited, recipe):
            y = blocks.feed_forward(self.mlp, excited, recipe)
    return blocks.residual(x, y, self.layer_scale, self.drop_path, self.res_scale, remade)


def projected_before_round_15(self, mixed, lepe, lepe_again, gate, gate_again):
    """The Focus-Net block's mixing tail before round 15: every map in it kept."""
    out = _maybe(self.se, self.out_proj(mixed) + lepe)
    return self.proj(out if gate is None else gate * out)


def with_prior_before_round_15(self, x, prior, prior0):
    """The fused input before round 15: kept by the local conv."""
    prior = prior if self.alpha is None else self.alpha(prior) + self.beta(prior0)
    return torch.cat([x, prior], dim=1), None


@torch.autograd.function.once_differentiable
def batch_normed_sum_backward_before_round_20(ctx, grad):
    """`batch_normed_sum`'s backward before round 20: grad * y written and summed by PyTorch's ops, a
    centred copy of grad, each branch's d y in a new map."""
    x, first, means, inverse_stds, *rest = ctx.saved_tensors
    count = len(ctx.dilations)
    weights, gammas = rest[:count], rest[count:]
    channels, positions = x.shape[1], x.numel() // x.shape[1]
    grad_sum = grad.sum(dim=(0, 2, 3))
    centred = grad - (grad_sum / positions).view(channels, 1, 1)
    grad_x = None
    grad_weights, grad_gammas = [None] * count, [None] * count
    needs = ctx.needs_input_grad
    for index, (weight, dilation, gamma) in enumerate(zip(weights, ctx.dilations, gammas, strict=True)):
        y = first if index == 0 else depthwise._conv(x, weight, None, dilation)
        mean, inverse_std = means[index], inverse_stds[index]
        grad_y = torch.mul(grad, y)
        grad_normed = (grad_y.sum(dim=(0, 2, 3)) - mean * grad_sum) * inverse_std
        grad_gammas[index] = grad_normed
        scale = gamma * inverse_std
        slope = scale * inverse_std * grad_normed / positions
        torch.addcmul((slope * mean).view(channels, 1, 1), y, (-slope).view(channels, 1, 1), out=grad_y)
        grad_y.addcmul_(centred, scale.view(channels, 1, 1))
        del y
        if needs[4 + index]:
            grad_weights[index] = depthwise.weight_grad(x, grad_y, weight.shape[-1], dilation).to(weight.dtype)
        if needs[0]:
            term = depthwise._conv(grad_y, weight.flip(-1, -2), None, dilation)
            grad_x = term if grad_x is None else grad_x.add_(term)
    grad_betas = [grad_sum if needs[4 + 2 * count + i] else None for i in range(count)]
    grad_gammas = [g if needs[4 + count + i] else None for i, g in enumerate(grad_gammas)]
    return (grad_x, None, None, None, *grad_weights, *grad_gammas, *grad_betas)


OLD = {
    "LayerScale as conv": [(layers.LayerScale, "forward", old_layer_scale)],
    "GRN unfused": [(layers.GRN, "forward", old_grn)],
    "GRN autograd backward": [(layers.GRN, "forward", autograd_grn)],
    "ResDWConv x + conv": [(layers.ResDWConv, "forward", old_res_dw_conv)],
    "DilatedRepConv branch sum": [(layers.DilatedRepConv, "forward", old_dilated_rep_conv)],
    "no custom depthwise op": [(layers, "depthwise_conv2d", plain_depthwise)],
    "custom op only 13+ on 28+": [(layers, "depthwise_conv2d", large_kernels_only_depthwise)],
    "BN after large kernel unfolded": [(layers, "large_kernel_bn", unfolded_large_kernel_bn)],
    "dilated 9x9+ not polyphase": [(depthwise, "POLYPHASE_MIN_KERNEL", 10**9)],
    "MLP keeps every hidden map": [(layers, "RECOMPUTE_SAVED", contextvars.ContextVar("off", default=False))],
    "input stays NCHW": [(mixers.Stem, "forward", stem_keeps_layout)],
    "1x1 convs as conv2d": [(layers.Pointwise, "_conv_forward", pointwise_as_conv)],
    "DilatedRepConv keeps branch outputs": [(layers.DilatedRepConv, "forward", branch_outputs_kept)],
    "conv -> BN not folded in eval": [(layers.FoldingSequential, "forward", torch.nn.Sequential.forward)],
    "residual sum not in place": [(blocks, "residual", residual_not_in_place)],
    "GELU on the channels_last map": [(layers, "gelu", gelu_on_the_map)],
    "dilated 3x3 weight grad by PyTorch": [(depthwise, "weight_grad_method", dilated_weight_grad_by_aten)],
    "MLP middle by PyTorch ops": [(gelu_dwconv, "native_applies", middle_by_pytorch)],
    "depthwise weight grads by PyTorch ops": [(depthwise, "native_weight_grad_applies", weight_grads_by_pytorch)],
    "1x1 convs of channel slices as conv2d": [(layers, "cpu_channels_innermost", layers.cpu_channels_last)],
    "GRN input kept": [(layers.ConvMLP, "forward", grn_input_kept)],
    "BN -> activation outputs kept": [(layers, "recomputable_bn_activation", lambda bn, act: False)],
    "ContMix logits kept": [(contmix, "hooked", lambda module: True)],  # as when a hook sees the projection
    "ContMix op by PyTorch ops": [(cpu, "native_applies", lambda *tensors: False)],
    "ContMix logits from the affinities": [(contmix, "logits_through_keys", lambda proj: False)],
    "ContMix logits through the keys at inference too": [(contmix, "logits_through_keys", lambda proj: True)],
    "ContMix logits as a map": [(contmix, "forms_logits_inside", lambda proj, backend, *tensors: False)],
    "11x11 and 13x13 depthwise by oneDNN": [(depthwise, "NATIVE_FORWARD_KERNELS", frozenset())],
    "tall 1x1 convs by MKL at inference": [(layers, "ONEDNN_LINEAR_MIN_ROWS", 10**18)],
    "GRN backward by PyTorch ops": [(grn, "native_applies", lambda grad, x: False)],
    "GRN after the compiled op at inference": [(layers.ConvMLP, "_inference_grn", lambda self, hidden: False)],
    "padding-7+ dilated depthwise by oneDNN or polyphase": [(depthwise, "NATIVE_DILATED_MIN_PADDING", 10**9)],
    "MLP middle into a new map at inference": [
        (gelu_dwconv, "gelu_dwconv3x3_grn", lambda *args, overwrite: KEPT["gelu_dwconv3x3_grn"](*args))
    ],
    "1x1 products by F.linear in training": [(layers.Pointwise, "_conv_forward", pointwise_before_round_12)],
    "folds recomputed every call": [(layers.KeepsFolds, "kept_fold", lambda self, key, sources, fold: fold())],
    "local conv outputs kept": [(blocks, "local_conv", lambda conv, x, input_recipe=None: (_maybe(conv, x), None))],
    "fc1 outputs kept": [(layers.ConvMLP, "_remade_hidden", lambda self, x, recipe: None)],
    "fc1 outputs remade on every map": [(layers, "FC1_REMADE_MIN_POSITIONS", 0)],
    "fc1 outputs remade from 14x14 up": [(layers, "FC1_REMADE_MIN_POSITIONS", 14 * 14)],
    "MLP in half batches from 28x28 up": [(layers.ConvMLP, "forward", mlp_in_half_batches)],
    "1x1 input gradient before the weight's": [(layers._OneDNNLinear, "backward", staticmethod(input_grad_first))],
    "MLP backward gradients in new maps": [
        (layers.ConvMLP, "_grn_gradient_in_place", lambda self: False),
        (kernels, "gelu_dwconv3x3", lambda *args, gradient_over_input=False: KEPT["gelu_dwconv3x3"](*args)),
    ],
    "GRN and fc2 as two ops in training": [(layers.ConvMLP, "_grn_pointwise", lambda self, mixed: False)],
    "conv -> BN -> activation as two ops at inference": [(layers, "conv_post_op", lambda *args: None)],
    "DilatedRepConv BNs op by op": [(layers.DilatedRepConv, "_sums_in_one_op", lambda self, x: False)],
    "branch sum's BN backward before round 20": [
        (depthwise._BatchNormedSum, "backward", staticmethod(batch_normed_sum_backward_before_round_20))
    ],
    "maps kept as before round 15": [
        (layers.FoldingSequential, "forward_with_recipe", folding_sequential_before_round_15),
        (blocks, "called_with_recipe", called_plainly),
        (blocks.BasicBlock, "forward", basic_block_before_round_15),
        (blocks, "normed_recipe", normed_recipe_before_round_15),
        (blocks.DynamicBlock, "_projected", projected_before_round_15),
        (blocks.DynamicBlock, "_with_prior", with_prior_before_round_15),
    ],
    "NCHW gradients (splits; SE mean; ContMix values)": [
        (network, "split_channels", sliced_channels),
        (contmix, "split_channels", sliced_channels),
        (layers, "channel_means", lambda x: x.mean(dim=(-2, -1), keepdim=True)),
        (contmix, "cpu_channels_last", lambda x: False),
    ],
}
ROUND_7 = (
    "11x11 and 13x13 depthwise by oneDNN",
    "tall 1x1 convs by MKL at inference",
    "GRN backward by PyTorch ops",
    "NCHW gradients (splits; SE mean; ContMix values)",
    "GRN after the compiled op at inference",
)
ROUND_8 = ("padding-7+ dilated depthwise by oneDNN or polyphase", "local conv outputs kept", "fc1 outputs kept")
OLD["before round 8 (the 3 above)"] = [patch for name in ROUND_8 for patch in OLD[name]]
OLD["round 8 memory changes undone"] = OLD["local conv outputs kept"] + OLD["fc1 outputs kept"]
OLD["before round 7 (the 5 above)"] = [patch for name in ROUND_7 for patch in OLD[name]]
ROUND_6 = ("GRN input kept", "BN -> activation outputs kept", "ContMix logits kept", "ContMix op by PyTorch ops")
OLD["before round 6 (the 4 above)"] = [patch for name in ROUND_6 for patch in OLD[name]]
ROUND_5 = (
    "MLP middle by PyTorch ops",
    "depthwise weight grads by PyTorch ops",
    "1x1 convs of channel slices as conv2d",
)
OLD["before round 5 (the 3 above)"] = [patch for name in ROUND_5 for patch in OLD[name]]
ROUND_4 = ("GELU on the channels_last map", "dilated 3x3 weight grad by PyTorch")
OLD["before round 4 (the 2 above)"] = [patch for name in ROUND_4 for patch in OLD[name]]
# Everything the second round of issue 10 changed, put back at once (the code of the first round).
OLD["before round 2 (the 5 above)"] = [
    patch
    for name in (
        "GRN autograd backward",
        "custom op only 13+ on 28+",
        "BN after large kernel unfolded",
        "dilated 9x9+ not polyphase",
        "MLP keeps every hidden map",
    )
    for patch in OLD[name]
]
ROUND_3 = (
    "input stays NCHW",
    "1x1 convs as conv2d",
    "DilatedRepConv keeps branch outputs",  # and sums them out of place
    "conv -> BN not folded in eval",
    "residual sum not in place",
)
OLD["before round 3 (the 5 above)"] = [patch for name in ROUND_3 for patch in OLD[name]]

# Variants that replace an attribute another variant replaces too stay out of "all old" (the code
# before issue 10).
SAME_ATTRIBUTE = (
    "custom op only 13+ on 28+",
    "GRN autograd backward",
    "before round 2 (the 5 above)",
    "DilatedRepConv keeps branch outputs",
    "before round 3 (the 5 above)",
    "before round 4 (the 2 above)",
    "before round 5 (the 3 above)",
    "before round 6 (the 4 above)",
    "before round 7 (the 5 above)",
)
# Alternatives that were tried and not adopted: no part of the code before issue 10 either.
TRIED = ("fc1 outputs remade on every map", "fc1 outputs remade from 14x14 up", "MLP in half batches from 28x28 up")
ALL_OLD = [patch for name, patches in OLD.items() if name not in SAME_ATTRIBUTE + TRIED for patch in patches]
VARIANTS = {"new": [], **OLD, "all old": ALL_OLD}


def memory_child(preset: str, variant: str, batch: int, img_size: int) -> None:
    """In a fresh process: a training step's resident and live peaks per image with `variant` applied."""
    torch.set_num_threads(1)
    for owner, attr, fn in VARIANTS[variant]:
        setattr(owner, attr, fn)
    settings = BenchSettings(batch_size=batch, img_size=img_size, threads=1, train=True)
    model = prepare(build(preset), settings)
    step = make_step(model, settings, model.spec.head.num_classes or 1000)
    for _ in range(2):
        step()
    peaks = [PeakMemory(torch.device("cpu")).measure(step) for _ in range(3)]
    live = LiveMemory().measure(step)
    if None in peaks or live is None:
        sys.exit("--memory needs Linux (/proc/self/clear_refs) and glibc (mallinfo2)")
    print(json.dumps({"resident": statistics.median(peaks) / batch, "live": live / batch}))


def memory(args, names: list[str]) -> None:
    """Each variant's training-step memory, in `args.memory` fresh processes apiece, alternating."""
    found: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.memory):
        for name in names if round_ % 2 == 0 else reversed(names):
            command = [sys.executable, __file__, "--memory-child", name, "--preset", args.preset]
            command += ["--batch-size", str(args.batch_size), "--img-size", str(args.img_size)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name}: the child process failed:\n{done.stderr[-2000:]}")
            found[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1}, {name}: {found[name][-1]}", flush=True)
    print(
        f"{args.preset} training step, batch {args.batch_size}, {args.img_size}px, 1 thread, MiB per image, "
        f"medians of {args.memory} fresh processes:"
    )
    new = statistics.median(r["resident"] for r in found["new"])
    for name, runs in found.items():
        resident = statistics.median(r["resident"] for r in runs)
        live = statistics.median(r["live"] for r in runs)
        spread = f"{min(r['resident'] for r in runs):.2f}-{max(r['resident'] for r in runs):.2f}"
        print(f"  {name:34} resident {resident:7.2f} ({spread})  live {live:7.2f}   old/new {resident / new:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--only", default="", help="comma-separated variant names to run beside 'new'")
    parser.add_argument("--deploy", action="store_true", help="the deploy form (inference only)")
    parser.add_argument(
        "--memory", type=int, default=0, help="training memory instead of time: N fresh processes per variant"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        return memory_child(args.preset, args.memory_child, args.batch_size, args.img_size)
    if args.deploy and "train" in args.modes.split(","):
        parser.error("--deploy is the inference form: add --modes infer")
    variants = VARIANTS
    if args.only:
        unknown = [name for name in args.only.split(",") if name not in variants]
        if unknown:
            parser.error(f"--only: unknown variant(s) {unknown}; known: {', '.join(map(repr, variants))}")
        variants = {name: variants[name] for name in ["new", *args.only.split(",")]}
    if args.memory:
        return memory(args, list(variants))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(args.preset, deploy=args.deploy)
    image = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with torch.no_grad():
        logits = model.eval()(image[:1])
    classes = (logits["main"] if isinstance(logits, dict) else logits).shape[-1]
    target = torch.randint(0, classes, (args.batch_size,))
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)  # `overlock train`'s
    saved = {(owner, name): getattr(owner, name) for patches in OLD.values() for owner, name, _ in patches}

    def step(mode: str) -> float:
        tick = time.perf_counter()
        if mode == "infer":
            with torch.inference_mode():
                model(image)
        else:
            optimizer.zero_grad(set_to_none=True)
            out = model(image)
            (F.cross_entropy(out["main"], target) + 0.4 * F.cross_entropy(out["aux"], target)).backward()
            optimizer.step()
        return time.perf_counter() - tick

    for mode in args.modes.split(","):
        model.train(mode == "train")  # once: `.eval()` also drops the folds an eval forward keeps
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants.items())
        for round_ in range(args.rounds + 1):
            # Each round starts one variant later: a step can leave the heap in a state that makes
            # the next one cheaper or dearer (page faults, trimmed arenas), the same for all this way.
            for name, patches in order[round_ % len(order) :] + order[: round_ % len(order)]:
                for owner, attr, fn in patches:
                    setattr(owner, attr, fn)
                try:
                    seconds = step(mode)
                finally:
                    for (owner, attr), fn in saved.items():
                        setattr(owner, attr, fn)
                if round_:  # round 0 is the warm-up
                    times[name].append(seconds)
        new = statistics.median(times["new"])
        form = " (deploy form)" if args.deploy else ""
        print(
            f"{args.preset}{form} {mode}, batch {args.batch_size}, {args.img_size}px, 1 thread, {args.rounds} rounds:"
        )
        for name, samples in times.items():
            median = statistics.median(samples)
            print(f"  {name:28} {median:8.3f} s   old/new {median / new:.2f}x")


if __name__ == "__main__":
    main()
