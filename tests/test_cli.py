"""The `overlock` command through typer's runner: outputs, JSON, files written, and errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from overlock.builder import build
from overlock.builder.summary import count_params
from overlock.cli import _parse_input_size, _split_input_size, app
from overlock.errors import OverlockError

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_build_prints_a_summary_per_subnetwork_and_stage():
    result = run("build", "xt")
    assert result.exit_code == 0, result.output
    for text in ("overview", "focus", "stage 3", "17,307,272", "4 (h=8) S=7", "13/5"):
        assert text in result.output


def test_build_json_counts_all_parameters_of_the_built_model():
    result = run("build", "xt", "--deploy", "--json")
    data = json.loads(result.stdout)
    assert data["params"] == 16_791_384 and data["deploy"] is True
    assert sum(data["subnetworks"].values()) == data["params"]
    assert set(data["subnetworks"]) >= {"base", "overview", "focus", "head"}


def test_build_set_override_and_save(tmp_path):
    out = tmp_path / "model.pt"
    result = run("build", "pico", "--set", "head.num_classes=3", "--save", str(out), "--json")
    assert result.exit_code == 0, result.output
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == "overlock-model" and "num_classes: 3" in saved["spec"]
    assert saved["state_dict"]["head.fc.weight"].shape[0] == 3


def test_flops_json_and_table():
    data = json.loads(run("flops", "pico", "--json").stdout)
    assert data["flops"] > 0 and data["params"] == count_params(build("pico"))
    assert data["input_size"] == [224, 224] and "contmix" in data["operators"]
    table = run("flops", "pico", "--input-size", "160x192")
    assert table.exit_code == 0 and "160x192" in table.output and "total" in table.output


def test_input_size_forms():
    assert _parse_input_size("224") == (224, 224)
    assert _parse_input_size("160x192") == (160, 192)
    assert _parse_input_size("160 192") == (160, 192)
    assert _split_input_size(["flops", "b", "--input-size", "160", "192", "--json"]) == ["flops", "b", "--input-size", "160x192", "--json"]
    with pytest.raises(OverlockError, match="at least 32"):
        _parse_input_size("16")
    result = run("flops", "pico", "--input-size", "big")
    assert result.exit_code == 2 and "expected S" in result.output


def test_validate_presets_and_schema():
    assert "ok" in run("validate", "s").output
    listing = run("presets").output
    assert all(name in listing for name in ("xt", "t", "s", "b", "pico"))
    schema = json.loads(run("schema").stdout)
    assert schema["title"] == "overlock spec" and "focus" in schema["properties"]


@pytest.mark.parametrize("command", ["validate", "build", "flops"])
def test_bad_specs_exit_non_zero_with_a_message_and_no_traceback(tmp_path, command):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: pico\nfocus:\n  stages:\n    - {width: 64, depth: 1, kernel_size: 14, groups: 2}\n")
    result = run(command, str(bad))
    assert result.exit_code == 2
    assert "focus.stages[0].kernel_size" in result.output and "bad.yaml:4" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.splitlines()) < 25


def test_convert_imports_an_official_checkpoint_strictly(reference_dir, tmp_path):
    source = reference_dir / "golden" / "pico.official_state_dict.pt"
    out = tmp_path / "pico.pt"
    result = run("convert", "pico", str(source), str(out))
    assert result.exit_code == 0, result.output
    saved = torch.load(out, weights_only=True)
    official = torch.load(source, weights_only=True)
    assert torch.equal(saved["state_dict"]["context.proj.weight"], official["high_level_proj.weight"])
    wrong = run("convert", "xt", str(source), str(tmp_path / "xt.pt"))
    assert wrong.exit_code == 2 and "shape mismatch" in wrong.output and not (tmp_path / "xt.pt").exists()


def test_convert_rejects_unreadable_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    result = run("convert", "pico", str(junk), str(tmp_path / "out.pt"))
    assert result.exit_code == 2 and "cannot read" in result.output and "Traceback" not in result.output
    missing = run("convert", "pico", str(tmp_path / "nope.pth"), str(tmp_path / "out.pt"))
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_help_everywhere():
    for command in ("build", "flops", "validate", "presets", "schema", "convert"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output
