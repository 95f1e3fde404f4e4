"""timm-style model API and the dense-prediction backbone (no timm needed here; see test_timm.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from overlock.builder import build, load_backbone
from overlock.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
PYRAMID = str(REPO / "specs/paper/table6/05-convffn.yaml")
RECURRENT = str(REPO / "specs/paper/table6/06-recurrent.yaml")


@pytest.fixture(scope="module")
def pico():
    torch.manual_seed(0)
    return build("pico").eval()


def test_feature_info_describes_the_levels_forward_intermediates_returns(pico, single_thread):
    info = pico.feature_info
    assert info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ["base.stages.0", "base.stages.1", "focus.stages.0", "focus.stages.1"]
    x = torch.randn(2, 3, 96, 160)
    final, levels = pico.forward_intermediates(x)
    assert [t.shape[1] for t in levels] == info.channels()
    assert [160 // t.shape[-1] for t in levels] == info.reduction()
    assert torch.equal(final, pico.forward_features(x)[0])
    assert len(pico.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


def test_forward_head_and_pre_logits(pico, single_thread):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # both under one grad mode: with a gradient some products take other kernels
        features = pico.forward_features(x)
        assert torch.equal(pico.forward_head(features), pico(x))
        assert pico.forward_head(features, pre_logits=True).shape == (2, pico.head_hidden_size)
    assert pico.num_features == features[0].shape[1] and pico.num_classes == pico.spec.head.num_classes


def test_reset_classifier_keeps_the_backbone(single_thread):
    model = build("pico").eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("head.fc", "aux_head.fc"))}
    model.reset_classifier(5)
    assert model.get_classifier().out_channels == 5 and model.num_classes == 5 == model.spec.head.num_classes
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(torch.randn(1, 3, 64, 64)).shape == (1, model.head_hidden_size)


def test_group_matcher_orders_every_backbone_parameter_by_depth(pico):
    matcher = pico.group_matcher()
    compiled = []
    for group, spec in enumerate(matcher.values()):
        for pattern, suffix in spec if isinstance(spec, list) else [(spec, None)]:
            compiled.append((re.compile(pattern), group, suffix))

    def ordinal(name):
        for pattern, group, suffix in compiled:
            found = pattern.match(name)
            if found:
                return (group, *map(int, found.groups()), *(suffix or ()))
        return None

    unmatched = [n for n, _ in pico.named_parameters() if ordinal(n) is None]
    assert unmatched and all(n.startswith(("head.", "aux_head.")) for n in unmatched)
    assert ordinal("base.stem.conv1.weight") < ordinal("base.stages.0.blocks.0.dwconv.weight")
    assert ordinal("base.stages.2.blocks.0.dwconv.weight") < ordinal("overview.blocks.0.dwconv.weight")
    assert ordinal("overview.blocks.0.dwconv.weight") < ordinal("context.proj.weight")
    assert ordinal("context.proj.weight") < ordinal("focus.stages.0.blocks.0.dwconv1.weight")
    assert ordinal("focus.stages.0.blocks.1.dwconv1.weight") < ordinal("focus.stages.1.downsample.x.conv.weight")
    assert len({ordinal(n) for n, _ in pico.named_parameters()} - {None}) > pico.spec.total_blocks


def test_pretrained_cfg_says_what_input_the_model_expects(pico):
    cfg = pico.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["classifier"] == "head.fc" and len(cfg["mean"]) == 3


# --- dense prediction -------------------------------------------------------------------------


def test_classification_weights_load_into_a_backbone_with_a_report(pico, single_thread):
    backbone = build("pico", features_only=True).eval()
    report = load_backbone(backbone, pico.state_dict())
    assert report.new and all(k.startswith("pyramid.") for k in report.new)
    assert report.dropped and all(k.startswith(("head.", "aux_head.")) for k in report.dropped)
    assert "pyramid" in str(report) and "head.fc.weight" in str(report)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        levels = backbone(x)
        raw = pico.forward_intermediates(x, intermediates_only=True)
    # The backbone's first level is its pyramid norm applied to the classifier's own stage output.
    assert torch.allclose(levels[0], backbone.pyramid.norms[0](raw[0]), atol=1e-5)
    assert backbone.feature_info.channels() == [t.shape[1] for t in levels]
    assert backbone.out_indices == (0, 1, 2, 3)


def test_published_layout_loads_into_a_backbone(reference_dir):
    state = torch.load(reference_dir / "golden" / "pico.official_state_dict.pt", weights_only=True)
    report = load_backbone(build("pico", features_only=True), state)
    assert "head.fc.weight" in report.dropped and all(k.startswith("pyramid.") for k in report.new)


def test_backbone_loading_stays_strict_about_everything_else(pico):
    state = dict(pico.state_dict())
    state.pop("base.stages.0.blocks.0.dwconv.weight")
    state["focus.stages.0.blocks.0.contmix.rpb_small"] = torch.zeros(1)
    state["stray.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_backbone(build("pico", features_only=True), state)
    message = str(info.value)
    for part in ("base.stages.0.blocks.0.dwconv.weight", "stray.weight", "rpb_small", "shape mismatch"):
        assert part in message


class TinyFPN(nn.Module):
    """A minimal torchvision-style FPN: lateral 1x1 convs, top-down nearest upsampling, 3x3 outputs."""

    def __init__(self, channels: list[int], width: int = 16) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.output = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in channels)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        top = self.lateral[-1](levels[-1])
        outs = [self.output[-1](top)]
        for i in range(len(levels) - 2, -1, -1):
            top = self.lateral[i](levels[i]) + F.interpolate(top, size=levels[i].shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](top))
        return outs


def test_backbone_drives_an_fpn_end_to_end(single_thread):
    backbone = build("pico", features_only=True)
    backbone.set_out_indices([1, 2, 3])
    fpn = TinyFPN(backbone.feature_info.channels())
    x = torch.randn(2, 3, 128, 96)
    outs = fpn(backbone(x))
    assert [o.shape[-2:] for o in outs] == [(128 // r, 96 // r) for r in backbone.feature_info.reduction()]
    sum(o.mean() for o in outs).backward()
    assert backbone.base.stages[1].blocks[0].dwconv.weight.grad is not None
    assert backbone.base.stages[0].blocks[0].dwconv.weight.grad is not None  # feeds level 1
    assert backbone.pyramid.norms[0].weight.grad is None  # level 0 is not returned


def test_strict_load_official_points_a_backbone_to_load_backbone(reference_dir):
    from overlock.builder import load_official

    state = torch.load(reference_dir / "golden" / "pico.official_state_dict.pt", weights_only=True)
    with pytest.raises(CheckpointError, match="load_backbone"):
        load_official(build("pico", features_only=True), state)


# --- stop_early -------------------------------------------------------------------------------


def _calls(module: nn.Module) -> list[int]:
    """A counter of `module`'s forward calls (a list, so the test can read it after the forward)."""
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize(
    ("spec", "features_only", "skipped"),
    [
        ("pico", False, "focus"),
        ("pico", True, "focus"),
        (PYRAMID, False, "stages.3"),
        (PYRAMID, True, "stages.3"),
    ],
    ids=["dds", "dds-features-only", "pyramid", "pyramid-features-only"],
)
def test_stop_early_ends_the_forward_after_the_deepest_requested_level(spec, features_only, skipped, single_thread):
    torch.manual_seed(0)
    model = build(spec, features_only=features_only).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        full_final, full = model.forward_intermediates(x, indices=[0, 1])
        calls = _calls(dict(model.named_modules())[skipped])
        final, early = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        assert calls[0] == 0  # the network stopped after level 1
        assert len(early) == 2 and all(torch.equal(a, b) for a, b in zip(early, full, strict=True))
        assert torch.equal(final, early[-1]) and final.shape[-1] == 96 // 8 != full_final.shape[-1]
        only = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert calls[0] == 0 and torch.equal(only[0], full[1])
        # The deepest level needs the whole network: stop_early changes nothing there.
        _, deepest = model.forward_intermediates(x, indices=[1, 3], stop_early=True)
        _, reference = model.forward_intermediates(x, indices=[1, 3])
        assert calls[0] > 0 and all(torch.equal(a, b) for a, b in zip(deepest, reference, strict=True))


def test_stop_early_with_feedback_runs_the_stages_it_recomputes(single_thread):
    """A pyramid with feedback into stage 2 runs stages 2 and 3 twice: level 2 is final only at the end."""
    torch.manual_seed(0)
    model = build(RECURRENT).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(early, full, strict=True))
        calls = _calls(model.stages[3])
        model.forward_intermediates(x, indices=[1], stop_early=True)
        assert calls[0] == 0


def _readme_block(heading: str) -> str:
    """The first Python code block after `heading` in README.md."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\n", readme.index(heading)) + len("```python\n")
    return readme[start : readme.index("```\n", start)]


def test_readme_backbone_example_runs_as_written(tmp_path, monkeypatch, single_thread):
    """The README's detection example, unchanged, with a `t` classifier saved under its file name."""
    pytest.importorskip("torchvision", reason="torchvision does not import beside every torch (CI: timm venv)")
    code = _readme_block("### Backbone for detection and segmentation")
    assert "torchvision.ops.FeaturePyramidNetwork" in code and 'load_file("overlock_t_in1k_224.pth")' in code
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    classifier = build("t")
    torch.save(classifier.state_dict(), "overlock_t_in1k_224.pth")
    namespace: dict = {}
    exec(compile(code, "README.md (backbone example)", "exec"), namespace)  # our own README
    maps, backbone, report = namespace["maps"], namespace["backbone"], namespace["report"]
    assert list(maps) == ["p0", "p1", "p2"]
    assert [tuple(m.shape) for m in maps.values()] == [(2, 256, 256 // r, 320 // r) for r in (8, 16, 32)]
    assert backbone.feature_info.reduction() == [8, 16, 32]
    assert all(k.startswith("pyramid.") for k in report.new) and "head.fc.weight" in report.dropped
    stem = "base.stem.conv1.weight"
    assert torch.equal(backbone.state_dict()[stem], classifier.state_dict()[stem])
