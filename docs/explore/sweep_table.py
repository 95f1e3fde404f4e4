"""Write a sweep's rows (`overlock sweep ... --json` on stdin) as the Markdown table of README.md's
"Exploring designs" section, between its `<!-- pico-sweep:start -->` and `<!-- pico-sweep:end -->`
markers, so that the README shows what the command measured and nothing typed by hand.

Usage (see regenerate.sh): overlock sweep ... --json | python docs/explore/sweep_table.py README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from overlock.archspec.docs import write_readme_section


def table(rows: list[dict]) -> str:
    size = "x".join(map(str, rows[0]["input_size"])) if rows else "?"
    lines = [
        f"| # | variant | params | inference params | MFLOPs ({size}) | best val top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, start=1):
        variant = " ".join(
            f"{key.rsplit('.', 1)[-1]}={value}" for key, _, value in (o.partition("=") for o in row["overrides"])
        )
        top1 = f"{100 * row['top1']:.2f}%" if "top1" in row else "-"
        lines.append(
            f"| {i} | `{variant}` | {row['params'] / 1e6:.3f}M | {row['inference_params'] / 1e6:.3f}M "
            f"| {row['flops'] / 1e6:.1f} | {top1} |"
        )
    return "\n".join(lines)


def main() -> None:
    write_readme_section(Path(sys.argv[1]), "pico-sweep", table(json.load(sys.stdin)))


if __name__ == "__main__":
    main()
