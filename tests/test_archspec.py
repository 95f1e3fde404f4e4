"""The spec language: presets, inheritance, overrides, and every class of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from overlock import archspec
from overlock.errors import SpecError

TABLE_1 = {  # variant: (base widths, overview width, base depths, overview depth, focus depths, groups)
    "xt": ([56, 112, 256], 336, [2, 2, 3], 2, [6, 2], [4, 6]),
    "t": ([64, 128, 256], 512, [4, 4, 6], 2, [12, 2], [4, 8]),
    "s": ([64, 128, 320], 512, [6, 6, 8], 3, [16, 3], [8, 16]),
    "b": ([80, 160, 384], 576, [8, 8, 10], 4, [20, 4], [6, 9]),
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(source, overrides=None) -> str:
    with pytest.raises(SpecError) as info:
        archspec.load(source, overrides)
    return str(info.value)


@pytest.mark.parametrize("variant", sorted(TABLE_1))
def test_presets_follow_table_1_as_the_reference_code_builds_it(variant):
    widths, overview, depths, overview_depth, focus_depths, groups = TABLE_1[variant]
    spec = archspec.load(variant)
    assert [s.width for s in spec.base.stages] == widths
    assert [s.depth for s in spec.base.stages] == depths
    assert [s.kernel_size for s in spec.base.stages] == [17, 15, 13]
    assert (spec.overview.width, spec.overview.depth, spec.overview.kernel_size) == (overview, overview_depth, 7)
    assert [s.width for s in spec.focus.stages] == [widths[-1], overview]
    assert [s.depth for s in spec.focus.stages] == focus_depths
    assert [s.groups for s in spec.focus.stages] == groups
    assert [(s.kernel_size, s.small_kernel_size, s.region_centers) for s in spec.focus.stages] == [
        (13, 5, 7),
        (7, 5, 7),
    ]
    assert [s.layer_scale for s in spec.base.stages] == [None, None, 1.0]
    assert spec.context_width == overview // 4
    assert (spec.head.num_classes, spec.head.projection, spec.head.aux_head) == (1000, 1024, True)


def test_every_preset_file_starts_with_a_comment_citing_what_it_reproduces():
    for name in archspec.preset_names():
        first = (archspec.preset_dir() / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# OverLoCK-"), name
        assert "schema" in (archspec.preset_dir() / f"{name}.yaml").read_text().splitlines()[1]


def test_extends_overrides_only_what_differs_and_mappings_merge(tmp_path):
    path = write(tmp_path, "wide.yaml", "extends: xt\nname: wide\noverview: {width: 384}\nhead: {num_classes: 10}\n")
    spec = archspec.load(path)
    assert spec.name == "wide" and spec.overview.width == 384 and spec.overview.depth == 2
    assert spec.head.num_classes == 10 and spec.head.projection == 1024
    assert spec.context_width == 96
    assert spec.extends is None, "a loaded spec is fully resolved"


def test_extends_relative_path_chain_and_lists_replace(tmp_path):
    write(
        tmp_path,
        "parent.yaml",
        "extends: pico\nfocus:\n  stages:\n    - {width: 64, depth: 1, kernel_size: 13, groups: 4}\n",
    )
    child = write(tmp_path, "child.yaml", "extends: parent.yaml\ndrop_path_rate: 0.1\n")
    spec = archspec.load(child)
    assert len(spec.focus.stages) == 1 and spec.focus.stages[0].groups == 4
    assert spec.drop_path_rate == 0.1


def test_dotted_overrides_parse_yaml_scalars_and_index_lists():
    spec = archspec.load("xt", ["focus.stages.0.groups=8", "head.aux_head=false", "base.stages.0.layer_scale=null"])
    assert spec.focus.stages[0].groups == 8 and spec.head.aux_head is False
    assert spec.base.stages[0].layer_scale is None


def test_resolved_spec_round_trips_through_yaml(tmp_path):
    spec = archspec.load("s", ["drop_path_rate=0.4"])
    again = archspec.load(write(tmp_path, "resolved.yaml", spec.to_yaml()))
    assert again == spec


def test_archspec_imports_without_torch():
    code = "import sys, overlock.archspec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_json_schema_file_is_generated_from_the_models():
    from overlock.cli import spec_json_schema

    shipped = json.loads((archspec.preset_dir() / "overlock-spec.schema.json").read_text())
    assert shipped == spec_json_schema(), "regenerate with: overlock schema > specs/overlock-spec.schema.json"
    assert [ref["$ref"] for ref in shipped["anyOf"]] == ["#/$defs/DDSSpec", "#/$defs/PyramidSpec"]
    assert shipped["$defs"]["DDSSpec"]["additionalProperties"] is False
    assert "groups" in shipped["$defs"]["FocusStage"]["properties"]
    assert {"dilated_repconv", "dwconv", "contmix", "identity"} <= set(
        shipped["$defs"]["Block"]["properties"]["mixer"]["anyOf"][0]["discriminator"]["mapping"]
    )


# --------------------------------------------------------------------------------- bad input


def test_malformed_yaml_names_line_and_column(tmp_path):
    message = error_of(write(tmp_path, "bad.yaml", "base:\n  stages: [1, 2\nfocus: 3\n"))
    assert "bad.yaml:3" in message and "YAML syntax error" in message


def test_empty_file(tmp_path):
    message = error_of(write(tmp_path, "empty.yaml", ""))
    assert "is empty" in message and "xt" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "must be a mapping" in error_of(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_unknown_key_gets_did_you_mean_and_line(tmp_path):
    path = write(
        tmp_path,
        "typo.yaml",
        "extends: pico\nfocus:\n  stages:\n    - {width: 64, depth: 1, kernel_size: 13, grups: 2}\n",
    )
    message = error_of(path)
    assert "focus.stages[0].grups" in message
    assert "did you mean 'groups'" in message
    assert "typo.yaml:4" in message


def test_duplicate_keys_are_rejected(tmp_path):
    assert "written twice" in error_of(write(tmp_path, "dup.yaml", "extends: pico\nname: a\nname: b\n"))


def test_wrong_types_and_non_positive_sizes(tmp_path):
    path = write(
        tmp_path, "types.yaml", "extends: pico\nbase:\n  stages:\n    - {width: -16, depth: two, kernel_size: 17}\n"
    )
    message = error_of(path)
    assert "base.stages[0].width" in message and "greater than 0" in message
    assert "base.stages[0].depth" in message and "valid integer" in message
    assert "2 problems" in message


def test_zero_depth_is_rejected():
    assert "overview.depth" in error_of("pico", ["overview.depth=0"])


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("base.stages.0.kernel_size=16", "base.stages[0].kernel_size", "even"),
        ("focus.stages.1.small_kernel_size=1", "focus.stages[1].small_kernel_size", "too small"),
        ("overview.kernel_size=21", "overview.kernel_size", "supported: 5, 7, 9, 11, 13, 15, 17, 19"),
        ("focus.stages.0.kernel_size=3", "focus.stages[0].kernel_size", "DilatedRepConv"),
    ],
)
def test_kernel_size_rules(override, field, words):
    message = error_of("pico", [override])
    assert field in message and words in message


def test_width_must_be_divisible_by_four_times_groups():
    message = error_of("xt", ["focus.stages.1.groups=5"])
    assert "focus.stages[1].width" in message
    assert "4 x groups = 20" in message and "320, 340" in message


def test_focus_must_start_at_the_base_net_width():
    message = error_of("pico", ["focus.stages.0.width=48"])
    assert "focus.stages[0].width=48 must equal base.stages[-1].width=64" in message
    assert archspec.load("pico", ["focus.stages.0.width=48", "context.base_features=false"]).focus.stages[0].width == 48


def test_default_context_width_needs_overview_width_divisible_by_four():
    assert "context.width" in error_of("pico", ["overview.width=98"])
    assert archspec.load("pico", ["overview.width=98", "context.width=20"]).context_width == 20


def test_missing_extends_target_lists_presets(tmp_path):
    message = error_of(write(tmp_path, "m.yaml", "extends: xxl\n"))
    assert "m.yaml:1" in message and "'xxl' is neither a spec file nor a preset" in message and "pico" in message


def test_extends_cycle_is_reported_with_the_chain(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    message = error_of(tmp_path / "a.yaml")
    assert "cycle" in message and "a.yaml -> " in message and "b.yaml" in message


def test_python_tags_are_never_constructed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "evil.yaml", f"extends: pico\nname: !!python/object/apply:os.system ['touch {marker}']\n")
    message = error_of(path)
    assert "never constructed" in message
    assert not marker.exists()


def test_bad_override_paths():
    assert "focus.stages[5] does not exist" in error_of("pico", ["focus.stages.5.groups=2"])
    assert "KEY=VALUE" in error_of("pico", ["focus.stages.0.groups"])
    assert "unknown key 'widht'" in error_of("pico", ["overview.widht=3"])


def test_override_paths_take_negative_list_indices_and_say_when_a_list_needs_one():
    assert archspec.load("pico", ["focus.stages.-1.groups=4"]).focus.stages[-1].groups == 4
    message = error_of("pico", ["focus.stages.-1.groups=0"])
    assert "focus.stages[1].groups (--set focus.stages.-1.groups=0)" in message
    assert "focus.stages is a list: index it by number, 0 to 1" in error_of("pico", ["focus.stages.last.groups=2"])


def test_unknown_source():
    assert "neither a spec file nor a preset" in error_of("no-such-spec")


def test_a_binary_file_or_a_directory_as_spec_is_a_spec_error(tmp_path):
    binary = tmp_path / "weights.pt"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00\x80 binary")
    assert "not a text file" in error_of(binary)
    assert "is a directory" in error_of(tmp_path)


def test_readme_field_tables_are_generated_from_the_models():
    from overlock.archspec.docs import fields_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- spec-fields:start -->\n")[1].split("<!-- spec-fields:end -->")[0]
    assert block == fields_markdown(), "regenerate with: python -m overlock.archspec.docs"


def test_the_worked_example_variant_is_valid():
    example = Path(__file__).resolve().parents[1] / "examples" / "xt-wide-focus.yaml"
    spec = archspec.load(example)
    assert spec.focus.stages[0].groups == 8 and spec.context_width == 112 and spec.base.stages[0].width == 56


def test_write_readme_section_replaces_only_between_its_markers(tmp_path):
    from overlock.archspec.docs import write_readme_section

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- t:start -->\nold\n<!-- t:end -->\n<!-- u:start -->\nkeep\n<!-- u:end -->\n")
    write_readme_section(readme, "t", "| a |\n| 1 |\n")
    assert (
        readme.read_text()
        == "intro\n<!-- t:start -->\n| a |\n| 1 |\n<!-- t:end -->\n<!-- u:start -->\nkeep\n<!-- u:end -->\n"
    )
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="<!-- t:start -->"):
        write_readme_section(readme, "t", "x")
    assert readme.read_text() == "no markers\n"
