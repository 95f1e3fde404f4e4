"""Markdown tables of the spec's fields, generated from the models (the README embeds them).

`python -m overlock.archspec.docs` prints the tables; a test checks that the README's copy
between the `spec-fields` markers is up to date, so docs and schema cannot drift apart.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .mixers import MIXER_CONFIGS
from .schema import (
    Block,
    BlockStage,
    Context,
    DDSSpec,
    Downsample,
    Feedback,
    FocusStage,
    Head,
    Norm,
    PyramidHead,
    PyramidSpec,
    Stem,
)

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level (`topology: dds`, the default)", DDSSpec),
    ("top level with `topology: pyramid`", PyramidSpec),
    ("`stem`", Stem),
    ("`downsample`", Downsample),
    ("`base.stages[i]`, `overview` and (pyramid) `stages[i]`", BlockStage),
    ("`focus.stages[i]`", FocusStage),
    ("`block` (of any stage)", Block),
    ("`context`", Context),
    ("`head`", Head),
    ("`head` of a pyramid", PyramidHead),
    ("`feedback` (pyramid)", Feedback),
    ("`norm`", Norm),
]


def _type_name(field) -> str:
    """'int > 0 or null', 'list of FocusStage', "'layernorm' / 'batchnorm'": readable in a table."""
    annotation, metadata, nullable = field.annotation, list(field.metadata), False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        nullable = type(None) in args
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata += [m for e in extra for m in getattr(e, "metadata", [e])]
    if typing.get_origin(annotation) is typing.Literal:
        name = " / ".join(f"`{a}`" for a in typing.get_args(annotation))
    elif typing.get_origin(annotation) is list:
        name = f"list of {typing.get_args(annotation)[0].__name__}"
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        name = "mapping (`type` + arguments)"
    else:
        name = annotation.__name__
    bounds = []
    for item in metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{symbol} {value:,}" if isinstance(value, int) else f"{symbol} {value}")
    if bounds:
        name += " " + ", ".join(bounds)
    return name + (" or null" if nullable else "")


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "(mapping)"
    value = field.default
    if value is PydanticUndefined:
        return ""
    return "null" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def fields_markdown() -> str:
    parts = []
    for title, model in SECTIONS:
        parts.append(f"**{title}**: {_first_paragraph(model.__doc__)}\n")
        parts.append("| field | type | default | meaning |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            parts.append(f"| `{name}` | {_type_name(field)} | {_default(field)} | {field.description or ''} |")
        parts.append("")
    parts.append(mixers_markdown())
    return "\n".join(parts).rstrip() + "\n"


def mixers_markdown() -> str:
    """One row per registered token mixer: its `type`, arguments and what it is."""
    lines = [
        "**`block.mixer` types** (arguments left out take the stage's field of the same name):\n",
        "| type | arguments | what it is |",
        "|---|---|---|",
    ]
    for model in MIXER_CONFIGS:
        tag = typing.get_args(model.model_fields["type"].annotation)[0]
        args = ", ".join(f"`{name}`" for name in model.model_fields if name != "type") or "none"
        lines.append(f"| `{tag}` | {args} | {_first_paragraph(model.__doc__)} |")
    return "\n".join(lines) + "\n"


def write_readme_section(readme: Path, name: str, text: str) -> None:
    """Replace what stands between `<!-- NAME:start -->` and `<!-- NAME:end -->` in `readme` with
    `text`: how every generated table gets into the README (numbers from commands, never typed)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    try:
        current = readme.read_text()
    except OSError as exc:
        raise SystemExit(f"cannot read {readme}: {exc.strerror or exc}") from None
    if current.count(start) != 1 or current.count(end) != 1 or current.index(start) > current.index(end):
        raise SystemExit(f"{readme} needs exactly one {start} ... {end} pair of markers")
    head, rest = current.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text.strip(chr(10))}\n{end}{tail}")


if __name__ == "__main__":
    print(fields_markdown(), end="")
