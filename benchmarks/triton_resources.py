"""Registers, spills and shared memory of the ContMix Triton kernels at every preset's shapes, for one GPU arch.

    python benchmarks/triton_resources.py                 # sm_90 (H100/H200), all presets, 224 and 512
    python benchmarks/triton_resources.py --arch 80       # A100

No GPU needed: `overlock.kernels.triton_aot` compiles the variants the launchers would launch with
the ptxas that Triton ships, and reads ptxas's report for each: registers per thread, stack frame,
bytes of register spills (stores + loads to local memory, which slow a kernel down several
times), and shared memory. Registers above 128 per thread cap occupancy at 4 programs of 4 warps
per SM. Writes benchmarks/results/triton_resources_sm<arch>.md.

Run it without TRITON_INTERPRET set (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import triton
from contmix import RESULTS, focus_cases
from rich.console import Console
from rich.table import Table

from overlock.kernels import triton_aot

console = Console(highlight=False)
HEADER = ["K", "c", "map", "dtype", "op", "kernel", "tile (J x K x C)", "registers", "stack", "spill bytes", "shared"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["xt", "t", "s", "b"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    shapes = sorted({(c.kernel_size, c.channels, c.width) for c in focus_cases(args.presets, args.resolutions, 1)})
    rows = []
    for kernel_size, channels, width in shapes:
        for dtype in args.dtypes:
            for softmax in (True, False):
                compiled = triton_aot.compile_ahead(
                    width, kernel_size, channels, getattr(torch, dtype), softmax=softmax, arch=args.arch
                )
                for item in compiled:
                    tile_k = item.config.get("BLOCK_K", item.config.get("BLOCK_D"))
                    tile = f"{item.config['BLOCK_J']} x {tile_k} x {item.config['BLOCK_C']}"
                    op = "contmix" if softmax else "aggregate"
                    rows.append(
                        [kernel_size, channels, width, dtype, op, item.kernel, tile, item.registers]
                        + [item.stack_bytes, item.spill_bytes, item.shared_bytes]
                    )

    table = Table(title=f"ContMix Triton kernels compiled for sm_{args.arch} (triton {triton.__version__})")
    for column in HEADER:
        table.add_column(column, justify="left" if column in ("dtype", "op", "kernel") else "right")
    for row in rows:
        table.add_row(*(str(x) for x in row))
    console.print(table)
    spilling = [row for row in rows if row[9] > 0]
    summary = (
        f"{len(rows)} kernels, registers {min(r[7] for r in rows)}-{max(r[7] for r in rows)} per thread, "
        f"{len(spilling)} that spill registers (ptxas spill stores + loads > 0)."
    )
    console.print(summary)

    date = datetime.date.today().isoformat()
    lines = [
        f"# ContMix Triton kernels compiled for sm_{args.arch}",
        "",
        f"{date}, triton {triton.__version__}, 4 warps, compiled ahead of time without a GPU "
        f"(`python benchmarks/triton_resources.py --arch {args.arch}`). Shapes: the Focus-Net ContMix calls of "
        f"{', '.join(args.presets)} at {', '.join(map(str, args.resolutions))} px ({len(shapes)} distinct (K, c, map)).",
        "",
        summary,
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"triton_resources_sm{args.arch}.md"
    path.write_text("\n".join(lines) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
