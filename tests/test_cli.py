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
    for text in (
        "overview",
        "focus",
        "stage 3",
        "17,307,272",
        "contmix 13/5 G4 S7",
        "dilated_repconv 17",
        "16,453,712",
    ):
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
    assert _split_input_size(["flops", "b", "--input-size", "160", "192", "--json"]) == [
        "flops",
        "b",
        "--input-size",
        "160x192",
        "--json",
    ]
    with pytest.raises(OverlockError, match="at least 32"):
        _parse_input_size("16")
    result = run("flops", "pico", "--input-size", "big")
    assert result.exit_code == 2 and "expected S" in result.output


def test_bench_takes_a_rectangular_img_size_in_the_same_forms_and_export_keeps_its_two_words():
    data = json.loads(run("bench", "pico", "--img-size", "96x64", "--batch-size", "1", "--reps", "3", "--json").stdout)
    assert data["settings"]["img_size"] == [96, 64]
    assert _split_input_size(["bench", "t", "--img-size", "1280", "384"]) == ["bench", "t", "--img-size", "1280x384"]
    export = ["export", "t", "m.onnx", "--img-size", "224", "160"]
    assert _split_input_size(export) == export  # export's --img-size is a two-value option
    result = run("bench", "pico", "--img-size", "20")
    assert result.exit_code == 2 and "--img-size 20x20: each side must be at least 32" in result.output


def test_validate_presets_and_schema():
    assert "ok" in run("validate", "s").output
    listing = run("presets").output
    assert all(name in listing for name in ("xt", "t", "s", "b", "pico"))
    schema = json.loads(run("schema").stdout)
    assert schema["title"] == "overlock spec" and "focus" in schema["$defs"]["DDSSpec"]["properties"]
    assert "stages" in schema["$defs"]["PyramidSpec"]["properties"]


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
    assert result.exit_code == 2 and "not a PyTorch checkpoint" in result.output and "Traceback" not in result.output
    missing = run("convert", "pico", str(tmp_path / "nope.pth"), str(tmp_path / "out.pt"))
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_help_everywhere():
    for command in ("build", "flops", "validate", "presets", "schema", "convert"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_help_of_every_command_shows_no_internal_placeholders():
    for command in ("train", "eval"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output
        assert "PydanticUndefined" not in result.output


def test_error_messages_quoting_user_text_are_not_read_as_markup():
    result = run("validate", "[/x]")  # rich markup that closes nothing: used to raise MarkupError
    assert result.exit_code == 2 and "'[/x]' is neither a spec file nor a preset" in result.output
    assert "Traceback" not in result.output
    named = run("build", "pico", "--set", 'name="[/x] [bold]net"')
    assert named.exit_code == 0, named.output
    assert "[/x] [bold]net: training form" in named.output


def test_a_spec_that_is_not_a_text_file_or_is_a_directory_is_a_clear_error(tmp_path):
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    result = run("validate", str(png))
    assert result.exit_code == 2 and "not a text file" in result.output and "Traceback" not in result.output
    folder = run("build", str(tmp_path))
    assert folder.exit_code == 2 and "is a directory" in folder.output


def test_outputs_that_cannot_be_written_are_clear_errors(tmp_path, reference_dir):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    golden = str(reference_dir / "golden" / "pico.official_state_dict.pt")
    cases = [
        (("build", "pico", "--save", str(tmp_path)), "is a directory"),
        (("build", "pico", "--save", str(a_file / "model.pt")), "file.txt is a file, not a directory"),
        (("schema", "-o", str(tmp_path)), "is a directory"),
        (("schema", "-o", str(a_file / "schema.json")), "file.txt is a file, not a directory"),
        (("convert", "pico", golden, str(a_file / "out.pt")), "file.txt is a file, not a directory"),
    ]
    for args, fragment in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert fragment in " ".join(result.output.split()) and "Traceback" not in result.output
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_build_save_never_overwrites_the_spec_it_reads(tmp_path):
    spec = tmp_path / "net.yaml"
    spec.write_text("extends: pico\n")
    result = run("build", str(spec), "--save", str(spec))
    assert result.exit_code == 2 and "is the spec file this command reads" in result.output
    assert spec.read_text() == "extends: pico\n"


def test_schema_output_file_is_written(tmp_path):
    out = tmp_path / "sub" / "schema.json"
    assert run("schema", "-o", str(out)).exit_code == 0
    assert json.loads(out.read_text())["title"] == "overlock spec"


def test_convert_never_overwrites_its_input_and_refuses_overlock_files(tmp_path, reference_dir):
    source = tmp_path / "official.pth"
    source.write_bytes((reference_dir / "golden" / "pico.official_state_dict.pt").read_bytes())
    before = source.read_bytes()
    same = run("convert", "pico", str(source), str(tmp_path / "." / "official.pth"))
    assert same.exit_code == 2 and "is the checkpoint file this command reads" in same.output
    assert source.read_bytes() == before
    assert run("convert", "pico", str(source), str(tmp_path / "model.pt")).exit_code == 0
    again = run("convert", "pico", str(tmp_path / "model.pt"), str(tmp_path / "again.pt"))
    assert again.exit_code == 2 and "already an overlock file" in again.output
    assert not (tmp_path / "again.pt").exists()


def test_flops_out_of_memory_is_a_clear_error(monkeypatch):
    from overlock.builder import flops

    def no_memory(model, size, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(flops, "count_flops", no_memory)
    monkeypatch.setenv("OVERLOCK_MEMORY_LIMIT", "off")  # the allocation failure behind the estimate
    result = run("flops", "pico", "--input-size", "20000")
    assert result.exit_code == 2 and "not enough memory" in result.output and "20000x20000" in result.output
    assert "Traceback" not in result.output


def test_flops_title_is_not_wrapped():
    result = run("flops", "pico")
    assert "overlock-pico: 224x224, training form" in result.output


def test_a_spec_too_large_for_memory_is_a_clear_error(monkeypatch):
    import overlock.builder

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 36000000000000 bytes.")

    monkeypatch.setattr(overlock.builder, "OverLoCK", no_memory)
    monkeypatch.setenv("OVERLOCK_MEMORY_LIMIT", "off")  # the allocation failure behind the estimate
    result = run("build", "pico", "--set", "base.stages.0.width=2000000")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "does not fit in memory: one weight tensor alone needs 33,527.6 GiB" in " ".join(result.output.split())
