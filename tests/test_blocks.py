"""Blocks and topologies as data: the part registries, pyramid / DDS / static Focus-Net, feedback,
their validation errors, gradient checkpointing, and the paper's design roadmap (Table 6) as specs."""

from __future__ import annotations

import copy
import json
import typing

import pytest
import torch

from overlock import archspec
from overlock.archspec.paper import paper_rows
from overlock.builder import build, inference_params
from overlock.builder.mixers import DOWNSAMPLES, FFNS, MIXERS, STEMS
from overlock.builder.summary import count_params
from overlock.errors import SpecError

# A tiny DDS whose every stage is easy to re-block; 5x5 kernels keep it fast.
TINY = {
    "name": "tiny",
    "base": {"stages": [{"width": 8, "depth": 1, "kernel_size": 5}, {"width": 16, "depth": 1, "kernel_size": 5}]},
    "overview": {"width": 16, "depth": 1, "kernel_size": 5},
    "focus": {
        "stages": [
            {"width": 16, "depth": 2, "kernel_size": 5, "small_kernel_size": 3, "groups": 1, "region_centers": 2},
            {"width": 16, "depth": 1, "kernel_size": 5, "small_kernel_size": 3, "groups": 1, "region_centers": 2},
        ]
    },
    "head": {"num_classes": 3, "projection": 16},
}
TINY_PYRAMID = {
    "name": "tiny-pyramid",
    "topology": "pyramid",
    "stages": [{"width": 8, "depth": 1, "kernel_size": 5}, {"width": 16, "depth": 2, "kernel_size": 5}],
    "head": {"num_classes": 3, "projection": None},
}
MIXER_ARGS = {  # arguments a basic-block stage of width 16 needs beyond the stage's kernel_size
    "dilated_repconv": {},
    "dwconv": {"kernel_size": 3},
    "contmix": {"groups": 2, "small_kernel_size": 3, "region_centers": 3},
    "identity": {},
    "neighborhood_attention": {"head_dim": 8},
    "window_attention": {"head_dim": 8},  # depth 2: the second block is shifted
    "involution": {"group_channels": 8},
    "dynamic_conv": {"projections": True},
    "odconv": {},
    "outlook_attention": {"head_dim": 8, "stride": 2},
}


def with_block(spec: dict, path: str, **block) -> dict:
    out = copy.deepcopy(spec)
    node = out
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    node["block"] = block
    return out


def error_of(source, overrides=None) -> str:
    with pytest.raises(SpecError) as info:
        archspec.load(source, overrides)
    return str(info.value)


def train_step(model: torch.nn.Module, size: tuple[int, int]) -> None:
    """One training step's forward and backward; every parameter that takes part gets a finite gradient."""
    model.train()
    out = model(torch.randn(2, 3, *size))
    logits = out["main"] if isinstance(out, dict) else out
    loss = logits.square().mean() + (out["aux"].square().mean() if isinstance(out, dict) else 0)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------ registries


def test_every_name_the_schema_accepts_has_a_builder():
    assert set(archspec.MIXER_TYPES) == set(MIXERS)
    assert set(typing.get_args(archspec.Block.model_fields["ffn"].annotation)) == set(FFNS)
    assert set(typing.get_args(archspec.Stem.model_fields["type"].annotation)) == set(STEMS)
    assert set(typing.get_args(archspec.Downsample.model_fields["type"].annotation)) == set(DOWNSAMPLES)


@pytest.mark.parametrize("mixer", sorted(MIXER_ARGS))
@pytest.mark.parametrize("ffn", ["conv_ffn", "mlp"])
def test_each_mixer_and_ffn_in_a_basic_block(mixer, ffn):
    spec = with_block(TINY_PYRAMID, "stages.1", mixer={"type": mixer, **MIXER_ARGS[mixer]}, ffn=ffn, se=False)
    model = build(spec)
    for size in [(64, 64), (32, 48), (40, 24)]:  # stage 2 at 8x8, 4x6 and 5x3: maps smaller than the kernel too
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, *size)).shape == (1, 3)
    train_step(model, (48, 40))


@pytest.mark.parametrize("mixer", ["contmix", "dilated_repconv", "dwconv", "identity"])
def test_each_mixer_in_a_focus_net_dynamic_block(mixer):
    args = {"contmix": {"context": "self"}, "dwconv": {"kernel_size": 7}}.get(mixer, {})
    spec = with_block(TINY, "focus.stages.0", mixer={"type": mixer, **args})
    model = build(spec)
    block = model.focus.stages[0].blocks[0]
    assert block.guided is False
    for size in [(64, 64), (96, 32)]:  # Focus-Net at 4x4 and 6x2: smaller than the kernel
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, *size)).shape == (1, 3)
    train_step(model, (64, 64))


def test_static_focus_blocks_run_on_features_and_prior():
    spec = with_block(TINY, "focus.stages.1", kind="basic")
    model = build(spec)
    block = model.focus.stages[1].blocks[0]
    assert block.norm.normalized_shape == (16 + 4,)  # cat(x, P): 16 features + context width 16 / 4
    assert block.alpha is not None  # the prior is re-injected as in a dynamic block
    train_step(model, (64, 64))


def test_contmix_with_self_context_outside_focus_net():
    spec = with_block(TINY, "base.stages.1", mixer={"type": "contmix", "groups": 1, "small_kernel_size": 3})
    model = build(spec)
    mixer = model.base.stages[1].blocks[0].large_kernel
    assert mixer.key.conv.in_channels == 16  # keys from the block's own input, not from a context
    assert archspec.load(spec).resolved_block("base.stages.1").mixer.context == "self"
    train_step(model, (64, 64))


@pytest.mark.parametrize("kind", ["patch", "conv"])
def test_stems_and_downsampling_by_name(kind):
    spec = copy.deepcopy(TINY_PYRAMID) | {"stem": {"type": kind}, "downsample": {"type": kind}}
    model = build(spec)
    levels = build(spec, features_only=True).eval()(torch.randn(1, 3, 64, 96))
    assert [tuple(t.shape[1:]) for t in levels] == [(8, 16, 24), (16, 8, 12)]
    train_step(model, (64, 64))


def test_deploy_form_equals_training_form_in_eval_for_every_block_part(randomize_batchnorm):
    """DilatedRepConv folds in basic, static-focus and dynamic blocks alike; other parts are unchanged."""
    spec = with_block(TINY, "focus.stages.1", kind="basic", ffn="mlp", se=False)
    spec = with_block(spec, "base.stages.0", mixer={"type": "dwconv", "kernel_size": 3}, local_conv=False)
    model = build(spec)
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model.eval()(x)
        deployed = model.reparameterize()(x)
    assert (deployed - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert count_params(model) == count_params(build(spec, deploy=True))


# ------------------------------------------------------------------------------------ topologies


def test_pyramid_feedback_reruns_the_target_and_later_stages():
    spec = copy.deepcopy(TINY_PYRAMID)
    spec["stages"].append({"width": 24, "depth": 1, "kernel_size": 5})
    plain = build(spec)
    looped = build(spec | {"feedback": {"source": 2, "target": 1}})
    assert count_params(looped) == count_params(plain) + count_params(looped.feedback)
    calls = []
    for stage in looped.stages:
        stage.blocks[0].register_forward_hook(lambda *_, s=stage: calls.append(s))
    looped.eval()(torch.randn(1, 3, 64, 64))
    assert calls == [looped.stages[0], looped.stages[1], looped.stages[2], looped.stages[1], looped.stages[2]]
    train_step(looped, (64, 64))


def test_resolved_specs_of_new_topologies_round_trip(tmp_path):
    spec = archspec.load(with_block(TINY_PYRAMID, "stages.0", mixer={"type": "dwconv"}, se=False))
    path = tmp_path / "resolved.yaml"
    path.write_text(spec.to_yaml())
    assert archspec.load(path) == spec
    assert "block: {" not in archspec.load("xt").to_yaml()  # default blocks stay out of written specs


def test_set_reaches_block_parts_and_a_mixer_swap_needs_one_override():
    spec = archspec.load("xt", ["focus.stages.0.block.mixer.type=dilated_repconv"])
    assert spec.resolved_block("focus.stages.0").mixer.kernel_size == 13  # the stage's kernel_size
    model = build("xt", overrides=["focus.stages.0.block.mixer.type=dilated_repconv"])
    assert type(model.focus.stages[0].blocks[0].contmix).__name__ == "DilatedRepConv"
    assert build("pico", overrides=["base.stages.0.block.se=false"]).base.stages[0].blocks[0].se is None


# ------------------------------------------------------------------------------------ validation


def test_misspelt_mixer_type_suggests_the_name():
    message = error_of("xt", ["focus.stages.0.block.mixer.type=dilated_repcov"])
    assert "focus.stages[0].block.mixer.type (--set" in message
    assert "did you mean 'dilated_repconv'" in message and "contmix" in message


def test_unknown_mixer_argument_names_the_mixer_field(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "extends: pico\noverview: {width: 96, depth: 1, kernel_size: 7,\n  block: {mixer: {type: dwconv, kernal_size: 3}}}\n"
    )
    message = error_of(path)
    assert "overview.block.mixer.kernal_size" in message and "did you mean 'kernel_size'" in message


def test_context_guided_contmix_outside_focus_net_is_an_error():
    message = error_of("pico", ["base.stages.2.block.mixer.type=contmix", "base.stages.2.block.mixer.context=guided",
                                "base.stages.2.block.mixer.groups=2"])  # fmt: skip
    assert "base.stages[2].block.mixer.context" in message and "context: self" in message


def test_dynamic_blocks_outside_focus_net_are_an_error():
    message = error_of("pico", ["overview.block.kind=dynamic"])
    assert "overview.block.kind" in message and "only Focus-Net stages" in message


def test_a_mixer_missing_an_argument_says_where_to_set_it():
    message = error_of("pico", ["base.stages.1.block.mixer.type=contmix"])
    assert "base.stages[1].block.mixer.groups" in message and "set it on the stage or in block.mixer" in message


def test_mixer_arguments_are_checked_where_they_were_written():
    message = error_of("pico", ["focus.stages.0.block.mixer.groups=3"])
    assert "focus.stages[0].block.mixer.groups" in message and "4 x groups = 12" in message
    message = error_of("pico", ["base.stages.0.block.mixer.type=dwconv", "base.stages.0.block.mixer.kernel_size=4"])
    assert "base.stages[0].block.mixer.kernel_size" in message and "even" in message


def test_feedback_to_a_stage_that_does_not_exist_is_an_error():
    message = error_of(TINY_PYRAMID | {"feedback": {"source": 5, "target": 0}})
    assert "feedback.source" in message and "only stages 0 to 1" in message
    message = error_of(TINY_PYRAMID | {"feedback": {"source": 1, "target": 1}})
    assert "feedback.target" in message and "earlier stage" in message


def test_unknown_topology_suggests_the_name():
    message = error_of(TINY_PYRAMID | {"topology": "pyramd"})
    assert "unknown topology 'pyramd'" in message and "did you mean 'pyramid'" in message


def test_pyramids_have_no_aux_head_and_unknown_keys_are_named():
    message = error_of(TINY_PYRAMID | {"head": {"num_classes": 3, "aux_head": True}})
    assert "head.aux_head" in message and "unknown key" in message


# ------------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("spec", ["pico", TINY_PYRAMID], ids=["dds", "pyramid"])
def test_gradient_checkpointing_gives_the_plain_gradients_and_statistics(spec, single_thread):
    torch.manual_seed(0)
    source = build(spec, overrides=["drop_path_rate=0.2"])  # drop path: the replayed RNG must match
    x = torch.randn(2, 3, 64, 64)

    def run(checkpointed: bool):
        model = copy.deepcopy(source)
        model.set_grad_checkpointing(checkpointed)
        torch.manual_seed(1)
        out = model.train()(x)
        outputs = out.values() if isinstance(out, dict) else [out]
        sum(o.square().sum() for o in outputs).backward()
        return model

    plain, checkpointed = run(False), run(True)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    for (name, a), (_, b) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        assert torch.equal(a, b), name  # BN statistics updated once, not again in the recomputation


# ------------------------------------------------------------------------------------ Table 6


TABLE6 = paper_rows("table6")


def test_table6_has_every_row_of_the_roadmap():
    names = [row.path.stem for row in TABLE6]
    assert names == [
        "01-plainnet", "02-dilated-repconv", "03-se", "04-local-conv", "05-convffn", "06-recurrent", "07-dds",
        "08-no-feature-feed", "09-static-to-dynamic", "10-aux-loss", "11-initial-prior", "12-gate",
    ]  # fmt: skip
    for row in TABLE6:
        assert row.path.read_text().startswith(f"# Table 6, row {int(row.path.stem[:2])} ")


@pytest.mark.parametrize("row", TABLE6, ids=lambda r: r.path.stem)
def test_table6_inference_params_are_within_5_percent_of_the_paper(row):
    params = inference_params(archspec.load(row.path)) / 1e6
    assert abs(params - row.mparams) <= 0.05 * row.mparams, f"{params:.2f}M vs paper {row.mparams}M"


def test_table6_last_row_is_the_xt_preset():
    last = archspec.load(TABLE6[-1].path).model_dump(exclude={"name", "description"})
    assert last == archspec.load("xt").model_dump(exclude={"name", "description"})


@pytest.mark.parametrize("row", TABLE6, ids=lambda r: r.path.stem)
def test_table6_rows_build_and_take_a_training_step(row, single_thread):
    model = build(row.path, overrides=["head.num_classes=4"])
    train_step(model, (64, 64))  # the /32 stage at 2x2


def test_build_json_reports_inference_params(capsys):
    from typer.testing import CliRunner

    from overlock.cli import app

    result = CliRunner().invoke(app, ["build", str(TABLE6[9].path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["inference_params"] == inference_params(archspec.load(TABLE6[9].path))
    assert summary["params"] > summary["inference_params"]  # the aux head and the DilatedRepConv branches
    assert {row["mixer"] for row in summary["stages"]} >= {"dilated_repconv 17", "contmix 13/5 G4 S7"}


def test_train_takes_grad_checkpoint_and_pyramid_specs(tmp_path):
    from typer.testing import CliRunner

    from overlock.cli import app

    spec = tmp_path / "pyramid.yaml"
    spec.write_text(archspec.load(TINY_PYRAMID | {"head": {"num_classes": None, "projection": None}}).to_yaml())
    run = tmp_path / "run"
    args = ["train", str(spec), "--data", "synthetic:classes=3,train=8,val=4", "-b", "4", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--workers", "0", "--grad-checkpoint", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["grad_checkpoint"] is True
    assert (run / "last.pt").is_file()


def test_readme_roadmap_table_is_the_generated_one():
    """README's Table 6 comes from `python benchmarks/paper_tables.py table6 --readme`: its parameter
    column must still be what the specs build (FLOPs are left to the script: tracing 12 models is slow)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- paper-table6:start -->\n")[1].split("<!-- paper-table6:end -->")[0]
    rows = [line.split("|")[1:-1] for line in block.strip().splitlines()[2:]]
    assert [r[1].strip(" `") for r in rows] == [row.path.stem for row in TABLE6], "rerun the script"
    for cells, row in zip(rows, TABLE6, strict=True):
        assert cells[3].strip() == f"{inference_params(archspec.load(row.path)) / 1e6:.2f}", "rerun the script"


@pytest.mark.parametrize(
    "example", sorted((archspec.preset_dir().parent / "examples").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_example_builds(example):
    model = build(example)
    assert count_params(model) > 0 and model.spec.name == example.stem


def test_pyramids_follow_the_timm_conventions_too():
    model = build(TINY_PYRAMID | {"feedback": {"source": 1, "target": 0}})
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == [
        (8, 4, "stages.0"),
        (16, 8, "stages.1"),
    ]
    assert model.num_features == 16 and model.num_classes == 3
    levels = build(TINY_PYRAMID | {"feedback": {"source": 1, "target": 0}}, features_only=True)(
        torch.randn(1, 3, 64, 64)
    )
    assert [tuple(t.shape[1:]) for t in levels] == [(8, 16, 16), (16, 8, 8)]
