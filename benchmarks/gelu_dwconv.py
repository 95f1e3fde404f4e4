"""The MLP middle (GELU -> 3x3 depthwise conv -> GRN's energy): the C kernel against PyTorch's ops.

    python benchmarks/gelu_dwconv.py                 # XT's four MLP maps, batch 8, one thread
    python benchmarks/gelu_dwconv.py --threads 2 --rounds 9

Both contenders are what ConvMLP runs (builder/layers.py): the compiled kernel
(`kernels.gelu_dwconv3x3`), and PyTorch's GELU on the NHWC view, the conv and the sum of squares,
with GELU's output recomputed in the backward (`recompute_saved`), as the model does without the
kernel. Forward without gradients; backward alone (the forward run once, its graph kept). Calls
interleaved, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from overlock.builder import layers
from overlock.kernels import gelu_dwconv, native

# XT's MLP hidden maps at 224x224 (4x the stage's channels), batch 8.
SHAPES = [(224, 56), (448, 28), (1024, 14), (1344, 7)]


def composition(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    activated = layers.gelu(hidden)
    with layers.recompute_saved(activated, lambda: layers.gelu(hidden)):
        out = F.conv2d(activated, weight, bias, padding=1, groups=hidden.shape[1])
    return out, out.square().sum(dim=(-1, -2), keepdim=True)


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(native.status(gelu_dwconv.LIBRARY))
    if native.library(gelu_dwconv.LIBRARY) is None:
        raise SystemExit("the C kernel is not available here: nothing to compare")
    contenders = {"C kernel": gelu_dwconv.gelu_dwconv3x3, "PyTorch": composition}
    print(f"\nbatch {args.batch_size}, {args.threads} thread(s), medians of {args.rounds} interleaved calls, ms")
    print("| hidden map | C kernel fwd | PyTorch fwd | ratio | C kernel bwd | PyTorch bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    for channels, side in SHAPES:
        shape = (args.batch_size, channels, side, side)
        hidden = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        weight = (torch.randn(channels, 1, 3, 3) * 0.3).requires_grad_()
        bias = torch.randn(channels).requires_grad_()
        grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        graphs = {name: fn(hidden, weight, bias)[0] for name, fn in contenders.items()}
        forward = {name: [] for name in contenders}
        backward = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                with torch.no_grad():
                    start = time.perf_counter()
                    fn(hidden, weight, bias)
                    forward[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                torch.autograd.grad(graphs[name], (hidden, weight, bias), grad, retain_graph=True)
                backward[name].append(time.perf_counter() - start)
        f = {name: median_ms(times) for name, times in forward.items()}
        b = {name: median_ms(times) for name, times in backward.items()}
        print(
            f"| {channels} x {side}x{side} | {f['C kernel']:.2f} | {f['PyTorch']:.2f} | {f['PyTorch'] / f['C kernel']:.2f}x "
            f"| {b['C kernel']:.2f} | {b['PyTorch']:.2f} | {b['PyTorch'] / b['C kernel']:.2f}x |"
        )


if __name__ == "__main__":
    main()
