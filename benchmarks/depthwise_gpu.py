"""Depthwise convolutions of the presets' DilatedRepConvs on a GPU: PyTorch (cuDNN) against overlock's Triton kernels.

    python benchmarks/depthwise_gpu.py                          # XT and T, batch 64, float32 and bfloat16
    python benchmarks/depthwise_gpu.py --presets t --batch-size 32 --dtypes bfloat16 --out /tmp/res

For every map a large kernel of a preset runs on (channels and side at 224x224) and every kernel
that runs there (the large one and its dilated branches), the forward and the weight gradient of
`kernels.depthwise` through each backend, interleaved call by call, CUDA-event medians, with the
largest error of each against float64 on the CPU. The input gradient is the forward with the
kernel mirrored, so the forward's row stands for it. The last columns weight each row by how often
a training step runs it (forward, input gradient, weight gradient) and sum to the time per step
each backend would cost; the model itself takes the faster one per shape (`depthwise._cuda_pick`).
GPU only (`gpu_session.sh` runs it as its `depthwise` step); writes OUT/depthwise_gpu_<gpu>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from depthwise_weight_grad import preset_kernels

from overlock.archspec import DILATED_REPCONV_BRANCHES
from overlock.kernels import depthwise


def device_ms(contenders: dict, rounds: int) -> dict[str, float]:
    """Median CUDA-event milliseconds of each no-argument contender, taking turns call by call."""
    for run in contenders.values():  # warm-up: Triton compiles, cuDNN picks its algorithm
        run()
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(rounds):
        for key, run in contenders.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times[key].append(start.elapsed_time(end))
    return {key: statistics.median(values) for key, values in times.items()}


def error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.detach().cpu().double() - exact).abs().max() / exact.abs().max()).item()


def measure(batch: int, channels: int, side: int, kernel: int, dilation: int, dtype: torch.dtype, rounds: int) -> dict:
    kernels = depthwise._triton_kernels()
    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(batch, channels, side, side, generator=gen) for _ in range(2))
    weight = torch.randn(channels, 1, kernel, kernel, generator=gen)
    padding = dilation * (kernel - 1) // 2
    leaf = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    exact = F.conv2d(leaf, w64, padding=padding, dilation=dilation, groups=channels)
    exact.backward(grad.double())
    xs, gs, ws = (t.cuda().to(dtype) for t in (x, grad, weight))
    forward = {
        "pytorch": lambda: F.conv2d(xs, ws, padding=padding, dilation=dilation, groups=channels),
        "triton": lambda: kernels.forward(xs, ws, None, dilation),
    }
    weight_grad = {
        "pytorch": lambda: depthwise.weight_grad_aten(xs, gs, kernel, dilation),
        "triton": lambda: kernels.weight_grad(xs, gs, kernel, dilation),
    }
    row = {"forward_ms": device_ms(forward, rounds), "weight_grad_ms": device_ms(weight_grad, rounds)}
    row["forward_error"] = {key: error(run(), exact.detach()) for key, run in forward.items()}
    row["weight_grad_error"] = {key: error(run(), w64.grad) for key, run in weight_grad.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="xt,t", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: [d for d in s.split(",") if d])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device here: this compares GPU kernels")
    if depthwise._triton_kernels() is None:
        parser.error("kernels/triton_depthwise.py does not import here (is triton installed?)")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    unknown = [d for d in args.dtypes if d not in dtypes]
    if unknown:
        parser.error(f"unknown --dtypes {unknown} (valid: {', '.join(dtypes)})")
    gpu = torch.cuda.get_device_name()
    slug = re.sub("[^a-z0-9]+", "-", gpu.lower()).strip("-")
    lines = [
        f"# Depthwise convolutions on {gpu}: PyTorch (cuDNN) against Triton",
        "",
        f"torch {torch.__version__}, batch {args.batch_size}, NCHW, CUDA-event medians of {args.rounds} interleaved "
        "calls; error: largest difference from float64 on the CPU, relative to the largest value. "
        "Per step: each row times the DilatedRepConvs of the preset that run it, forward twice "
        "(forward, input gradient) plus the weight gradient (`python benchmarks/depthwise_gpu.py`).",
    ]
    report: dict = {"device": gpu, "torch": torch.__version__, "batch_size": args.batch_size, "results": []}
    for dtype_name in args.dtypes:
        for preset in args.presets:
            lines += [
                "",
                f"## {preset}, {dtype_name}",
                "",
                "| channels, map | kernel | runs | forward ms: PyTorch / Triton | weight grad ms: PyTorch / Triton "
                "| forward error: PyTorch / Triton | weight grad error: PyTorch / Triton |",
                "|---|---|---|---|---|---|---|",
            ]
            totals = {"pytorch": 0.0, "triton": 0.0, "best": 0.0}
            for (channels, side, size), runs in sorted(preset_kernels(preset).items()):
                for kernel, dilation in [(size, 1), *DILATED_REPCONV_BRANCHES[size]]:
                    row = measure(args.batch_size, channels, side, kernel, dilation, dtypes[dtype_name], args.rounds)
                    fwd, wgrad = row["forward_ms"], row["weight_grad_ms"]
                    for key in ("pytorch", "triton"):
                        totals[key] += runs * (2 * fwd[key] + wgrad[key])
                    totals["best"] += runs * (2 * min(fwd.values()) + min(wgrad.values()))
                    name = f"{kernel}x{kernel}" + (f" d{dilation}" if dilation > 1 else "")
                    fe, we = row["forward_error"], row["weight_grad_error"]
                    lines.append(
                        f"| {channels}, {side}x{side} | {name} | {runs} | {fwd['pytorch']:.3f} / {fwd['triton']:.3f} | "
                        f"{wgrad['pytorch']:.3f} / {wgrad['triton']:.3f} | {fe['pytorch']:.1e} / {fe['triton']:.1e} | "
                        f"{we['pytorch']:.1e} / {we['triton']:.1e} |"
                    )
                    print(lines[-1], flush=True)
                    report["results"].append(
                        {
                            "preset": preset,
                            "dtype": dtype_name,
                            "channels": channels,
                            "side": side,
                            "kernel": kernel,
                            "dilation": dilation,
                            "runs": runs,
                            **row,
                        }
                    )
            lines += [
                "",
                f"Per training step, the DilatedRepConvs' depthwise convolutions: PyTorch {totals['pytorch']:.1f} ms, "
                f"Triton {totals['triton']:.1f} ms, the faster per shape {totals['best']:.1f} ms.",
            ]
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"depthwise_gpu_{slug}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"depthwise_gpu_{slug}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
