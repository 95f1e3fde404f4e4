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
from overlock.explore.diagram import focus_block_steps, layout
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


def _styles(arrows) -> set[tuple[str, str, str]]:
    return {(a.src, a.dst, a.style) for a in arrows}


def test_diagram_dds_draws_the_context_flow_of_architecture_md():
    boxes, arrows = layout(archspec.load("pico"), (224, 224))
    # P0 is Focus-Net's first P; it is re-injected into the later stage; P itself flows on with x
    assert {
        ("overview", "prior", "prior"),
        ("prior", "focus.stages.0", "prior"),
        ("prior", "focus.stages.1", "reinject"),
        ("focus.stages.0", "focus.stages.1", "flow"),
        ("focus.stages.0", "focus.stages.1", "context"),
    } <= _styles(arrows)
    focus0 = next(b for b in boxes if b.key == "focus.stages.0")
    assert "14x14 (/16)" in focus0.lines  # Focus-Net stage 1 runs at the Base-Net output resolution
    assert "x 64 + P 24 ch" in focus0.lines and any(line.startswith("gate:") for line in focus0.lines)
    # without re-injection, P0 reaches only the first Focus-Net stage (as its starting P)
    _, plain_arrows = layout(archspec.load("pico", ["context.reinject_prior=false"]), (224, 224))
    assert {(s, d) for s, d, style in _styles(plain_arrows) if s == "prior"} == {("prior", "focus.stages.0")}


def test_diagram_panel_shows_gate_and_reinjection_only_when_the_spec_has_them():
    steps = [b.key for b in focus_block_steps(archspec.load("pico"))]
    assert steps == ["reinject", "fuse", "mix", "gate", "ffn", "split"]
    off = archspec.load("pico", ["context.gate=false", "context.reinject_prior=false"])
    assert [b.key for b in focus_block_steps(off)] == ["fuse", "mix", "ffn", "split"]
    static = archspec.load("pico", ["focus.stages.0.block.kind=basic", "focus.stages.1.block.kind=basic"])
    assert "gate" not in [b.key for b in focus_block_steps(static)]  # only dynamic blocks are gated


def test_diagram_svg_shows_gate_reinjection_and_context_flow(tmp_path):
    on, off = tmp_path / "on.svg", tmp_path / "off.svg"
    assert run("diagram", "pico", "-o", str(on)).exit_code == 0
    text = _svg_text(on)
    assert "inside every Focus-Net block" in text and "re-inject prior" in text and "P = α·P + β·P0" in text
    assert "g = SiLU(BN(conv1x1 z))" in text and "P0 at 14x14" in text and "P0 at 7x7" in text
    assert "P0 re-injected: P = α·P + β·P0" in text  # the legend
    result = run(
        "diagram", "pico", "-o", str(off), "--set", "context.gate=false", "--set", "context.reinject_prior=false"
    )
    assert result.exit_code == 0, result.output
    text = _svg_text(off)
    assert "no gate" in text and "SiLU" not in text and "re-inject" not in text and "P0 at 7x7" not in text


def test_diagram_pyramid_draws_the_feedback_arrow():
    _, arrows = layout(archspec.load(RECURRENT), (224, 224))
    assert ("stages.3", "stages.2", "feedback") in _styles(arrows)


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


def test_grid_values_split_at_commas_outside_brackets_and_quotes():
    from overlock.explore.sweep import parse_grid

    grid = parse_grid(["k=1, [2,3] ,{a: 4, b: [5,6]},\"x,y\",'it''s, z',it's"])
    assert grid == [("k", ["1", "[2,3]", "{a: 4, b: [5,6]}", '"x,y"', "'it''s, z'", "it's"])]
    assert parse_grid(["k=[1,2]"]) == [("k", ["[1,2]"])]  # one list value: one variant


@pytest.mark.parametrize(
    ("entry", "problem", "column"),
    [
        ("k=[1,2", "never closed", 2),
        ("k=[1,2},3", "'}' where ']' was expected", 6),
        ("k=1],2", "']' closes nothing", 3),
        ('k=1,"a,b', "never closed", 4),
    ],
)
def test_grid_malformed_values_point_at_the_character(entry, problem, column):
    result = run("sweep", "pico", "--grid", entry)
    assert result.exit_code == 2 and problem in result.output and "Traceback" not in result.output
    lines = result.output.splitlines()
    shown = next(i for i, line in enumerate(lines) if line.strip() == entry)
    assert lines[shown + 1].index("^") - lines[shown].index("k") == column


def test_grid_empty_or_non_yaml_values_are_refused():
    for entry, problem in [("k=1,,2", "value 2 is empty"), ("k=1,", "value 2 is empty"), ("k=[1]x", "not YAML")]:
        result = run("sweep", "pico", "--grid", entry)
        assert result.exit_code == 2 and problem in result.output, result.output


def test_sweep_grid_of_mapping_values(tmp_path):
    out = tmp_path / "sweep"
    stages = "{width: 64, depth: 1, kernel_size: 7},{width: 64, depth: 3, kernel_size: 9},{width: 60, depth: 1}"
    result = run(
        "sweep", "pico", "--grid", f"base.stages.2={stages}", "--input-size", "32", "--out", str(out), "--json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    stored = sorted((archspec.load(str(p)).base.stages[2].depth, archspec.load(str(p)).base.stages[2].kernel_size)
                    for p in (out / "variants").glob("*.yaml"))  # fmt: skip
    assert len(rows) == 2 and stored == [(1, 7), (3, 9)]
    summary = json.loads((out / "sweep.json").read_text())
    invalid = [v for v in summary["variants"] if not v["valid"]]
    assert [v["overrides"] for v in invalid] == [["base.stages.2={width: 60, depth: 1}"]]  # kernel_size missing


def test_compare_checks_every_spec_against_the_data_before_training(tmp_path, tiny_spec):
    runs = tmp_path / "runs"
    args = ["compare", *[str(tiny_spec)] * 4, "pico", "--train", "synthetic:classes=2,train=8,val=4"]
    result = run(*args, "--batch-size", "8", "--input-size", "32", "--runs", str(runs))
    # pico fixes 10 classes: refused before the 4 tiny specs train (no run directory is made)
    assert result.exit_code == 2 and "cannot train pico" in result.output and "head.num_classes=10" in result.output
    assert not runs.exists()
    too_big = run("compare", str(tiny_spec), "--train", "synthetic:classes=2,train=8,val=4", "--batch-size", "16")
    assert too_big.exit_code == 2 and "larger than the training set" in too_big.output


def test_sweep_checks_every_variant_against_the_data_before_training(tmp_path, tiny_spec):
    out = tmp_path / "sweep"
    result = run(
        "sweep", str(tiny_spec), "--grid", "base.stages.2.depth=1,2", "--grid", "in_channels=3,1", "--input-size", "32",
        "--out", str(out), "--train", "synthetic:classes=2,train=8,val=4", "--batch-size", "8",
    )  # fmt: skip
    assert result.exit_code == 2 and "in_channels=1" in result.output and "Traceback" not in result.output
    assert not (out / "runs").exists() and not list((out / "results").glob("*.json"))


def test_sweep_does_not_store_a_training_run_stopped_by_ctrl_c(tmp_path, tiny_spec, monkeypatch):
    from overlock.explore.compare import TrainSettings
    from overlock.explore.sweep import expand, parse_grid, run_sweep

    # `train` stops at a step boundary on Ctrl-C and returns; --stop-after 1 ends the run the same way
    options = TrainSettings.options
    monkeypatch.setattr(TrainSettings, "options", lambda self, *a: {**options(self, *a), "stop_after": 1})
    plan = expand(str(tiny_spec), [], parse_grid(["base.stages.2.depth=1,2"]))
    settings = TrainSettings("synthetic:classes=2,train=16,val=4", batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, tmp_path, (32, 32), train=settings)
    assert not list((tmp_path / "results").glob("*.json"))


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
    assert result["images_per_s"] > 0 and result["batch"] == 2
    # RSS above the resident set before the call: a small call may fit in pages already resident
    assert isinstance(result["peak_memory_mib"], float) and result["peak_memory_mib"] >= 0


def test_erf_reads_weights_and_refuses_ones_that_do_not_fit(tmp_path):
    saved = tmp_path / "pico.pt"
    assert run("build", "pico", "--save", str(saved)).exit_code == 0
    args = ["erf", "pico", "--weights", str(saved), "--images", "1", "--input-size", "32", "--json"]
    result = run(*args, "-o", str(tmp_path / "e.png"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layer"] == "focus.stages.1"  # the last stage by default
    wrong = run(*args, "-o", str(tmp_path / "f.png"), "--set", "base.stages.2.depth=1")
    assert wrong.exit_code == 2 and "do not fit" in wrong.output and not (tmp_path / "f.png").exists()
