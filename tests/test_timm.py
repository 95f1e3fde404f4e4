"""timm integration: registry, factory arguments, layer-wise lr decay (runs where timm imports)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is optional (pip install 'overlock[timm]')")
timm_models = pytest.importorskip("overlock.timm_models")


def test_every_preset_is_registered():
    from overlock import archspec

    assert set(timm.list_models("overlock_*")) >= {f"overlock_{p}" for p in archspec.preset_names()}


def test_create_model_takes_timm_arguments(single_thread):
    model = timm.create_model("overlock_pico", num_classes=10, drop_path_rate=0.1).eval()
    assert model.num_classes == 10 and model.spec.drop_path_rate == 0.1
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_features_only_with_out_indices(single_thread):
    model = timm.create_model("overlock_pico", features_only=True, out_indices=(1, 3)).eval()
    levels = model(torch.randn(1, 3, 64, 96))
    assert [level.shape[1] for level in levels] == model.feature_info.channels()
    assert [96 // level.shape[-1] for level in levels] == model.feature_info.reduction() == [8, 32]


def test_the_issue_example_builds_t():
    model = timm.create_model("overlock_t", num_classes=10, drop_path_rate=0.1, features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_layer_decay_assigns_several_layers():
    from timm.optim import create_optimizer_v2

    model = timm.create_model("overlock_pico", num_classes=10)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    total_blocks = model.spec.total_blocks
    assert len(scales) > total_blocks // 2  # stem, blocks and head at different depths
    assert scales[-1] == 1.0  # the head keeps the full rate
    stem = next(g for g in optimizer.param_groups if any(p is model.base.stem.conv1.weight for p in g["params"]))
    assert stem["lr_scale"] == scales[0]


def test_register_spec_and_refused_download(tmp_path):
    from overlock import archspec

    path = tmp_path / "mine.yaml"
    path.write_text(archspec.load("pico", ["name=mine"]).to_yaml())
    timm_models.register_spec("my_overlock", path)
    assert timm.create_model("my_overlock", num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match="does not download"):
        timm.create_model("overlock_pico", pretrained=True)
