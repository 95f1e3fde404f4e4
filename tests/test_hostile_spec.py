"""Hostile and odd spec input (issue 13): bounded YAML, strict types, merge keys, clear errors.

Every test here failed before the mechanism it pins: a bounded loader (node budget, nesting depth,
`extends` chain), strict pydantic types, YAML merge keys, and messages that quote user text safely.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from overlock import archspec
from overlock.errors import SpecError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(source, overrides=None) -> str:
    with pytest.raises(SpecError) as info:
        archspec.load(source, overrides)
    return str(info.value)


def alias_bomb(levels: int = 9, fan_out: int = 9) -> str:
    """'Billion laughs': 9 levels of 9 aliases each expand to 9^9 strings from a 1 KiB file."""
    lines = ["extends: pico", f"a0: &a0 [{', '.join(['lol'] * fan_out)}]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan_out)}]")
    lines.append(f"description: *a{levels}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_quickly_under_any_key(tmp_path):
    started = time.perf_counter()
    message = error_of(write(tmp_path, "bomb.yaml", alias_bomb()))
    assert "more than 100,000 YAML nodes" in message and "alias" in message
    assert time.perf_counter() - started < 5


def test_a_recursive_alias_is_refused(tmp_path):
    message = error_of(write(tmp_path, "rec.yaml", "extends: pico\nname: &a [*a]\n"))
    assert "rec.yaml:2" in message and "recursive" in message


@pytest.mark.parametrize("depth", [65, 2000])
def test_deep_nesting_in_a_file_or_a_set_value_is_refused(tmp_path, depth):
    nested = "[" * depth + "]" * depth
    assert "nested more than 64 levels" in error_of(write(tmp_path, "deep.yaml", f"extends: pico\nname: {nested}\n"))
    message = error_of("pico", [f"name={nested}"])
    assert "nested more than 64 levels" in message
    assert len(message) < 400, "the --set value is quoted shortened"


def test_aliases_that_nest_deep_without_deep_text_are_refused(tmp_path):
    lines = ["extends: pico", "a0: &a0 [x]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 70)]
    assert "aliases nest the spec more than 64" in error_of(write(tmp_path, "chain.yaml", "\n".join(lines) + "\n"))


def test_ordinary_aliases_still_work(tmp_path):
    text = "extends: pico\nname: &n twin\ndescription: *n\n"
    spec = archspec.load(write(tmp_path, "alias.yaml", text))
    assert spec.name == spec.description == "twin"


def test_a_long_extends_chain_is_a_clear_error_not_a_recursion_error(tmp_path):
    write(tmp_path, "f0.yaml", "extends: pico\n")
    for i in range(1, 200):
        write(tmp_path, f"f{i}.yaml", f"extends: f{i - 1}.yaml\n")
    assert "chain is longer than 32 files" in error_of(tmp_path / "f199.yaml")
    assert archspec.load(tmp_path / "f20.yaml").name == "overlock-pico"


def test_a_huge_spec_file_is_refused_by_size(tmp_path):
    path = write(tmp_path, "big.yaml", "extends: pico\ndescription: " + "x" * (1 << 20) + "\n")
    assert "a spec is a small file" in error_of(path)


def test_merging_a_wide_spec_is_linear():
    # A parent and a child with 10,000 paths each: the stale-line scan compared every child path with
    # every parent path (10^8 steps, minutes); linear, the merge takes milliseconds.
    from overlock.archspec.loader import RawSpec, _merge

    n = 10_000
    parent = RawSpec(
        {"y": ["x"] * n}, {("y",): "p.yaml:1", **{("y", i): f"p.yaml:{i + 2}" for i in range(n)}}, "p.yaml"
    )
    keys = {f"k{i}": 1 for i in range(n)}
    child = RawSpec(
        {"x": keys}, {("x",): "c.yaml:1", **{("x", k): f"c.yaml:{i + 2}" for i, k in enumerate(keys)}}, "c.yaml"
    )
    started = time.perf_counter()
    merged = _merge(parent, child)
    assert time.perf_counter() - started < 2
    assert merged.where[("y", n - 1)] == f"p.yaml:{n + 1}" and merged.where[("x", "k0")] == "c.yaml:2"
    assert merged.data == {"y": ["x"] * n, "x": keys}


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f"])
def test_control_characters_in_yaml_are_a_spec_error(tmp_path, char):
    message = error_of(write(tmp_path, "ctl.yaml", f"extends: pico\nname: a{char}b\n"))
    assert "ctl.yaml" in message and "special characters" in message


def test_a_number_with_thousands_of_digits_is_a_spec_error(tmp_path):
    assert "cannot be read" in error_of(write(tmp_path, "n.yaml", "extends: pico\noverview:\n  depth: " + "9" * 5000))
    assert "--set" in error_of("pico", ["overview.depth=" + "9" * 5000])


@pytest.mark.parametrize("value", ["!!float", "!!int", "!!timestamp 2001-13-45", "!!float 1e99999", "!!binary ==="])
def test_odd_typed_scalars_are_spec_errors(tmp_path, value):
    # Found by tests/test_fuzz.py: PyYAML raised IndexError for an empty `!!float`.
    assert "spec.yaml" in error_of(write(tmp_path, "spec.yaml", f"extends: pico\nname: {value}\n"))


def test_non_scalar_keys_are_a_spec_error(tmp_path):
    assert "keys are field names" in error_of(write(tmp_path, "k.yaml", "extends: pico\n? [a, b]\n: 1\n"))


def test_yaml_merge_keys_are_valid_and_overrides_win(tmp_path):
    text = (
        "extends: pico\nbase:\n  stages:\n"
        "    - &stage {width: 16, depth: 2, kernel_size: 7}\n"
        "    - <<: *stage\n      width: 32\n"
        "    - <<: *stage\n      width: 64\n      depth: 1\n"
    )
    spec = archspec.load(write(tmp_path, "merge.yaml", text))
    assert [(s.width, s.depth, s.kernel_size) for s in spec.base.stages] == [(16, 2, 7), (32, 2, 7), (64, 1, 7)]
    # A wrong value is located where it was written: merged-in values at the anchor, overrides where they are.
    message = error_of(
        write(tmp_path, "bad.yaml", text.replace("depth: 2", "depth: 0").replace("depth: 1", "depth: -1"))
    )
    assert "base.stages[1].depth (" in message and message.count("bad.yaml:4") == 2
    assert "base.stages[2].depth (" in message and "bad.yaml:9" in message


def test_a_key_written_twice_next_to_a_merge_key_is_still_an_error(tmp_path):
    text = "extends: pico\nx: &s {width: 16}\noverview:\n  <<: *s\n  depth: 1\n  depth: 2\n"
    assert "written twice" in error_of(write(tmp_path, "dup.yaml", text))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("head.num_classes=true", "head.num_classes"),
        ("overview.depth=true", "overview.depth"),
        ("overview.depth='12'", "overview.depth"),
        ("overview.mlp_ratio='4'", "overview.mlp_ratio"),
        ("overview.mlp_ratio=false", "overview.mlp_ratio"),
        ("context.gate=1", "context.gate"),
        ("name=12", "name"),
    ],
)
def test_booleans_are_not_integers_and_strings_are_not_numbers(override, field):
    assert field in error_of("pico", [override])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e308"])
def test_infinite_or_overflowing_ratios_are_spec_errors(value):
    assert "overview.mlp_ratio" in error_of("pico", [f"overview.mlp_ratio={value}"])


@pytest.mark.parametrize("value", ["99999999999999999999999999999", str(2**63 - 1), str(2**40)])
def test_sizes_beyond_any_buildable_network_are_spec_errors(value):
    assert "stem.width" in error_of("pico", [f"stem.width={value}"])
    assert "head.num_classes" in error_of("pico", [f"head.num_classes={value}"])


def test_extends_cannot_be_set_from_the_command_line():
    assert "`extends` cannot be overridden" in error_of("pico", ["extends=xt"])


def test_a_mistyped_set_path_suggests_the_nearest_key():
    message = error_of("pico", ["focus.stagez.0.groups=2"])
    assert "unknown key 'stagez'" in message and "did you mean 'focus.stages'" in message


def test_odd_set_keys_are_spec_errors_not_crashes():
    for key in ["focus.stages.²", "focus.stages." + "9" * 5000, "focus..x", "."]:
        assert "--set" in error_of("pico", [f"{key}=1"])


def test_spec_strings_from_checkpoints_go_through_the_same_bounded_reader():
    with pytest.raises(SpecError, match="more than 100,000 YAML nodes"):
        archspec.loads(alias_bomb(), "<checkpoint>")
    assert archspec.loads(archspec.load("pico").to_yaml(), "<checkpoint>").name == "overlock-pico"
