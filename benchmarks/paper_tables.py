"""Paper vs overlock for the paper's tables written as specs (`specs/paper/<table>/`).

    python benchmarks/paper_tables.py table6            # print the markdown table
    python benchmarks/paper_tables.py table6 --readme   # and replace it in README.md

Parameters are those of the inference model (deploy form, no auxiliary head), FLOPs those of one
224x224 image through it (fvcore, one multiply-add = one FLOP), as the paper reports them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from overlock import archspec
from overlock.archspec.docs import write_readme_section
from overlock.archspec.paper import paper_rows
from overlock.builder import build, inference_params
from overlock.builder.flops import count_flops

README = Path(__file__).resolve().parents[1] / "README.md"


def table(name: str) -> str:
    lines = [
        "| row | spec | params (M), paper | overlock | diff | GFLOPs, paper | overlock |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, row in enumerate(paper_rows(name), start=1):
        spec = archspec.load(row.path)
        params = inference_params(spec) / 1e6
        model = build(spec, deploy=True).eval()
        gflops = count_flops(model).total / 1e9
        diff = 100 * (params - row.mparams) / row.mparams
        lines.append(
            f"| {number:02d} | `{row.path.stem}` | {row.mparams:.1f} | {params:.2f} | {diff:+.1f}% "
            f"| {row.gflops:.1f} | {gflops:.2f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=archspec.paper.paper_tables())
    parser.add_argument("--readme", action="store_true", help="replace the table between its markers in README.md")
    args = parser.parse_args()
    text = table(args.table)
    print()
    print(text)
    if args.readme:
        write_readme_section(README, f"paper-{args.table}", text)
        print(f"updated {README}")


if __name__ == "__main__":
    main()
