"""The builder: published parameter counts, goldens, deploy equivalence, official loading, shapes."""

from __future__ import annotations

import pytest
import torch

from overlock import archspec
from overlock.builder import build, load_official, official_to_overlock
from overlock.builder.blocks import ContMix
from overlock.builder.summary import count_params
from overlock.errors import CheckpointError, SpecError

PUBLISHED_PARAMS = {  # ARCHITECTURE.md section 1: training form, deploy form
    "xt": (17_307_272, 16_791_384),
    "t": (34_990_472, 33_981_064),
    "s": (58_309_772, 56_670_476),
    "b": (98_012_968, 95_520_680),
}


@pytest.mark.parametrize("variant", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_equal_the_published_models(variant):
    training, deploy = PUBLISHED_PARAMS[variant]
    assert count_params(build(variant)) == training
    assert count_params(build(variant, deploy=True)) == deploy


@pytest.mark.parametrize("case", ["square224", "small160x192"])
def test_pico_reproduces_the_reference_logits(reference_dir, case):
    golden = torch.load(reference_dir / "golden" / "pico.expected.pt", weights_only=True)["cases"][case]
    state = torch.load(reference_dir / "golden" / "pico.official_state_dict.pt", weights_only=True)
    model = load_official(build("pico"), state)

    def close(out: torch.Tensor, expected: torch.Tensor) -> bool:
        return (out - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()

    with torch.no_grad():
        model.eval()
        assert close(model(golden["input"]), golden["eval_logits"])
        model.train()  # BN on batch statistics, no drop path in the pico spec
        out = model(golden["input"])
        assert close(out["main"], golden["train_main"]) and close(out["aux"], golden["train_aux"])
        deployed = load_official(build("pico"), state).reparameterize().eval()
        assert close(deployed(golden["input"]), golden["eval_logits"])
    out = model(golden["input"])  # with autograd on, as a training step runs (ContMix's logits through the keys)
    assert close(out["main"].detach(), golden["train_main"]) and close(out["aux"].detach(), golden["train_aux"])


def test_official_key_table_covers_every_published_key(reference_dir):
    """Every key of the eight published layouts maps onto a tensor of the same shape in our model."""
    for variant in sorted(PUBLISHED_PARAMS):
        for deploy in (False, True):
            suffix = "_deploy" if deploy else ""
            lines = (reference_dir / "keys" / f"overlock_{variant}{suffix}.keys.tsv").read_text().splitlines()[1:]
            published = {
                k: () if s == "scalar" else tuple(int(d) for d in s.split("x"))
                for k, s in (ln.split("\t") for ln in lines)
            }
            ours = {k: tuple(v.shape) for k, v in build(variant, deploy=deploy).state_dict().items()}
            mapped = {official_to_overlock(k): shape for k, shape in published.items()}
            assert mapped == ours


def test_official_loading_is_strict_and_explains_mismatches(reference_dir):
    state = torch.load(reference_dir / "golden" / "pico.official_state_dict.pt", weights_only=True)
    broken = dict(state)
    broken.pop("head.4.bias")
    broken["extra.weight"] = torch.zeros(1)
    broken["high_level_proj.bias"] = torch.zeros(25)
    with pytest.raises(CheckpointError) as info:
        load_official(build("pico"), broken)
    message = str(info.value)
    assert "missing from the checkpoint (1)" in message and "head.fc.bias" in message
    assert "in the checkpoint but not in the model (1)" in message and "extra.weight" in message
    assert "context.proj.bias: checkpoint (25,) vs model (24,)" in message
    with pytest.raises(CheckpointError, match="build the model without --deploy"):
        load_official(build("pico", deploy=True), state)


@pytest.mark.parametrize("size", [(224, 224), (160, 192), (64, 64), (96, 160), (33, 47)])
def test_shapes_at_several_resolutions_including_maps_smaller_than_the_kernel(size):
    model = build("pico").eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_training_mode_returns_main_and_aux_and_without_aux_a_tensor():
    x = torch.randn(2, 3, 64, 64)
    out = build("pico").train()(x)
    assert set(out) == {"main", "aux"} and out["main"].shape == out["aux"].shape == (2, 10)
    plain = build("pico", overrides=["head.aux_head=false"]).train()(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 10)


def test_deploy_form_equals_training_form_in_eval_mode(randomize_batchnorm):
    torch.manual_seed(0)
    model = build("pico")
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = model(x)
        direct = build("pico", deploy=True).eval()
        converted = model.reparameterize()
        got = converted(x)
        direct.load_state_dict(converted.state_dict())  # deploy=True builds the same layout
        again = direct(x)
    assert count_params(converted) == count_params(direct)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


def test_features_only_returns_the_four_pyramid_levels():
    model = build("pico", features_only=True).eval()
    with torch.no_grad():
        levels = model(torch.randn(1, 3, 128, 160))
    assert [tuple(t.shape) for t in levels] == [(1, 16, 32, 40), (1, 32, 16, 20), (1, 88, 8, 10), (1, 120, 4, 5)]
    assert not hasattr(model, "head")


def test_forward_features_gives_the_focus_output_and_the_context():
    features, ctx = build("pico").eval().forward_features(torch.randn(1, 3, 64, 64))
    assert features.shape == (1, 96 + 24, 2, 2) and ctx.shape == (1, 96, 2, 2)


@pytest.mark.parametrize(
    "overrides",
    [
        ["context.gate=false"],
        ["context.reinject_prior=false"],
        ["context.base_features=false", "focus.stages.0.width=48"],
        ["context.width=16", "norm.block=batchnorm", "residual_scaling=false"],
        ["focus.stages.0.layer_scale=null", "focus.stages.1.region_centers=5", "head.dropout=0.2"],
    ],
)
def test_context_flow_and_norm_knobs_build_and_run(overrides):
    model = build("pico", overrides=overrides).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_context_knobs_change_the_built_modules():
    names = set(build("pico", overrides=["context.gate=false", "context.reinject_prior=false"]).state_dict())
    assert not any(".gate." in n or ".alpha." in n for n in names)
    full = set(build("pico").state_dict())
    assert "focus.stages.1.blocks.0.alpha.weight" in full and "focus.stages.0.blocks.0.alpha.weight" not in full


def test_a_new_variant_with_more_stages_builds():
    spec = archspec.load("pico").model_dump()
    spec["base"]["stages"].append({"width": 64, "depth": 1, "kernel_size": 9})
    spec["focus"]["stages"].append({"width": 96, "depth": 1, "kernel_size": 5, "small_kernel_size": 3, "groups": 2})
    model = build(spec).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_drop_path_rates_are_linear_over_all_blocks_in_order():
    model = build("pico", overrides=["drop_path_rate=0.3"])
    rates = [m.drop_path.rate for m in model.modules() if hasattr(m, "drop_path")]
    assert len(rates) == archspec.load("pico").total_blocks == 8
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 8))


def test_open_num_classes_needs_a_value():
    with pytest.raises(SpecError, match="head.num_classes is open"):
        build("pico", overrides=["head.num_classes=null"])


def test_no_weight_decay_lists_norms_biases_scales_and_position_biases():
    model = build("pico")
    skip = model.no_weight_decay()
    assert "focus.stages.0.blocks.0.contmix.rpb_large" in skip
    assert "base.stages.2.blocks.0.layer_scale.weight" in skip
    assert "base.stages.0.blocks.0.norm.weight" in skip and "base.stages.0.blocks.0.mlp.grn.gamma" in skip
    assert "base.stages.0.blocks.0.mlp.fc1.weight" not in skip and "head.fc.weight" not in skip


def test_contmix_backend_can_be_switched_and_is_checked():
    model = build("pico")
    model.set_contmix_backend("reference")
    assert {m.contmix_backend for m in model.modules() if isinstance(m, ContMix)} == {"reference"}
    with pytest.raises(ValueError, match="not known"):
        model.set_contmix_backend("cuda-magic")
