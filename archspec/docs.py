"""Markdown tables of the spec's fields, generated from the models (the README embeds them).

`python -m overlock.archspec.docs` prints the tables; a test checks that the README's copy
between the `spec-fields` markers is up to date, so docs and schema cannot drift apart.
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .schema import BlockStage, Context, FocusStage, Head, Norm, Spec, Stem

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", Spec),
    ("`stem`", Stem),
    ("`base.stages[i]` and `overview`", BlockStage),
    ("`focus.stages[i]`", FocusStage),
    ("`context`", Context),
    ("`head`", Head),
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


def fields_markdown() -> str:
    parts = []
    for title, model in SECTIONS:
        parts.append(f"**{title}**: {(model.__doc__ or '').strip().splitlines()[0]}\n")
        parts.append("| field | type | default | meaning |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            parts.append(f"| `{name}` | {_type_name(field)} | {_default(field)} | {field.description or ''} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(fields_markdown(), end="")
