"""The paper's Table 7 (token mixers on a Swin-like test bed) as specs: they build, take a training
step at a size where the /32 stage is 2x2 (smaller than every window), land within 10% of the
paper's parameter counts; the mixers' schema rules name the field."""

from __future__ import annotations

import pytest
import torch

from overlock import archspec
from overlock.archspec.paper import paper_rows
from overlock.builder import build, inference_params
from overlock.errors import SpecError

TABLE7 = paper_rows("table7")


def test_table7_has_every_mixer_of_the_issue():
    names = {row.path.stem for row in TABLE7}
    assert {"contmix", "neighborhood-attention", "shifted-window", "involution", "dynamic-conv"} <= names
    assert {"odconv", "volo"} <= names


@pytest.mark.parametrize("row", TABLE7, ids=lambda r: r.path.stem)
def test_table7_inference_params_are_within_10_percent_of_the_paper(row):
    params = inference_params(archspec.load(row.path)) / 1e6
    assert abs(params - row.mparams) <= 0.10 * row.mparams, f"{params:.2f}M vs paper {row.mparams}M"


@pytest.mark.parametrize("row", TABLE7, ids=lambda r: r.path.stem)
def test_table7_specs_build_and_take_a_training_step(row):
    torch.manual_seed(0)
    model = build(row.path, overrides=["head.num_classes=4"]).train()
    logits = model(torch.randn(2, 3, 64, 64))  # the /32 stage at 2x2
    logits.square().mean().backward()
    assert logits.shape == (2, 4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_shifted_window_spec_shifts_every_other_block():
    model = build(next(r.path for r in TABLE7 if r.path.stem == "shifted-window"))
    shifts = [m.shift for m in model.modules() if type(m).__name__ == "WindowAttention"]
    assert shifts == [False, True] * 6


@pytest.mark.parametrize(
    ("overrides", "field", "text"),
    [
        (["stages.1.block.mixer.head_dim=48"], "stages[1].width", "not divisible by head_dim=48"),
        (["stages.0.kernel_size=6"], "stages[0].kernel_size", "even"),
    ],
)
def test_attention_mixer_rules_name_the_field(overrides, field, text):
    path = next(r.path for r in TABLE7 if r.path.stem == "neighborhood-attention")
    with pytest.raises(SpecError) as info:
        archspec.load(path, overrides)
    assert field in str(info.value) and text in str(info.value)


def test_involution_group_channels_must_divide_the_width():
    path = next(r.path for r in TABLE7 if r.path.stem == "involution")
    with pytest.raises(SpecError) as info:
        archspec.load(path, ["stages.0.block.mixer.group_channels=24"])
    message = str(info.value)
    assert "stages[0].block.mixer.group_channels" in message and "does not divide the width 64" in message


def test_dynamic_conv_temperature_must_be_positive():
    path = next(r.path for r in TABLE7 if r.path.stem == "dynamic-conv")
    with pytest.raises(SpecError) as info:
        archspec.load(path, ["stages.0.block.mixer.temperature=0"])
    assert "stages[0].block.mixer.temperature" in str(info.value)


def test_a_training_budget_in_steps_stops_there_and_speed_runs_at_the_threads_asked(tmp_path, tiny_spec):
    """What benchmarks/table7_train.py relies on: `TrainSettings(steps=N)` trains N optimizer steps
    (budgets shorter than an epoch), and `measure(threads=1)` times at one thread, then restores."""
    import json

    from overlock.builder import build
    from overlock.explore.compare import TrainSettings, measure, trained_row

    settings = TrainSettings(data="synthetic:classes=2,train=16,val=4", steps=3, batch_size=2)
    row = trained_row(str(tiny_spec), [], settings, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3]  # 8 steps would be one epoch
    assert row["steps"] == 3 and 0.0 <= row["top1"] <= 1.0
    before = torch.get_num_threads()
    seen = []
    model = build(str(tiny_spec), deploy=True, overrides=["head.num_classes=2"])
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    measure(model, (32, 32), batch=1, reps=3, threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == before
