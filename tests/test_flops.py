"""FLOP counting: the presets land on the reference figures; ContMix is counted by its handle."""

from __future__ import annotations

import pytest

from overlock.builder import build
from overlock.builder.flops import count_flops

REFERENCE_GFLOPS = {  # ARCHITECTURE.md section 1, fvcore at 1x3x224x224: training form, deploy form
    "xt": (2.89, 2.72),
    "t": (6.06, 5.68),
    "s": (10.54, 9.95),
    "b": (18.12, 17.18),
}


@pytest.mark.parametrize("deploy", [False, True], ids=["training", "deploy"])
@pytest.mark.parametrize("variant", sorted(REFERENCE_GFLOPS))
def test_preset_flops_land_within_two_percent_of_the_reference(variant, deploy):
    expected = REFERENCE_GFLOPS[variant][deploy] * 1e9
    measured = count_flops(build(variant, deploy=deploy)).total
    assert abs(measured / expected - 1) < 0.02, f"{variant}: {measured / 1e9:.3f} G vs {expected / 1e9:.2f} G"


def test_contmix_aggregation_is_counted_as_b_heads_h_w_k_k_c():
    report = count_flops(build("pico"), (224, 224))
    # pico at 224: Focus stage 1 is 14x14, width 64, G=2 -> 4 heads of 8 channels per kernel half
    # (k=5 and K=13), 2 blocks; stage 2 is 7x7 (>= K=7), width 96, G=3 -> 6 heads of 8 channels.
    stage1 = 2 * 4 * 14 * 14 * 8 * (5 * 5 + 13 * 13)
    stage2 = 1 * 6 * 7 * 7 * 8 * (5 * 5 + 7 * 7)
    assert report.by_operator["contmix"] == stage1 + stage2
    assert report.by_operator["einsum"] > 0, "the affinity product is counted"


def test_flops_grow_with_the_input_and_leave_the_model_mode_alone():
    model = build("pico").train()
    small, large = count_flops(model, (256, 256)).total, count_flops(model, (512, 512)).total  # no resize path
    assert model.training
    assert 3.5 < large / small < 4.5
