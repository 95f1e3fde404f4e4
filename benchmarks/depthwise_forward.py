"""Depthwise forward convolutions of the presets' DilatedRepConvs: the C kernel against PyTorch's.

    python benchmarks/depthwise_forward.py                 # XT's maps, batch 8, one thread
    python benchmarks/depthwise_forward.py --preset t --threads 2 --kernels 3,7,13,17

For every map a large kernel of the preset runs on (channels and side at 224x224), each kernel size
of `--kernels` (default: the preset's own and its branches' sizes, undilated) through
`kernels.depthwise.conv_native` (csrc/depthwise_conv.c) and `conv_pytorch` (oneDNN on channels_last
data, or the sub-lattices for large dilated kernels), interleaved, medians, with the largest error of
each against float64. This is the measurement behind `depthwise.NATIVE_FORWARD_KERNELS`: the sizes
where the C loop wins are the ones the model sends to it (the input gradient is the same conv).
"""

from __future__ import annotations

import argparse

import torch
from depthwise_weight_grad import interleaved_ms, preset_kernels, relative_error

from overlock.archspec import DILATED_REPCONV_BRANCHES
from overlock.kernels import depthwise, native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--kernels", default=None, help="comma-separated kernel sizes (default: the preset's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(native.status(depthwise.FORWARD_LIBRARY))
    if native.library(depthwise.FORWARD_LIBRARY) is None:
        raise SystemExit("the C kernel is not available here: nothing to compare")
    maps = preset_kernels(args.preset)
    print(
        f"\n{args.preset}, batch {args.batch_size}, {args.threads} thread(s), medians of {args.rounds} interleaved calls; "
        f"C in the model for kernel sizes {sorted(depthwise.NATIVE_FORWARD_KERNELS)}"
    )
    print("| channels, map | kernel | C ms | PyTorch ms | PyTorch / C | error C / PyTorch |")
    print("|---|---|---|---|---|---|")
    for channels, side, kernel_size in sorted(maps):
        own = [kernel_size, *(k for k, _ in DILATED_REPCONV_BRANCHES[kernel_size])]
        sizes = [int(k) for k in args.kernels.split(",")] if args.kernels else sorted(set(own))
        x = torch.randn(args.batch_size, channels, side, side).contiguous(memory_format=torch.channels_last)
        for kernel in sizes:
            weight, bias = torch.randn(channels, 1, kernel, kernel), torch.randn(channels)
            contenders = {"C": depthwise.conv_native, "PyTorch": depthwise.conv_pytorch}
            exact = depthwise.conv_pytorch(x.double(), weight.double(), bias.double(), 1)
            errors = {key: relative_error(fn(x, weight, bias, 1), exact) for key, fn in contenders.items()}
            ms = interleaved_ms(contenders, (x, weight, bias, 1), args.rounds)
            print(
                f"| {channels}, {side}x{side} | {kernel}x{kernel} | {ms['C']:.2f} | {ms['PyTorch']:.2f} | "
                f"{ms['PyTorch'] / ms['C']:.2f}x | {errors['C']:.1e} / {errors['PyTorch']:.1e} |"
            )


if __name__ == "__main__":
    main()
