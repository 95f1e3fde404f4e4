"""Interleaved in-process A/B of the CPU ContMix operator against the kernels/cpu.py of a git revision.

    python benchmarks/contmix_ab.py --base HEAD~1               # Focus-Net shapes at 224 (+ 28x28, 56x56 K=13)
    python benchmarks/contmix_ab.py --base main --reps 21 --threads 1
    python benchmarks/contmix_ab.py --base HEAD~1 --presets xt,t,s,b --reps 5   # every Focus-Net shape at 224/448/512

For every shape it times the forward (`contmix_forward`, no grad) and forward+backward
(`contmix_forward` then `contmix_backward`) of both versions, alternating base and new call by call
so that load changes on a shared machine hit both alike, and prints medians and their ratio
(base / new: > 1 means the working tree is faster). Outputs are compared too (max abs difference).
Both versions call this checkout's C library (kernels/csrc): a base from before 4a80f9c, whose
cpu.py calls the C kernels with their earlier arguments, stops at ctypes' TypeError; compare such
revisions with `benchmarks/commits_ab.py`, which builds each commit's own.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from overlock.kernels import cpu

ROOT = Path(__file__).resolve().parent.parent
# (batch, heads, size, channels, K): XT stage 3 / 4 at 224, T stage 4, and larger maps (448 input)
SHAPES = [
    (8, 8, 14, 16, 13),
    (8, 8, 14, 16, 5),
    (8, 12, 7, 14, 7),
    (8, 12, 7, 14, 5),
    (8, 16, 7, 16, 7),
    (8, 16, 7, 16, 5),
    (8, 8, 28, 16, 13),
    (8, 8, 56, 16, 13),
]


def load_base(revision: str):
    """kernels/cpu.py as of `revision`, imported as a sibling module of overlock.kernels."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:kernels/cpu.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "cpu_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("overlock.kernels._cpu_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def calls(module, shape, train: bool):
    batch, heads, size, channels, k = shape
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, heads, size, size, k * k, generator=gen)
    rpb = torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=gen)
    value = torch.randn(batch, heads, size, size, channels, generator=gen)
    grad = torch.randn(batch, heads, size, size, channels, generator=gen)

    def run():
        out, lse = module.contmix_forward(logits, rpb, value, k)
        if not train:
            return out
        return out, *module.contmix_backward(grad, logits, rpb, value, out, lse, k)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision whose kernels/cpu.py is the baseline")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--presets", help="comma-separated presets: their Focus-Net shapes at 224, 448, 512 instead")
    args = parser.parse_args()
    shapes = SHAPES
    if args.presets:
        from contmix import focus_cases  # benchmarks/ is on sys.path when this script runs

        cases = focus_cases(args.presets.split(","), [224, 448, 512], 8)
        shapes = [(c.batch, c.heads, c.height, c.channels, c.kernel_size) for c in cases if c.height == c.width]
    torch.set_num_threads(args.threads)
    base = load_base(args.base)
    print(f"base {args.base} vs working tree, {args.threads} thread(s), median of {args.reps}, ms")
    print("| shape (B, heads, HxW, c, K) | tile | pass | base | new | base/new | max diff |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        for train in (False, True):
            runs = {"base": calls(base, shape, train), "new": calls(cpu, shape, train)}
            with torch.inference_mode(not train):
                results = {name: run() for name, run in runs.items()}  # warm-up, and the outputs compared
                times: dict[str, list[float]] = {name: [] for name in runs}
                for _ in range(args.reps):
                    for name, run in runs.items():
                        start = time.perf_counter()
                        run()
                        times[name].append(time.perf_counter() - start)
            a, b = results["base"], results["new"]
            a, b = (a,) if not train else a, (b,) if not train else b
            diff = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
            t_base, t_new = (statistics.median(times[name]) * 1e3 for name in ("base", "new"))
            batch, heads, size, channels, k = shape
            tile = "x".join(map(str, cpu._plan_cpu(size, size, k, channels).tile))
            print(
                f"| ({batch}, {heads}, {size}x{size}, {channels}, {k}) | {tile} | {'fwd+bwd' if train else 'fwd'} "
                f"| {t_base:.2f} | {t_new:.2f} | {t_base / t_new:.2f}x | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
