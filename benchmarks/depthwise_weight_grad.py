"""Depthwise weight gradients of the presets' DilatedRepConvs: the C kernel against the PyTorch methods.

    python benchmarks/depthwise_weight_grad.py             # XT's kernels and branches, batch 8, one thread
    python benchmarks/depthwise_weight_grad.py --preset t --threads 2

For every large kernel of the preset (its size, channels and map at 224x224) and each of its dilated
branches: `kernels.depthwise.weight_grad_native` against the PyTorch method `weight_grad_method`
picks for that shape (FFT, batch-folded conv, sub-lattices or PyTorch's own), interleaved, medians,
and the largest error of each against the float64 direct sum relative to its largest entry. The
last row weighs each shape by how often the preset has it.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from overlock.archspec import DILATED_REPCONV_BRANCHES
from overlock.builder import build
from overlock.builder.layers import DilatedRepConv
from overlock.kernels import depthwise, native


def preset_kernels(preset: str, size: int = 224) -> collections.Counter:
    """(channels, map side, kernel size) -> how many DilatedRepConvs of the preset have it."""
    model = build(preset)
    sides: dict[str, int] = {}

    def record(name: str):
        def hook(module, args) -> None:  # a pre-hook that returned a value would replace the input
            sides[name] = args[0].shape[-1]

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, DilatedRepConv)
    ]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    counts: collections.Counter = collections.Counter()
    for name, module in model.named_modules():
        if isinstance(module, DilatedRepConv):
            counts[(module.lk.weight.shape[0], sides[name], module.kernel_size)] += 1
    return counts


def interleaved_ms(contenders: dict, arguments: tuple, rounds: int) -> dict[str, float]:
    """Median milliseconds of each contender called with `arguments`, the contenders taking turns
    call by call (so that the machine's drift hits all alike)."""
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(rounds):
        for key, fn in contenders.items():
            start = time.perf_counter()
            fn(*arguments)
            times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(values) for key, values in times.items()}


def relative_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return ((ours.double() - exact).abs().max() / exact.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(native.status(depthwise.NATIVE_LIBRARY))
    if native.library(depthwise.NATIVE_LIBRARY) is None:
        raise SystemExit("the C kernel is not available here: nothing to compare")
    print(
        f"\n{args.preset}, batch {args.batch_size}, {args.threads} thread(s), medians of {args.rounds} interleaved calls"
    )
    print("| channels, map | kernel, dilation | PyTorch method | C ms | PyTorch ms | ratio | error C / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    total = {"C": 0.0, "PyTorch": 0.0}
    for (channels, side, kernel_size), count in sorted(preset_kernels(args.preset).items()):
        x = torch.randn(args.batch_size, channels, side, side).contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        for kernel, dilation in [(kernel_size, 1), *DILATED_REPCONV_BRANCHES[kernel_size]]:
            name = depthwise.weight_grad_method(side, side, kernel, dilation)
            contenders = {
                "C": depthwise.weight_grad_native,
                "PyTorch": depthwise.WEIGHT_GRAD_METHODS[name],
            }
            exact = depthwise.WEIGHT_GRAD_METHODS["aten"](x.double(), grad.double(), kernel, dilation)
            errors = {key: relative_error(fn(x, grad, kernel, dilation), exact) for key, fn in contenders.items()}
            ms = interleaved_ms(contenders, (x, grad, kernel, dilation), args.rounds)
            for key in total:
                total[key] += count * ms[key]
            print(
                f"| {channels}, {side}x{side} (x{count}) | {kernel}, {dilation} | {name} | {ms['C']:.2f} | "
                f"{ms['PyTorch']:.2f} | {ms['PyTorch'] / ms['C']:.2f}x | {errors['C']:.1e} / {errors['PyTorch']:.1e} |"
            )
    print(
        f"| all of {args.preset}'s, each as often as the preset has it | | | {total['C']:.0f} | "
        f"{total['PyTorch']:.0f} | {total['PyTorch'] / total['C']:.2f}x | |"
    )


if __name__ == "__main__":
    main()
