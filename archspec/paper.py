"""The paper's own ablations as specs (`specs/paper/<table>/`), with the numbers the paper reports.

Each spec there carries the paper's figures in one comment line,
`# paper (224x224, inference model): 2.5 GFLOPs, 15.7M params`, so that the spec and what it is
compared against stay in one file. The tests and `benchmarks/paper_tables.py` read them from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .loader import preset_dir

_PAPER_LINE = re.compile(r"^# paper \(224x224, inference model\): ([\d.]+) GFLOPs, ([\d.]+)M params$", re.M)


@dataclass(frozen=True)
class PaperRow:
    path: Path
    gflops: float
    mparams: float


def paper_tables() -> list[str]:
    return sorted(p.name for p in (preset_dir() / "paper").iterdir() if p.is_dir())


def paper_rows(table: str) -> list[PaperRow]:
    """The specs of one table (`table6`, ...), in row order, with the paper's numbers."""
    rows = []
    for path in sorted((preset_dir() / "paper" / table).glob("*.yaml")):
        found = _PAPER_LINE.search(path.read_text(encoding="utf-8"))
        if found is None:
            raise ValueError(f"{path} has no '# paper (224x224, inference model): G GFLOPs, M params' line")
        rows.append(PaperRow(path, float(found.group(1)), float(found.group(2))))
    return rows
