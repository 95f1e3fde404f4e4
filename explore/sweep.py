"""`overlock sweep`: the Cartesian product of `--set` overrides on a base spec, validated, written
out and compared, with results stored per variant so that an interrupted sweep resumes.

Layout of the output directory:
  DIR/variants/<id>.yaml          every valid variant, resolved (`Spec.to_yaml()`)
  DIR/results/<id>.json           its `compare` row (with the settings it was measured under)
  DIR/runs/<id>/                  its training run (with --train)
  DIR/sweep.json, DIR/results.csv the whole sweep: valid/invalid variants and every finished row
A variant id is a hash of its overrides, so it does not change when the grid grows or reorders;
a result is reused only if it was measured under the same settings (input size, --measure, --train).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import archspec
from ..archspec.loader import parse_yaml
from ..checkpoint import write_atomic
from ..errors import OverlockError, SpecError
from .compare import TrainSettings, check_trainable, compare_one, to_csv

GRID_FORM = (
    "KEY=V1,V2,...: the values are separated by commas; a value that holds commas is a YAML flow "
    "item, bracketed or quoted, e.g. 'base.stages.2={width: 64, depth: 1},{width: 96, depth: 2}' or "
    "'name=\"a,b\",c'"
)
_CLOSING = {"[": "]", "{": "}"}


def split_values(entry: str, text: str) -> list[str]:
    """'1,[2,3],{a: 4},"x,y"' -> ['1', '[2,3]', '{a: 4}', '"x,y"']: split at commas outside
    brackets, braces and quoted strings, so that every value is one YAML flow item (what `--set`
    reads). Unbalanced brackets, an unclosed quote or an empty value are errors that point at the
    character, before anything is expanded."""
    items: list[str] = []
    current: list[str] = []
    open_at: list[tuple[str, int]] = []  # expected closing bracket, where its opener is
    quote: tuple[str, int] | None = None

    def fail(problem: str, at: int) -> OverlockError:
        shown = f"{entry[: len(entry) - len(text)]}{text}"
        caret = " " * (len(shown) - len(text) + at) + "^"
        return OverlockError(f"--grid {entry!r}: {problem}\n  {shown}\n  {caret}\n{GRID_FORM}")

    i = 0
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == quote[0]:
                if ch == "'" and text[i + 1 : i + 2] == "'":  # YAML's '' inside a single-quoted string
                    current.append(ch)
                    i += 1
                else:
                    quote = None
            elif ch == "\\" and quote[0] == '"':  # an escape: the next character is not the end
                current.append(ch)
                i += 1
                ch = text[i] if i < len(text) else ""
        elif ch in "'\"" and ("".join(current).strip()[-1:] or ",") in "[{,:":
            quote = (ch, i)  # a quote opens a string only where a YAML scalar can start
        elif ch in _CLOSING:
            open_at.append((_CLOSING[ch], i))
        elif ch in "]}":
            if not open_at:
                raise fail(f"{ch!r} closes nothing", i)
            expected, _ = open_at.pop()
            if ch != expected:
                raise fail(f"{ch!r} where {expected!r} was expected", i)
        elif ch == "," and not open_at:
            items.append("".join(current))
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    if quote is not None:
        raise fail(f"the string opened by {quote[0]} is never closed", quote[1])
    if open_at:
        raise fail(f"this bracket is never closed (expected {open_at[-1][0]!r})", open_at[-1][1])
    items.append("".join(current))
    values = [item.strip() for item in items]
    if not all(values):
        raise OverlockError(f"--grid {entry!r}: value {values.index('') + 1} is empty\n{GRID_FORM}")
    for number, value in enumerate(values, start=1):
        if value[0] in "[{'\"":  # a flow item: check it is YAML now, not after half the variants ran
            try:
                parse_yaml(value, "value")
            except SpecError as exc:
                raise OverlockError(f"--grid {entry!r}: value {number} {value!r} is not YAML: {exc}") from None
    return values


def parse_grid(entries: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2,...` -> (KEY, [V1, V2, ...]) (see `split_values`); a key given twice or without
    values is an error. Each value is kept as written: `KEY=V` is then an ordinary `--set`."""
    grid: list[tuple[str, list[str]]] = []
    for entry in entries:
        key, sep, values = entry.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise OverlockError(f"--grid {entry!r}: expected KEY=V1,V2,... e.g. focus.stages.0.groups=2,4\n{GRID_FORM}")
        items = split_values(entry, values)
        if any(key == k for k, _ in grid):
            raise OverlockError(f"--grid {key} is given twice; give all its values in one --grid {key}=V1,V2,...")
        grid.append((key, list(dict.fromkeys(items))))
    if not grid:
        raise OverlockError("give at least one --grid KEY=V1,V2,...")
    return grid


def short_label(overrides: list[str]) -> str:
    """'focus.stages.0.groups=4 base.stages.2.depth=2' -> 'groups=4 depth=2' (for plots)."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, _, value in (o.partition("=") for o in overrides))


def variant_id(overrides: list[str]) -> str:
    return hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:10]


@dataclass
class Variant:
    overrides: list[str]  # the grid's, in grid order (the base --set ones are not repeated here)
    id: str
    spec: archspec.Spec | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


@dataclass
class SweepPlan:
    base: str
    base_overrides: list[str]
    variants: list[Variant] = field(default_factory=list)

    @property
    def valid(self) -> list[Variant]:
        return [v for v in self.variants if v.spec is not None]

    @property
    def invalid(self) -> list[Variant]:
        return [v for v in self.variants if v.spec is None]


def expand(base: str, base_overrides: list[str], grid: list[tuple[str, list[str]]]) -> SweepPlan:
    """Every combination, validated; an invalid one keeps its validation message instead of a spec."""
    archspec.load(base, base_overrides)  # the base itself must be valid: that is the user's error, not a variant's
    plan = SweepPlan(base, list(base_overrides))
    keys = [k for k, _ in grid]
    for values in itertools.product(*(vs for _, vs in grid)):
        overrides = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
        variant = Variant(overrides, variant_id([*base_overrides, *overrides]))
        try:
            variant.spec = archspec.load(base, [*base_overrides, *overrides])
        except SpecError as exc:
            variant.error = str(exc)
        plan.variants.append(variant)
    return plan


def settings_key(input_size: tuple[int, int], measure: bool, train: TrainSettings | None) -> dict[str, Any]:
    """What a stored result was measured under; a result under other settings is measured again."""
    return {"input_size": list(input_size), "measure": measure, "train": asdict(train) if train else None}


class SweepDir:
    """The output directory of a sweep (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if root.exists() and not root.is_dir():
            raise OverlockError(f"--out {root} is a file; give a directory")

    def spec_path(self, v: Variant) -> Path:
        return self.root / "variants" / f"{v.id}.yaml"

    def result_path(self, v: Variant) -> Path:
        return self.root / "results" / f"{v.id}.json"

    def run_dir(self, v: Variant) -> Path:
        return self.root / "runs" / v.id

    def stored(self, v: Variant, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The variant's finished row, if it was measured under these settings."""
        path = self.result_path(v)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data["row"] if data.get("settings") == settings and "row" in data else None

    def write_text(self, path: Path, text: str) -> None:
        write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def run_sweep(
    plan: SweepPlan,
    out: Path,
    input_size: tuple[int, int],
    *,
    measure: bool = False,
    train: TrainSettings | None = None,
    on_progress: Callable[[str, Variant, dict[str, Any] | None], None] | None = None,
) -> list[dict[str, Any]]:
    """Write every valid variant's spec, then compare the ones without a stored result.

    Each row is written (atomically) as soon as it is measured, so Ctrl-C loses at most the
    variant in progress; `on_progress(event, variant, row)` gets 'cached', 'start' and 'done'.
    Returns the rows of all valid variants that have one, in grid order.
    """
    directory = SweepDir(out)
    settings = settings_key(input_size, measure, train)
    for v in plan.valid:
        directory.write_text(directory.spec_path(v), v.spec.to_yaml())
    _write_summary(directory, plan, settings, [])
    if train is not None:  # every variant still to run must fit the data before the first one trains
        todo = [v for v in plan.valid if directory.stored(v, settings) is None]
        check_trainable([(v.label, str(directory.spec_path(v)), []) for v in todo], train)
    rows: list[dict[str, Any]] = []
    for v in plan.valid:
        row = directory.stored(v, settings)
        if row is not None:
            if on_progress:
                on_progress("cached", v, row)
        else:
            if on_progress:
                on_progress("start", v, None)
            row = compare_one(
                str(directory.spec_path(v)),
                [],
                input_size,
                measure_speed=measure,
                train=train,
                train_dir=directory.run_dir(v) if train else None,
            )
            row.update(variant=v.id, label=v.label, overrides=v.overrides)
            directory.write_text(directory.result_path(v), json.dumps({"settings": settings, "row": row}, indent=1))
            if on_progress:
                on_progress("done", v, row)
        rows.append(row)
        _write_summary(directory, plan, settings, rows)
    return rows


def _write_summary(directory: SweepDir, plan: SweepPlan, settings: dict[str, Any], rows: list[dict]) -> None:
    summary = {
        "base": plan.base,
        "base_overrides": plan.base_overrides,
        "settings": settings,
        "variants": [
            {"id": v.id, "overrides": v.overrides, "valid": v.spec is not None, "error": v.error} for v in plan.variants
        ],
        "finished": len(rows),
    }
    directory.write_text(directory.root / "sweep.json", json.dumps(summary, indent=1))
    directory.write_text(
        directory.root / "results.csv", to_csv([{**r, "name": r.get("label") or r["name"]} for r in rows])
    )
