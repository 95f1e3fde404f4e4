"""What an installed copy needs: shipped examples resolve from any directory; extras name their packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlock import archspec

REPO = Path(__file__).resolve().parents[1]


def test_shipped_examples_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no examples/ here: the packaged copy is used
    spec = archspec.load("examples/xt-wide-focus.yaml")
    assert spec == archspec.load(REPO / "examples" / "xt-wide-focus.yaml")


def test_examples_and_c_sources_are_package_data_and_extras_cover_the_optional_features():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = project["tool"]["setuptools"]["package-data"]
    assert "examples/*.yaml" in package_data["overlock"]
    # The C kernels are compiled on first use (kernels/native.py): their sources must ship.
    sources = {path.name for path in (REPO / "kernels" / "csrc").glob("*.c")}
    assert sources and {"csrc/*.c", "csrc/*.h"} <= set(package_data["overlock.kernels"])
    extras = project["project"]["optional-dependencies"]
    names = {key: {req.split(">")[0].split("=")[0] for req in reqs} for key, reqs in extras.items()}
    assert {"onnx", "onnxruntime", "onnxscript"} <= names["onnx"] <= names["dev"]
    assert "timm" in names["timm"] and "triton" in names["triton"] and "pytest" in names["dev"]
    assert "train" in names
