"""What people see: 80 columns without lost numbers, readable help, escaped spec text, warm-up that fits (issue 13)."""

from __future__ import annotations

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

import overlock.cli as cli
from overlock.training.config import TrainConfig, validated
from overlock.training.distributed import Dist
from overlock.training.errors import ConfigError
from overlock.training.progress import Reporter, fit_table
from overlock.training.schedule import WarmupCosine
from overlock.training.setup import plan_training

runner = CliRunner()


def rendered(width: int, render) -> list[str]:
    console = Console(width=width, record=True, highlight=False, force_terminal=False)
    render(console)
    return console.export_text().splitlines()


def test_build_fits_80_columns_and_keeps_every_digit(monkeypatch):
    console = Console(width=80, record=True, highlight=False)
    monkeypatch.setattr(cli, "console", console)
    assert runner.invoke(cli.app, ["build", "xt"]).exit_code == 0
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    assert any("total" in line and "17,307,272" in line for line in lines)


def test_any_table_fits_by_wrapping_text_columns_never_numbers():
    # The fit is generic: more and wider columns (the build table grows per-stage columns) still fit.
    table = Table(title="a title")
    for name in ("subnet", "mixer", "ffn", "se", "a long descriptive column", "params", "FLOPs"):
        table.add_column(name)
    for i in range(3):
        table.add_row("overview", "contmix-large", "grn-mlp", "yes", "x" * 30, f"{123_456_789 * (i + 1):,}", "1.234e9")
    lines = rendered(80, lambda c: c.print(fit_table(table)))
    assert max(map(len, lines)) <= 80
    text = "\n".join(lines)
    for number in ("123,456,789", "246,913,578", "370,370,367", "1.234e9"):
        assert number in text


def test_the_progress_bar_keeps_step_count_and_eta_at_80_columns():
    def render(console):
        reporter = Reporter(console)
        reporter.start(total_steps=1000, completed=0, description="train a-spec-name")
        reporter.step(completed=370, loss=1.23456, acc=0.5, lr=1e-3, images_per_s=1234.0)
        reporter.stop()

    lines = [line for line in rendered(80, render) if line.strip()]
    assert max(map(len, lines)) <= 80
    assert "370/1000" in lines[-1] and "ETA" in lines[-1] and "loss 1.2346" in lines[-1]


@pytest.mark.parametrize("command", ["build", "flops", "convert", "train", "eval", "validate"])
def test_help_names_arguments_and_shows_no_bool_placeholders(command):
    output = runner.invoke(cli.app, [command, "--help"], env={"COLUMNS": "80"}).output
    assert "SPEC" in output and "{spec}" not in output and "{SPEC}" not in output
    assert "<bool>" not in output


def test_escape_sequences_in_spec_values_are_shown_not_sent_to_the_terminal(tmp_path):
    spec = tmp_path / "esc.yaml"
    spec.write_text('extends: pico\nname: "\\e[2Jwiped \\x07"\n')
    for args in (["validate", str(spec)], ["build", str(spec)], ["validate", "pico", "--set", 'name="\\e[31mred"']):
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
        assert "\\x1b" in result.output


def test_an_error_quoting_an_escape_sequence_is_escaped_too(tmp_path):
    result = runner.invoke(cli.app, ["validate", "pico", "--set", 'overview.depth="\\e[2J"'])
    assert result.exit_code == 2 and "\x1b" not in result.output and "\\x1b" in result.output
    # A file name is quoted as it is (no repr() in between): the message itself must escape it.
    spec = tmp_path / "\x1b[2Jwiped.yaml"
    spec.write_text("name: [unclosed\n")
    result = runner.invoke(cli.app, ["validate", str(spec)])
    assert result.exit_code == 2 and "\x1b" not in result.output and "\\x1b[2Jwiped.yaml" in result.output


def test_warm_up_and_decay_fit_a_run_shorter_than_one_epoch():
    config = validated(
        TrainConfig, {"spec": "pico", "data": "synthetic:classes=10,train=64,val=8", "batch_size": 4, "steps": 6}
    )
    plan = plan_training(config, Dist(), None)
    assert plan.steps_per_epoch == 16 and plan.total_steps == 6
    assert 0 < plan.warmup_steps <= 3
    schedule = WarmupCosine(config.lr, plan.total_steps, plan.warmup_steps, config.min_lr)
    assert schedule(plan.total_steps - 1) < 0.5 * config.lr, "the run must decay, not end at the peak"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_learning_rates_say_so(value):
    with pytest.raises(ConfigError, match="--lr.*finite"):
        validated(TrainConfig, {"spec": "pico", "lr": float(value)})
