"""Turns YAML files, preset names, dicts and `--set` overrides into a validated `Spec`.

Everything a user can get wrong in a spec surfaces here as a `SpecError` whose message names the
field path (`focus.stages[1].groups`), where it was written (file and line, or the `--set` that
wrote it), what is wrong and what would be valid. YAML is read with the safe loader only.
"""

from __future__ import annotations

import difflib
import importlib.resources
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import SpecError
from .mixers import MIXER_TYPES
from .schema import TOPOLOGIES, DDSSpec, PyramidSpec, Spec

Path_ = tuple[str | int, ...]
MAX_LISTED_ERRORS = 12


def preset_dir() -> Path:
    """The shipped presets (package data, so an installed `overlock` finds them by name)."""
    return Path(str(importlib.resources.files("overlock") / "specs"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def preset_description(name: str) -> str:
    """First comment line of a preset: what it reproduces."""
    for line in (preset_dir() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") and "yaml-language-server" not in line:
            return line.lstrip("# ").strip()
    return ""


def format_path(path: Path_) -> str:
    """('focus', 'stages', 1, 'groups') -> 'focus.stages[1].groups'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<spec>"


@dataclass
class RawSpec:
    """A merged, not yet validated spec, with where each value was written."""

    data: dict[str, Any]
    where: dict[Path_, str] = field(default_factory=dict)
    origin: str = "<dict>"

    def locate(self, path: Path_) -> str:
        """Where the deepest existing prefix of `path` was written."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.where:
                return self.where[path[:end]]
        return self.origin


# ---------------------------------------------------------------------------------------------
# Reading YAML


def _read_yaml(path: Path) -> RawSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError(
            f"{path} is not a text file (not UTF-8): a spec is a YAML file; presets: {', '.join(preset_names())}"
        ) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise SpecError(
            f"{path}:{line}: {exc.problem}.\n  Specs are plain YAML (mappings, lists, numbers, strings, "
            "booleans); tags such as !!python/... are never constructed."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}: YAML syntax error: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        raise SpecError(
            f"{path} is empty: a spec is a mapping with at least base, overview and focus "
            f"(or `extends: <preset>`); presets: {', '.join(preset_names())}"
        )
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the top level of a spec must be a mapping of fields, got {type(data).__name__}")
    where: dict[Path_, str] = {}
    _record_lines(node, (), str(path), where)
    return RawSpec(data, where, str(path))


def _record_lines(node: yaml.Node, path: Path_, file: str, where: dict[Path_, str]) -> None:
    where[path] = f"{file}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise SpecError(
                    f"{file}:{key_node.start_mark.line + 1}: key {format_path((*path, key))!r} is written twice"
                )
            seen.add(key)
            _record_lines(value_node, (*path, key), file, where)
            where[(*path, key)] = f"{file}:{key_node.start_mark.line + 1}"
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*path, index), file, where)


# ---------------------------------------------------------------------------------------------
# extends


def _resolve_target(target: str, relative_to: Path | None) -> Path:
    """`extends:` and CLI sources accept a preset name or a path."""
    candidate = Path(target)
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to.parent / candidate
    if candidate.is_file():
        return candidate.resolve()
    if target in preset_names():
        return (preset_dir() / f"{target}.yaml").resolve()
    if target.strip() and candidate.is_dir():
        raise SpecError(f"{target!r} is a directory; give a spec .yaml file or a preset ({', '.join(preset_names())})")
    raise SpecError(
        f"{target!r} is neither a spec file nor a preset.\n  Presets: {', '.join(preset_names())}; "
        "or give a path to a .yaml file" + (f" (relative to {relative_to})" if relative_to else "")
    )


def _merge(base: RawSpec, child: RawSpec) -> RawSpec:
    """Child overrides base: mappings merge key by key, anything else (lists included) replaces."""

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            out = dict(a)
            for key, value in b.items():
                out[key] = merge(a[key], value) if key in a else value
            return out
        return b

    where = dict(base.where)
    for path in child.where:
        # A replaced list or scalar forgets where its old elements were written.
        for stale in [p for p in where if p[: len(path)] == path and len(p) > len(path)]:
            if not isinstance(_get(child.data, path), dict):
                del where[stale]
    where.update(child.where)
    return RawSpec(merge(base.data, child.data), where, child.origin)


def _get(data: Any, path: Path_) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _load_file(path: Path, stack: tuple[Path, ...] = ()) -> RawSpec:
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise SpecError(f"`extends` forms a cycle: {chain}")
    raw = _read_yaml(path)
    target = raw.data.pop("extends", None)
    if target is None:
        return raw
    if not isinstance(target, str):
        raise SpecError(f"{raw.where[('extends',)]}: extends must be a preset name or a path, got {target!r}")
    try:
        parent_path = _resolve_target(target, path)
    except SpecError as exc:
        raise SpecError(f"{raw.where[('extends',)]}: extends: {exc}") from None
    return _merge(_load_file(parent_path, (*stack, path)), raw)


# ---------------------------------------------------------------------------------------------
# --set overrides


def parse_override(text: str) -> tuple[Path_, Any]:
    """'focus.stages.0.groups=8' -> (('focus', 'stages', 0, 'groups'), 8); values are YAML scalars."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. focus.stages.0.groups=8")
    path = tuple(int(p) if p.lstrip("-").isdigit() else p for p in key.strip().split("."))
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_override(raw: RawSpec, text: str) -> None:
    path, value = parse_override(text)
    node: Any = raw.data
    parts = list(path)  # negative list indices made positive, so errors locate this --set
    for depth, part in enumerate(path[:-1]):
        here = format_path(path[: depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or not -len(node) <= part < len(node):
                size = len(node) if isinstance(node, list) else 0
                raise SpecError(f"--set {text}: {here} does not exist ({format_path(path[:depth])} has {size} entries)")
            parts[depth] = part % len(node)
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise SpecError(f"--set {text}: {_not_a_mapping(path[:depth], node)}")
            node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not -len(node) <= last < len(node):
            raise SpecError(f"--set {text}: {format_path(path)} does not exist")
        parts[-1] = last % len(node)
    elif not isinstance(node, dict):
        raise SpecError(f"--set {text}: {_not_a_mapping(path[:-1], node)}")
    node[last] = value
    raw.where[tuple(parts)] = f"--set {text}"


def _not_a_mapping(path: Path_, node: Any) -> str:
    if isinstance(node, list):
        return f"{format_path(path)} is a list: index it by number, 0 to {len(node) - 1} (e.g. {path[-1]}.0)"
    return f"{format_path(path)} is not a mapping"


# ---------------------------------------------------------------------------------------------
# Validation errors -> one screen


def _unwrap(annotation: Any) -> Any:
    """The model class or list item type behind Optional/Annotated/list annotations."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _walk(loc: Path_, root: type[BaseModel]) -> tuple[Path_, type[BaseModel] | None]:
    """Follow a pydantic error location through the models: the location without the tags that
    discriminated unions insert (`block.mixer.contmix.kernel_size` -> `block.mixer.kernel_size`),
    and the model class at its end (None where it ends on a value or a list)."""
    current: Any = root
    clean: list[str | int] = []
    for part in loc:
        members = _union_members(current)
        if members is not None and part in members:
            current = members[part]  # the tag of a discriminated union: not a key of the spec
            continue
        clean.append(part)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = _unwrap(args[0]) if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = _unwrap(current.model_fields[part].annotation)
        else:
            current = None
    model = current if isinstance(current, type) and issubclass(current, BaseModel) else None
    return tuple(clean), model


def _union_members(annotation: Any) -> dict[str, type[BaseModel]] | None:
    """{tag: model} of a union of models with a literal `type` field (the mixer registry)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members: dict[str, type[BaseModel]] = {}
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "type" in arg.model_fields:
            for tag in typing.get_args(arg.model_fields["type"].annotation):
                members[tag] = arg
    return members or None


def _describe(error: dict[str, Any], raw: RawSpec, root: type[BaseModel]) -> str:
    loc, model = _walk(tuple(error["loc"]), root)
    kind = error["type"]
    if kind == "spec_rule":
        relative = error["ctx"]["field"]
        parts = tuple(int(p) if p.isdigit() else p for p in relative.replace("[", ".").replace("]", "").split("."))
        loc = (*loc, *parts)
        message = error["msg"]
    elif kind == "extra_forbidden":
        model = _walk(tuple(error["loc"])[:-1], root)[1]
        allowed = sorted(model.model_fields) if model else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        message = f"unknown key {str(loc[-1])!r}; {hint}valid keys here: {', '.join(allowed)}"
    elif kind == "union_tag_invalid":
        tag = str(error["ctx"]["tag"])
        guess = difflib.get_close_matches(tag, MIXER_TYPES, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        loc = (*loc, "type")
        message = f"unknown mixer type {tag!r}; {hint}valid types: {', '.join(MIXER_TYPES)}"
    elif kind == "union_tag_not_found":
        loc = (*loc, "type")
        message = f"a mixer needs `type`, one of: {', '.join(MIXER_TYPES)}"
    elif kind == "missing":
        message = "required field is missing" + (
            f" ({model.__name__}: {', '.join(k for k, f in model.model_fields.items() if f.is_required())})"
            if model
            else ""
        )
    else:
        shown = error.get("input")
        message = f"{error['msg']} (got {shown!r})" if not isinstance(shown, dict | list) else error["msg"]
    return f"  {format_path(loc)} ({raw.locate(loc)}): {message}"


def _topology(raw: RawSpec) -> type[DDSSpec] | type[PyramidSpec]:
    """The spec model of the spec's `topology` (default `dds`)."""
    name = raw.data.get("topology", "dds")
    if isinstance(name, str) and name in TOPOLOGIES:
        return TOPOLOGIES[name]
    guess = difflib.get_close_matches(str(name), list(TOPOLOGIES), n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    raise SpecError(
        f"invalid spec {raw.origin}: 1 problem\n  topology ({raw.locate(('topology',))}): unknown topology "
        f"{name!r}; {hint}valid: {', '.join(TOPOLOGIES)}"
    )


def _validate(raw: RawSpec) -> Spec:
    model = _topology(raw)
    try:
        return model.model_validate(raw.data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = [_describe(e, raw, model) for e in errors[:MAX_LISTED_ERRORS]]
        if len(errors) > MAX_LISTED_ERRORS:
            lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more")
        noun = "problem" if len(errors) == 1 else "problems"
        raise SpecError(f"invalid spec {raw.origin}: {len(errors)} {noun}\n" + "\n".join(lines)) from None


# ---------------------------------------------------------------------------------------------
# Public entry point


SpecSource = str | Path | Mapping[str, Any] | DDSSpec | PyramidSpec


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of a spec of any topology (what `overlock schema` prints and the presets reference)."""
    from pydantic import TypeAdapter

    document = TypeAdapter(Spec).json_schema()
    return {**document, "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "overlock spec"}


def load(source: SpecSource, overrides: list[str] | None = None) -> Spec:
    """A validated Spec from a preset name, a YAML path, a dict or a Spec, plus `--set` overrides.

    The result is fully resolved: `extends` is applied and removed, so `spec.to_yaml()` stands on
    its own (that is what run directories and checkpoints record).
    """
    if isinstance(source, Spec):
        raw = RawSpec(source.model_dump(mode="json", exclude={"extends"}), origin=source.name or "<spec>")
    elif isinstance(source, Mapping):
        data = dict(source)
        target = data.pop("extends", None)
        raw = RawSpec(data, origin="<dict>")
        if target is not None:
            raw = _merge(_load_file(_resolve_target(str(target), None)), raw)
    else:
        raw = _load_file(_resolve_target(str(source), None))
    for text in overrides or []:
        apply_override(raw, text)
    raw.data.pop("extends", None)
    return _validate(raw)
