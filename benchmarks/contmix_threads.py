"""Thread scaling of the CPU ContMix path: the C kernel's tasks on torch's OpenMP threads vs on overlock's pool.

    python benchmarks/contmix_threads.py                  # T stage-3 shape at 448 (28x28, K=13), batch 8
    python benchmarks/contmix_threads.py --contend        # the same with a busy process on one core

Forward+backward of `kernels.contmix(backend="cpu")` at 1 and N threads, interleaved call by call,
its C kernels' tasks run two ways: "pool" (overlock's Python thread pool, one ctypes call per task,
as before round 21 and where torch has no GNU OpenMP) and "openmp" (one call, the tasks on torch's
own OpenMP team; kernels/csrc/tasks.h). Where the libraries were built without OpenMP
(`OVERLOCK_NATIVE_OPENMP=0`) both rows run the pool. `--contend` starts a spinning process (pinned
to the last core where possible) for the duration, which is what a shared machine or a data-loader
worker does to a training run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from overlock import kernels
from overlock.archspec import load
from overlock.kernels import native


def spin() -> None:
    try:
        os.sched_setaffinity(0, {os.cpu_count() - 1})
    except (AttributeError, OSError):
        pass
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--contend", action="store_true")
    args = parser.parse_args()

    stage = load(args.preset).focus.stages[0]
    size, k, heads = args.img_size // 16, stage.kernel_size, 2 * stage.groups
    channels = stage.width // (2 * heads)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch_size, heads, size, size, k * k, generator=gen, requires_grad=True)
    rpb = torch.zeros(heads, 2 * k - 1, 2 * k - 1, requires_grad=True)
    value = torch.randn(args.batch_size, heads, size, size, channels, generator=gen, requires_grad=True)
    grad = torch.randn(args.batch_size, heads, size, size, channels, generator=gen)
    built_with_openmp = native.openmp

    def call(mode: str) -> float:
        if mode == "pool":
            native.openmp = lambda name: False  # native.run then hands each task to the pool
        try:
            tick = time.perf_counter()
            out = kernels.contmix(logits, rpb, value, k, backend="cpu")
            torch.autograd.grad(out, (logits, rpb, value), grad)
            return time.perf_counter() - tick
        finally:
            native.openmp = built_with_openmp

    spinner = None
    if args.contend:
        spinner = multiprocessing.Process(target=spin, daemon=True)
        spinner.start()
    try:
        times: dict[tuple[int, str], list[float]] = {}
        settings = [(1, "openmp"), (args.threads, "pool"), (args.threads, "openmp")]
        for threads, mode in settings:  # warm-up
            torch.set_num_threads(threads)
            call(mode)
        for _ in range(args.rounds):
            for threads, mode in settings:
                torch.set_num_threads(threads)
                times.setdefault((threads, mode), []).append(call(mode))
    finally:
        if spinner is not None:
            spinner.terminate()
    base = statistics.median(times[(1, "openmp")])
    print(
        f"{args.preset} stage-3 ContMix at {args.img_size}: {size}x{size}, K={k}, {heads} heads x {channels} channels, "
        f"batch {args.batch_size}; forward+backward; {'with' if args.contend else 'without'} a busy core; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for (threads, mode), samples in times.items():
        median = statistics.median(samples)
        print(f"  {threads} thread(s), {mode:6}: median {median:.3f} s  ({base / median:.2f}x vs 1 thread)")


if __name__ == "__main__":
    main()
