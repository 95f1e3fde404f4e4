"""Specs too large for the machine are refused before anything is allocated (issue 13 item 2)."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from overlock import archspec
from overlock.builder import build
from overlock.builder.estimate import LIMIT_ENV, estimate, parse_size, rough_estimate
from overlock.cli import app
from overlock.errors import SpecError

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("pico", []), ("xt", []), ("pico", ["base.stages.1.depth=7", "focus.stages.0.depth=5", "overview.depth=3"])],
)
def test_the_parameter_count_from_meta_builds_is_exact(name, overrides):
    spec = archspec.load(name, overrides)
    assert estimate(spec).params == sum(p.numel() for p in build(spec).parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["base.stages.0.depth=100"],
        ["overview.width=2400", "context.width=24"],
        ["overview.mlp_ratio=0.05"],
        ["head.num_classes=100000"],
        ["stem.width=512"],
        ["head.projection=8"],
        ["context.width=400"],
    ],
)
def test_the_rough_estimate_that_skips_the_exact_one_is_within_a_factor_of_two_or_above(overrides):
    spec = archspec.load("pico", overrides)
    assert rough_estimate(spec).params >= estimate(spec).params / 2


def test_the_rough_activation_estimate_is_within_a_factor_of_two_or_above():
    spec = archspec.load("pico", ["context.width=400"])
    assert rough_estimate(spec, (32, 64)).activation_bytes_per_image >= (
        estimate(spec, (32, 64)).activation_bytes_per_image / 2
    )


@pytest.mark.parametrize(
    ("overrides", "params"),
    [
        (["overview.width=24000", "context.width=24"], "4,771,688,484 parameters"),
        (["base.stages.0.depth=1000000"], "11,424,747,196 parameters"),
    ],
)
def test_a_model_larger_than_memory_is_refused_quickly_with_the_estimate_and_the_limit(monkeypatch, overrides, params):
    monkeypatch.setenv(LIMIT_ENV, "8G")
    started = time.perf_counter()
    with pytest.raises(SpecError) as info:
        build("pico", overrides=overrides)
    assert time.perf_counter() - started < 30
    message = str(info.value)
    assert params in message and "limit of 8.0 GiB" in message and LIMIT_ENV in message


def test_the_limit_can_be_raised_or_turned_off(monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1K")
    with pytest.raises(SpecError, match="limit of 0.0 GiB"):
        build("pico")
    monkeypatch.setenv(LIMIT_ENV, "off")
    assert build("pico") is not None
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(SpecError, match="expected a size such as 64G"):
        build("pico")


def test_sizes_parse_in_powers_of_1024():
    assert parse_size("64G") == 64 * 2**30 and parse_size("1.5k") == 1536 and parse_size("512MiB") == 512 * 2**20


def test_flops_at_a_huge_input_size_is_refused_before_tracing(monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "2G")
    result = run("flops", "pico", "--input-size", "2048")
    assert result.exit_code == 2, result.output
    assert "a forward of overlock-pico at 2048x2048 needs about" in " ".join(result.stderr.split())


def test_training_that_cannot_fit_is_refused_before_the_run_directory_exists(monkeypatch, tmp_path, tiny_spec):
    monkeypatch.setenv(LIMIT_ENV, "1G")
    out = tmp_path / "run"
    result = run(
        "train", str(tiny_spec), "--data", "synthetic:classes=3,train=256,val=8", "--img-size", "512",
        "--batch-size", "128", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "training tiny at batch size 128 needs about" in message and "128 x 512x512" in message
    assert not out.exists()
