"""What AdamW's update costs per training step, per implementation, on this machine.

    python benchmarks/optimizer.py                  # XT and T, one thread
    python benchmarks/optimizer.py --presets t --rounds 20

`training/optim.py` builds the fused AdamW wherever the device has the kernel (`overlock train`
and `overlock bench --train` run it); this measures it against PyTorch's per-parameter loop (its
CPU default) and its foreach form on the same parameters with the same gradients, interleaved step
by step, medians. The update does not depend on the model's speed, so it is a fixed cost per step
that grows with the parameter count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from overlock.builder import build

FORMS = {"per-parameter loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="xt,t")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    table = Table(title=f"AdamW step, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
    for column in ("preset", "parameters", *(f"{form} ms" for form in FORMS), "fused vs loop"):
        table.add_column(column, justify="right")
    for preset in args.presets.split(","):
        params = [p for p in build(preset).parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizers = {form: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **kw) for form, kw in FORMS.items()}
        times: dict[str, list[float]] = {form: [] for form in FORMS}
        for optimizer in optimizers.values():  # warm-up: creates the moments
            optimizer.step()
        for _ in range(args.rounds):
            for form, optimizer in optimizers.items():
                start = time.perf_counter()
                optimizer.step()
                times[form].append(time.perf_counter() - start)
        medians = {form: statistics.median(t) * 1e3 for form, t in times.items()}
        count = sum(p.numel() for p in params) / 1e6
        cells = [f"{medians[form]:.1f}" for form in FORMS]
        table.add_row(preset, f"{count:.1f}M", *cells, f"{medians['per-parameter loop'] / medians['fused']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
