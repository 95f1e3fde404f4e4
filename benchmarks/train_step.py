"""Training-step throughput of a preset on this machine, ContMix backends interleaved step by step.

    python benchmarks/train_step.py                       # XT, 224x224, batch 8: auto vs reference vs unfold
    python benchmarks/train_step.py --preset t --rounds 4

Alternating the backends step by step on one model in one process means they all see the same
machine load, which matters on a shared machine: the comparison stays fair even when the absolute
numbers move. A step is forward, OverLoCK loss (main + 0.4 aux), backward, clipping and AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from overlock.builder import build
from overlock.training.loss import OverlockLoss
from overlock.training.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xt")
    parser.add_argument("--backends", default="auto,reference,unfold")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()

    backends = args.backends.split(",")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.preset).to(device).train()
    optimizer = build_optimizer(model, 1e-3, 0.05)
    criterion = OverlockLoss(0.4, 0.1)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, model.spec.head.num_classes, (args.batch_size,), device=device)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {b: [] for b in backends}
    for backend in backends:  # warm-up
        model.set_contmix_backend(backend)
        step()
    for _ in range(args.rounds):
        for backend in backends:
            model.set_contmix_backend(backend)
            times[backend].append(step())

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(
        title=f"{args.preset} training step, {args.img_size}px, batch {args.batch_size}, {name}, torch {torch.__version__}"
    )
    for column in ("ContMix backend", "median s/step", "images/s", "vs first"):
        table.add_column(column, justify="left" if column == "ContMix backend" else "right")
    first = statistics.median(times[backends[0]])
    for backend, samples in times.items():
        median = statistics.median(samples)
        table.add_row(
            backend,
            f"{median:.2f}",
            f"{args.batch_size / median:.2f}",
            f"{first / median:.2f}x" if backend != backends[0] else "1.00x",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
