"""Depthwise forward convolutions of the presets' DilatedRepConvs: the C kernel against PyTorch's.

    python benchmarks/depthwise_forward.py                 # XT's maps, batch 8, one thread
    python benchmarks/depthwise_forward.py --preset t --threads 2 --kernels 3,7,13,17

For every map a large kernel of the preset runs on (channels and side at 224x224), each kernel of
`--kernels` (default: the preset's own and its dilated branches, e.g. `3,5,7:2,3:7` for size:dilation) through
`kernels.depthwise.conv_native` (csrc/depthwise_conv.c) and `conv_pytorch` (oneDNN on channels_last
data, or the sub-lattices for large dilated kernels), interleaved, medians, with the largest error of
each against float64. This is the measurement behind `depthwise.native_forward_wins`: the kernels
where the C loop wins are the ones the model sends to it (the input gradient is the same conv); the
last column says which it picks.
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
    parser.add_argument(
        "--kernels", default=None, help="comma-separated kernel sizes, SIZE or SIZE:DILATION (default: the preset's)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(native.status(depthwise.FORWARD_LIBRARY))
    if native.library(depthwise.FORWARD_LIBRARY) is None:
        raise SystemExit("the C kernel is not available here: nothing to compare")
    maps = preset_kernels(args.preset)
    print(
        f"\n{args.preset}, batch {args.batch_size}, {args.threads} thread(s), medians of {args.rounds} interleaved calls; "
        f"C in the model for kernel sizes {sorted(depthwise.NATIVE_FORWARD_KERNELS)} and dilated kernels padding "
        f"{depthwise.NATIVE_DILATED_MIN_PADDING} or more"
    )
    print("| channels, map | kernel | C ms | PyTorch ms | PyTorch / C | error C / PyTorch | model runs |")
    print("|---|---|---|---|---|---|---|")
    for channels, side, kernel_size in sorted(maps):
        kernels = (
            parse_kernels(args.kernels) if args.kernels else [(kernel_size, 1), *DILATED_REPCONV_BRANCHES[kernel_size]]
        )
        x = torch.randn(args.batch_size, channels, side, side).contiguous(memory_format=torch.channels_last)
        for kernel, dilation in sorted(set(kernels)):
            weight, bias = torch.randn(channels, 1, kernel, kernel), torch.randn(channels)
            contenders = {"C": depthwise.conv_native, "PyTorch": depthwise.conv_pytorch}
            exact = depthwise.conv_pytorch(x.double(), weight.double(), bias.double(), dilation)
            errors = {key: relative_error(fn(x, weight, bias, dilation), exact) for key, fn in contenders.items()}
            ms = interleaved_ms(contenders, (x, weight, bias, dilation), args.rounds)
            name = f"{kernel}x{kernel}" + (f" d{dilation}" if dilation > 1 else "")
            picked = "C" if depthwise.native_forward_wins(kernel, dilation) else "PyTorch"
            print(
                f"| {channels}, {side}x{side} | {name} | {ms['C']:.2f} | {ms['PyTorch']:.2f} | "
                f"{ms['PyTorch'] / ms['C']:.2f}x | {errors['C']:.1e} / {errors['PyTorch']:.1e} | {picked} |"
            )


def parse_kernels(text: str) -> list[tuple[int, int]]:
    """ "3,7,3:7" -> [(3, 1), (7, 1), (3, 7)]: kernel sizes, each with an optional dilation."""
    kernels = []
    for item in text.split(","):
        size, _, dilation = item.partition(":")
        kernels.append((int(size), int(dilation or 1)))
    return kernels


if __name__ == "__main__":
    main()
