"""Design-space exploration (issue 12): diagram, compare, sweep and erf, on pico-sized specs only."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
REPO = Path(__file__).resolve().parents[1]
RECURRENT = str(REPO / "specs/paper/table6/06-recurrent.yaml")


def run(*args: str):
    return runner.invoke(app, list(args))


def _svg_text(path) -> str:
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text()))


@pytest.mark.parametrize("spec", ["pico", RECURRENT])
def test_diagram_svg_names_every_stage_with_width_depth_and_resolution(tmp_path, spec):
    out = tmp_path / "net.svg"
    result = run("diagram", spec, "-o", str(out), "--input-size", "64")
    assert result.exit_code == 0, result.output
    text = _svg_text(out)
    resolved = archspec.load(spec)
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
    _, arrows = layout(archspec.load(RECURRENT), (224, 224))
    assert ("stages.3", "stages.2", "feedback") in arrows


def test_diagram_refuses_an_unknown_format(tmp_path):
    result = run("diagram", "pico", "-o", str(tmp_path / "net.txt"))
    assert result.exit_code == 2 and ".svg" in result.output and not (tmp_path / "net.txt").exists()


# --- compare -------------------------------------------------------------------------------------


def test_pareto_front_keeps_exactly_the_undominated_points():
    # x = FLOPs (lower better), y = top-1 (higher better)
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (0.5, 0.4)]
    assert sorted(pareto_front(points, x_larger=False, y_larger=True)) == [0, 1, 4]
    # both costs (FLOPs, params): only the lower-left corner survives
    assert pareto_front([(1, 1), (2, 2), (1, 3)], x_larger=False, y_larger=False) == [0]


def test_compare_json_rows_match_build_and_flops(tmp_path):
    from overlock.builder import build
    from overlock.builder.flops import count_flops
    from overlock.builder.summary import count_params

    plot = tmp_path / "cmp.png"
    result = run(
        "compare", "pico", "pico", "--set", "base.stages.2.depth=1", "--input-size", "32", "--json", "--plot", str(plot)
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    model = build("pico", overrides=["base.stages.2.depth=1"])
    assert len(rows) == 2 and rows[0]["params"] == count_params(model)
    assert rows[0]["flops"] == count_flops(model.reparameterize(), (32, 32)).total
    assert rows[0]["inference_params"] < rows[0]["params"]  # no aux head, re-parameterised
    assert plot.stat().st_size > 1000


def test_compare_reports_an_invalid_spec_on_one_screen():
    result = run("compare", "pico", "--set", "focus.stages.0.groups=3")
    assert result.exit_code == 2 and "groups" in result.output and "Traceback" not in result.output


# --- sweep ---------------------------------------------------------------------------------------


def test_sweep_skips_invalid_variants_writes_specs_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "pico", "--grid", "focus.stages.0.groups=2,3", "--grid", "base.stages.2.depth=1,2"]
    args += ["--input-size", "32", "--out", str(out)]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert first.output.count("skipped") == 2 and "not divisible" in first.output  # groups=3: 64 % 12
    assert "2 valid of 4 variants" in first.output and "(0 reused, 2 run)" in first.output
    specs = sorted((out / "variants").glob("*.yaml"))
    assert len(specs) == 2
    depths = sorted(archspec.load(str(p)).base.stages[2].depth for p in specs)
    assert depths == [1, 2]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["finished"] == 2 and sum(not v["valid"] for v in summary["variants"]) == 2
    again = run(*args, "--json")
    assert again.exit_code == 0 and len(json.loads(again.stdout)) == 2
    assert "(2 reused, 0 run)" in run(*args).output


def test_sweep_interrupted_keeps_finished_results(tmp_path):
    from overlock.explore.sweep import expand, parse_grid, run_sweep

    plan = expand("pico", [], parse_grid(["base.stages.2.depth=1,2"]))
    seen = []

    def stop_after_first(event, variant, row):
        seen.append(event)
        if event == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, tmp_path, (32, 32), on_progress=stop_after_first)
    assert len(list((tmp_path / "results").glob("*.json"))) == 1
    events = []
    run_sweep(plan, tmp_path, (32, 32), on_progress=lambda e, v, r: events.append(e))
    assert events == ["cached", "start", "done"]


def test_sweep_with_training_reports_top1(tmp_path, tiny_spec):
    out = tmp_path / "sweep"
    result = run(
        "sweep", str(tiny_spec), "--grid", "base.stages.2.depth=1,2", "--input-size", "32", "--out", str(out),
        "--train", "synthetic:classes=2,train=8,val=4", "--batch-size", "8", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 2 and all(0.0 <= r["top1"] <= 1.0 and r["best_epoch"] == 1 for r in rows)
    assert all((out / "runs" / r["variant"] / "best.pt").is_file() for r in rows)


def test_grid_errors_are_user_errors():
    assert run("sweep", "pico", "--grid", "depth").exit_code == 2
    assert run("sweep", "pico", "--grid", "a=1", "--grid", "a=2").exit_code == 2


# --- erf -----------------------------------------------------------------------------------------


class _OneConv(torch.nn.Module):
    """A one-stage 'network' whose ERF is known: a 3x3 conv of ones with 2 output channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = torch.nn.Conv2d(1, 2, 3, padding=1, bias=False)
        torch.nn.init.ones_(self.stage.weight)
        self.spec = type("S", (), {"name": "one-conv", "stages_in_order": lambda self: [("stage", None, 2)]})()

    def forward_features(self, x):
        return self.stage(x), None


def test_erf_map_of_a_box_filter_is_the_box():
    scores = contribution_map(_OneConv(), "stage", torch.randn(3, 1, 9, 9))
    expected = np.zeros((9, 9))
    expected[3:6, 3:6] = 2.0  # d(sum of 2 channels at the centre)/dx = 2 on the 3x3 window
    np.testing.assert_allclose(scores, expected)
    assert square_shares(scores) == {0.2: 9 / 81, 0.5: 9 / 81, 0.9: 9 / 81}
    shares = pixel_shares(scores)
    assert shares[0.2] == 2 / 81 and shares[0.9] == 9 / 81  # 20% of 9 equal pixels: 2 of them


def test_erf_cli_on_pico_gives_growing_receptive_fields(tmp_path):
    shares = {}
    for layer in ("base.stages.0", "focus.stages.1"):
        out = tmp_path / f"{layer}.png"
        result = run("erf", "pico", "--layer", layer, "--images", "2", "--input-size", "64", "-o", str(out), "--json")
        assert result.exit_code == 0, result.output
        shares[layer] = json.loads(result.stdout)["area_share_square"]
        assert out.stat().st_size > 1000
    # at 64 px every stage of pico sees the whole image (SE, 17x17 kernels at /4); the core still widens
    assert shares["base.stages.0"]["0.2"] < shares["focus.stages.1"]["0.2"]


def test_erf_unknown_layer_lists_the_valid_ones(tmp_path):
    result = run("erf", "pico", "--layer", "stages.9", "-o", str(tmp_path / "e.png"), "--input-size", "32")
    assert result.exit_code == 2 and "focus.stages.0" in result.output


def test_measure_times_the_eval_forward_and_reports_memory():
    from overlock.builder import build
    from overlock.explore.compare import measure

    model = build("pico", deploy=True)
    model.train()
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append((m.training, i[0].shape[0])))
    result = measure(model, (32, 48), batch=2, reps=3)
    handle.remove()
    assert len(calls) >= 1 + 3 and all(not training and batch == 2 for training, batch in calls)
    assert result["images_per_s"] > 0 and result["peak_memory_mib"] > 0 and result["batch"] == 2


def test_erf_reads_weights_and_refuses_ones_that_do_not_fit(tmp_path):
    saved = tmp_path / "pico.pt"
    assert run("build", "pico", "--save", str(saved)).exit_code == 0
    args = ["erf", "pico", "--weights", str(saved), "--images", "1", "--input-size", "32", "--json"]
    result = run(*args, "-o", str(tmp_path / "e.png"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layer"] == "focus.stages.1"  # the last stage by default
    wrong = run(*args, "-o", str(tmp_path / "f.png"), "--set", "base.stages.2.depth=1")
    assert wrong.exit_code == 2 and "do not fit" in wrong.output and not (tmp_path / "f.png").exists()
