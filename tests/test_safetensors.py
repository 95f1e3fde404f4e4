"""safetensors model files: written by build --save / convert, read by every loader like torch.save files."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from overlock.checkpoint import MODEL_FORMAT, load_file, save_safetensors
from overlock.cli import app
from overlock.errors import CheckpointError

pytest.importorskip("safetensors")
runner = CliRunner()


def test_build_save_writes_the_same_model_file_in_either_format(tmp_path):
    for name in ("pico.pt", "pico.safetensors"):
        result = runner.invoke(app, ["build", "pico", "--deploy", "--save", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    plain, safe = load_file(tmp_path / "pico.pt"), load_file(tmp_path / "pico.safetensors")
    assert safe["format"] == MODEL_FORMAT and safe["deploy"] is True and safe["spec"] == plain["spec"]
    assert set(safe["state_dict"]) == set(plain["state_dict"])
    assert (tmp_path / "pico.safetensors").read_bytes()[8:9] == b"{"  # really safetensors, not a pickle


def test_convert_reads_and_writes_safetensors(reference_dir, tmp_path):
    state = torch.load(reference_dir / "golden" / "pico.official_state_dict.pt", weights_only=True)
    official = save_safetensors(state, tmp_path / "official.safetensors", {})
    assert torch.equal(load_file(official)["head.4.weight"], state["head.4.weight"])  # plain state dict back
    out = tmp_path / "pico.safetensors"
    result = runner.invoke(app, ["convert", "pico", str(official), str(out)])
    assert result.exit_code == 0, result.output
    converted = load_file(out)
    assert torch.equal(converted["state_dict"]["head.fc.weight"], state["head.4.weight"])


def test_a_damaged_safetensors_file_is_a_clear_error(tmp_path):
    path = save_safetensors({"w": torch.zeros(64)}, tmp_path / "w.safetensors", {})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_file(path)
