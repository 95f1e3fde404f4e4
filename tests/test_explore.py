"""Design-space exploration (issue 12): diagram, compare, sweep and erf, on pico-sized specs only."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from overlock import archspec
from overlock.cli import app
from overlock.explore.compare import pareto_front
from overlock.explore.diagram import layout
from overlock.explore.erf import contribution_map, pixel_shares, square_shares

runner = CliRunner()
RECURRENT = "specs/paper/table6/06-recurrent.yaml"


def run(*args: str):
    return runner.invoke(app, list(args))


def _svg_text(path) -> str:
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text()))


@pytest.mark.parametrize("spec", ["pico", RECURRENT])
def test_diagram_svg_names_every_stage_with_width_depth_and_resolution(tmp_path, spec):
    from overlock.cli import __file__ as cli_file

    source = spec if spec == "pico" else str(__import__("pathlib").Path(cli_file).parent / spec)
    out = tmp_path / "net.svg"
    result = run("diagram", source, "-o", str(out), "--input-size", "64")
    assert result.exit_code == 0, result.output
    text = _svg_text(out)
    resolved = archspec.load(source)
    for path, stage, _ in resolved.stages_in_order():
        assert path in text and f"{stage.width} x {stage.depth}" in text
    assert "16x16 (/4)" in text and "2x2 (/32)" in text  # 64 px input: stem /4 ... deepest /32


def test_diagram_dds_feeds_the_prior_into_every_focus_stage():
    boxes, arrows = layout(archspec.load("pico"), (224, 224))
    prior_targets = {dst for src, dst, style in arrows if style == "prior" and src == "prior"}
    assert prior_targets == {"focus.stages.0", "focus.stages.1"}
    focus0 = next(b for b in boxes if b.key == "focus.stages.0")
    assert "14x14 (/16)" in focus0.lines  # Focus-Net stage 1 runs at the Base-Net output resolution


def test_diagram_pyramid_draws_the_feedback_arrow():
    from pathlib import Path

    from overlock.cli import __file__ as cli_file

    _, arrows = layout(archspec.load(str(Path(cli_file).parent / RECURRENT)), (224, 224))
    assert ("stages.3", "stages.2", "feedback") in arrows


def test_diagram_refuses_an_unknown_format(tmp_path):
    result = run("diagram", "pico", "-o", str(tmp_path / "net.txt"))
    assert result.exit_code == 2 and ".svg" in result.output and not (tmp_path / "net.txt").exists()
