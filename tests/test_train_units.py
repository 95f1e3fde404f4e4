"""Training building blocks: loss, schedule, parameter groups, sampler, augmentation, EMA, checkpoints."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from overlock.errors import CheckpointError, OverlockError
from overlock.training import checkpoint
from overlock.training.augment import random_resized_crop_box, sample_rng
from overlock.training.config import TrainConfig, validated
from overlock.training.ema import ModelEma
from overlock.training.errors import ConfigError
from overlock.training.loss import OverlockLoss
from overlock.training.optim import build_optimizer
from overlock.training.sampler import ResumableSampler, ShardSampler
from overlock.training.schedule import WarmupCosine

# ---------------------------------------------------------------------------------------------
# loss


def test_loss_is_main_ce_plus_weighted_aux_ce():
    torch.manual_seed(0)
    main, aux = torch.randn(6, 5), torch.randn(6, 5)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    parts = OverlockLoss(aux_weight=0.4)({"main": main, "aux": aux}, target)
    expected = F.cross_entropy(main, target) + 0.4 * F.cross_entropy(aux, target)
    assert torch.equal(parts.total, expected)
    assert torch.equal(parts.main, F.cross_entropy(main, target))
    assert torch.equal(parts.aux, F.cross_entropy(aux, target))


def test_loss_aux_weight_scales_only_the_aux_term():
    main, aux = torch.randn(4, 3), torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 1])
    without = OverlockLoss(aux_weight=0.0)({"main": main, "aux": aux}, target).total
    with_one = OverlockLoss(aux_weight=1.0)({"main": main, "aux": aux}, target).total
    assert torch.allclose(without, F.cross_entropy(main, target))
    assert torch.allclose(with_one - without, F.cross_entropy(aux, target))


def test_loss_label_smoothing_applies_to_both_heads():
    main, aux = torch.randn(4, 3), torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 1])
    parts = OverlockLoss(aux_weight=0.4, label_smoothing=0.1)({"main": main, "aux": aux}, target)
    expected = F.cross_entropy(main, target, label_smoothing=0.1) + 0.4 * F.cross_entropy(
        aux, target, label_smoothing=0.1
    )
    assert torch.equal(parts.total, expected)


def test_loss_without_aux_head_is_plain_ce():
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    parts = OverlockLoss(aux_weight=0.4)(logits, target)
    assert parts.aux is None
    assert torch.equal(parts.total, F.cross_entropy(logits, target))


# ---------------------------------------------------------------------------------------------
# schedule


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    sched = WarmupCosine(peak_lr=1e-3, total_steps=110, warmup_steps=10, min_lr=1e-5)
    assert sched(0) == pytest.approx(1e-4)  # 1/10 of the peak: the first step already learns
    assert sched(4) == pytest.approx(5e-4)
    assert sched(9) == pytest.approx(1e-3)  # peak at the end of warm-up
    assert sched(10) == pytest.approx(1e-3)  # cosine starts at the peak
    assert sched(60) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way: mean of peak and floor
    assert sched(110) == pytest.approx(1e-5)  # one past the last step: the floor
    values = [sched(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_schedule_without_warmup_starts_at_peak():
    sched = WarmupCosine(peak_lr=0.5, total_steps=4)
    assert [sched(s) for s in range(5)] == pytest.approx(
        [0.5, 0.5 * (1 + math.cos(math.pi / 4)) / 2, 0.25, 0.5 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]
    )


def test_schedule_rejects_warmup_longer_than_run():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(peak_lr=1.0, total_steps=5, warmup_steps=6)


# ---------------------------------------------------------------------------------------------
# optimizer groups


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.ones(4))

    def no_weight_decay(self):
        return {"conv.bias", "norm.weight", "norm.bias", "scale"}


def test_optimizer_puts_no_weight_decay_names_in_a_zero_decay_group():
    model = _Tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model.conv.weight)]
    assert {id(p) for p in no_decay["params"]} == {
        id(model.conv.bias),
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.scale),
    }


def test_optimizer_falls_back_to_low_rank_params_without_model_hint():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    decay, no_decay = build_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3


def _per_parameter_loop(optimizer):
    """Make an optimizer from `build_optimizer` run PyTorch's per-parameter loop (as every earlier overlock did)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = None, False
    return optimizer


def _random_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def test_optimizer_is_fused_on_the_cpu_and_updates_as_the_per_parameter_loop():
    from overlock.builder import build

    fused_model, loop_model = build("pico"), build("pico")
    loop_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, lr=1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] is True
    loop = _per_parameter_loop(build_optimizer(loop_model, lr=1e-2, weight_decay=0.05))
    before = {name: p.detach().clone() for name, p in fused_model.named_parameters()}
    for seed in range(3):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            _random_grads(model, seed)
            optimizer.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        assert not torch.equal(a, before[name]), name  # three steps of lr 1e-2 moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_resumed_optimizer_keeps_its_own_implementation_and_continues_the_saved_one():
    from overlock.builder import build
    from overlock.training.optim import load_optimizer_state

    saved_model = build("pico")  # a run saved by the per-parameter loop (an earlier overlock)
    loop = _per_parameter_loop(build_optimizer(saved_model, lr=1e-2, weight_decay=0.05))
    _random_grads(saved_model, 0)
    loop.step()
    resumed_model = build("pico")
    resumed_model.load_state_dict(saved_model.state_dict())
    resumed = build_optimizer(resumed_model, lr=1e-2, weight_decay=0.05)
    buffer = io.BytesIO()  # through a checkpoint's bytes (a state dict shares the live moments)
    torch.save(loop.state_dict(), buffer)
    buffer.seek(0)
    load_optimizer_state(resumed, torch.load(buffer, weights_only=True))
    assert all(group["fused"] is True for group in resumed.param_groups)
    for model, optimizer in ((saved_model, loop), (resumed_model, resumed)):
        _random_grads(model, 1)
        optimizer.step()
    for (name, a), b in zip(resumed_model.named_parameters(), saved_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # the moments carried over


def test_optimizer_falls_back_to_pytorchs_default_where_no_fused_kernel_applies():
    from overlock.training.optim import fused_adamw_applies

    assert fused_adamw_applies([torch.zeros(2), torch.zeros(3, 3)])
    assert not fused_adamw_applies([torch.zeros(2, device="meta")])
    assert not fused_adamw_applies([torch.zeros(2, dtype=torch.int64)])


def test_optimizer_uses_the_real_models_no_weight_decay_set():
    from overlock.builder import build

    model = build("pico")
    names = model.no_weight_decay()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in opt.param_groups[1]["params"]} == names
    assert any("norm" in n for n in names) and any(n.endswith("bias") for n in names)


# ---------------------------------------------------------------------------------------------
# options


def test_config_rejects_epochs_and_steps_together_naming_the_flags():
    with pytest.raises(ConfigError, match="--epochs or --steps"):
        validated(TrainConfig, {"spec": "pico", "epochs": 2, "steps": 3})


def test_help_of_a_required_option_shows_no_default():
    from overlock.training.config import EvalConfig, option_help

    assert "PydanticUndefined" not in option_help(EvalConfig, "weights")
    assert option_help(EvalConfig, "batch_size").endswith("(default: 128)")


def test_config_names_the_flag_of_an_out_of_range_value():
    with pytest.raises(ConfigError, match="--label-smoothing"):
        validated(TrainConfig, {"spec": "pico", "label_smoothing": 1.5})


# ---------------------------------------------------------------------------------------------
# sampler and augmentation


def test_sampler_resumes_mid_epoch_with_the_same_remaining_batches():
    full = ResumableSampler(size=40, batch_size=4, seed=3)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(size=40, batch_size=4, seed=3)
    resumed.set_epoch(2, skip_batches=3)
    assert list(resumed) == order[12:]
    assert len(resumed) == len(order) - 12
    assert all(epoch == 2 for _, epoch in order)


def test_sampler_shuffles_differently_per_epoch_and_drops_the_partial_batch():
    sampler = ResumableSampler(size=10, batch_size=4, seed=0)
    sampler.set_epoch(0)
    first = [i for i, _ in sampler]
    sampler.set_epoch(1)
    second = [i for i, _ in sampler]
    assert len(first) == len(second) == 8 and first != second


def test_samplers_shard_ranks_without_overlap():
    shards = [ResumableSampler(size=20, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(0)
    a, b = ({i for i, _ in s} for s in shards)
    assert not a & b and len(a) == len(b) == 10
    val = [list(ShardSampler(7, rank=r, world_size=2)) for r in range(2)]
    assert sorted(val[0] + val[1]) == list(range(7))


def test_augmentation_depends_only_on_seed_epoch_and_index():
    boxes = [random_resized_crop_box(100, 80, sample_rng(1, 2, 3)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    assert random_resized_crop_box(100, 80, sample_rng(1, 3, 3)) != boxes[0]
    top, left, h, w = boxes[0]
    assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_follows_the_model_and_copies_integer_buffers():
    model = nn.BatchNorm1d(2)
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)  # warm-up decay min(0.5, 2/11) = 2/11
    d = 2 / 11
    assert torch.allclose(ema.module.weight, torch.full((2,), d * 1.0 + (1 - d) * 3.0))
    assert int(ema.module.num_batches_tracked) == 7


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_rng_state_roundtrips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = checkpoint.capture_rng()
    checkpoint.save_atomic({"rng": state}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "step": 1}, path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the disk ...
        raise OSError("disk full")  # ... then the writer dies

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OverlockError, match="disk full"):  # a clear message, not a traceback
        checkpoint.save_atomic({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_model_state_accepts_run_checkpoints_and_plain_state_dicts():
    weights = {"a": torch.ones(1)}
    run = {"format": checkpoint.FORMAT, "model": weights, "ema": {"module": {"a": torch.zeros(1)}}}
    assert checkpoint.model_state(run) is weights
    assert torch.equal(checkpoint.model_state(run, use_ema=True)["a"], torch.zeros(1))
    assert checkpoint.model_state(weights) == weights
    assert list(checkpoint.model_state({"state_dict": {"module.a": torch.ones(1)}})) == ["a"]
    with pytest.raises(CheckpointError, match="neither"):
        checkpoint.model_state({"epoch": 3})
    with pytest.raises(CheckpointError, match="EMA"):
        checkpoint.model_state({**run, "ema": None}, use_ema=True)


def test_loading_a_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="bad.pt"):
        checkpoint.load_file(bad)


def test_unreadable_checkpoints_say_what_the_file_is(tmp_path):
    import argparse

    def error(path) -> str:
        with pytest.raises(CheckpointError) as info:
            checkpoint.load_file(path)
        return str(info.value)

    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(64)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    assert "truncated or corrupt" in error(truncated)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    assert "is not a PyTorch checkpoint" in error(spec)
    assert "is a directory" in error(tmp_path)
    assert "the path is empty" in error("")
    pickled_object = tmp_path / "object.pt"
    torch.save({"args": argparse.Namespace(lr=1)}, pickled_object)
    message = error(pickled_object)
    assert "argparse.Namespace" in message and "weights_only=True" in message
    assert "weights_only` set to `False`" not in message  # never advise loading untrusted code


def test_an_incomplete_run_checkpoint_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="format version 7"):
        checkpoint.check_run_checkpoint({"format": checkpoint.FORMAT, "version": 7}, "old.pt")
    with pytest.raises(CheckpointError, match="incomplete run checkpoint .*model"):
        checkpoint.check_run_checkpoint({"format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION}, "x.pt")
