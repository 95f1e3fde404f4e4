"""overlock.bench and `overlock bench`: timings, memory and the per-part profile (no speed assertions)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from overlock.bench import BenchSettings, LiveMemory, attribute, bench, module_scopes, profile_step, render, spread
from overlock.builder import build
from overlock.builder.layers import ConvMLP, hooked, observer
from overlock.cli import app
from overlock.errors import OverlockError
from overlock.kernels import gelu_dwconv, native

SMALL = ["--batch-size", "2", "--img-size", "64", "--threads", "1", "--reps", "3"]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_bench_json_reports_sane_timings_and_memory():
    result = run("bench", "pico", *SMALL, "--train", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "overlock-pico" and data["threads"] == 1 and data["reps"] == 3
    assert 0 < data["min_s"] <= data["median_s"] <= data["max_s"] and data["iqr_s"] >= 0
    assert data["images_per_s"] == pytest.approx(2 / data["median_s"])
    assert data["settings"]["train"] is True and data["settings"]["img_size"] == 64
    assert data["peak_memory_mib"] is None or data["peak_memory_mib"] >= 0
    live = data["live_memory_mib"]
    assert live is None or 0 < live  # a training step keeps maps for its backward
    assert data["profile"] is None
    assert data["cpu_kernels"].startswith("gelu_dwconv")  # compiled C kernels, or the fallback and why


def test_bench_profile_prints_its_total_on_a_line_of_its_own_then_the_breakdowns():
    """The total is no table's title: as one it wrapped at the narrow table's width."""
    result = run("bench", "pico", *SMALL, "--profile")
    assert result.exit_code == 0, result.output
    assert re.search(r"^profile: the median of 3 calls, [\d,]+ ms of operators \(CPU time\)$", result.stdout, re.M)
    assert re.search(r"^the calls' totals: [\d,]+, [\d,]+, [\d,]+ ms$", result.stdout, re.MULTILINE)
    titles = [line.strip() for line in result.stdout.splitlines()]
    assert {"by sub-network", "by part (inclusive; nested parts overlap)"} <= set(titles)


@pytest.mark.skipif(not LiveMemory().available, reason="needs glibc's mallinfo2")
def test_live_memory_does_not_count_what_the_first_dispatch_mode_of_a_process_imports():
    """A fresh process: the first dispatch mode imports dynamo's and sympy's modules (~26 MiB of
    malloc'd memory); a measurement of a call that keeps nothing must not count them."""
    code = (
        "import torch\nfrom overlock.bench import LiveMemory\n"
        "print(LiveMemory().measure(lambda: (torch.ones(10) + 1).sum()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1.0


@pytest.mark.skipif(not LiveMemory().available, reason="needs glibc's mallinfo2")
def test_live_memory_is_the_peak_of_the_tensors_alive_at_once():
    """Two 8 MiB tensors alive together, then one freed and a 4 MiB one made: 16 MiB at the peak,
    whatever the heap keeps afterwards; nothing left alive after the call counts once freed."""
    mib = 2**20

    def fn():
        first = torch.ones(2 * mib)  # 8 MiB of float32
        second = first * 2
        del first
        third = torch.ones(mib) + second[:mib]
        return third.sum()

    peak = LiveMemory().measure(fn)
    assert 16 <= peak < 16.5
    assert LiveMemory().measure(lambda: torch.ones(mib).sum()) == pytest.approx(4, abs=0.5)


def test_profile_attributes_time_to_every_block_part_forward_and_backward():
    result = bench(build("pico"), BenchSettings(batch_size=2, img_size=64, threads=1, train=True, reps=3, profile=True))
    profile = result.profile
    parts = profile["parts"]
    for part in ("large_kernel (DilatedRepConv)", "contmix (ContMix)", "mlp (ConvMLP)", "norm1 (LayerNorm2d)"):
        assert parts[part]["forward"] > 0 and parts[part]["backward"] > 0, part
    assert parts["contmix (ContMix)"]["count"] == 3  # pico: one + two Focus-Net blocks
    subnets = profile["subnetworks"]
    assert subnets["base"]["backward"] > 0 and subnets["focus"]["backward"] > 0
    # ContMix's operator: the autograd function around the C kernels that form the logits, or the custom op
    assert any(op.startswith(("ContMixFromQueries", "overlock::contmix")) for op in profile["operators"])
    assert sum(t["forward"] + t["backward"] for t in subnets.values()) <= profile["total_s"] + 1e-9


def test_a_slow_first_call_is_reported_apart_from_the_timings():
    """The first call compiles (torch.compile; on a GPU the Triton kernels and their tuning per
    shape), which can take a minute: it is timed on its own, kept out of the timings and said."""

    class FirstCallCompiles(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.calls = nn.Linear(3, 10), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 1:
                time.sleep(1.2)
            return self.linear(x.mean(dim=(2, 3)))

    settings = BenchSettings(batch_size=2, img_size=8, threads=1, reps=3)
    result = bench(FirstCallCompiles(), settings, num_classes=10)
    assert result.first_call_s >= 1.2 and result.max_s < 1.0
    lines = [str(item) for item in render(result)]
    assert any(re.fullmatch(r"first call: 1\.\d s \(one-time work: .*; not in the timings\)", line) for line in lines)
    quick = bench(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), settings, num_classes=10)
    for first in (quick.median_s, 0.9):  # like the others, or under a second: nothing to say
        quick.first_call_s = first
        assert not any(str(item).startswith("first call") for item in render(quick))


def test_profile_reports_its_median_call_not_one_that_ran_slow():
    """Of three profiled calls the second does thirty times the work, in another op (sin, where the
    others run tanh): the profile is a call that ran tanh, and every call's total is beside it. The
    ops run once before (their first call's one-time costs are no part of this), and each call is
    long enough (a millisecond or more) that a busy machine's noise does not reorder the three."""

    class Outlier(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                for _ in range(30):
                    x = torch.sin(x)
                return x
            return torch.tanh(x)

    model, image = Outlier(), torch.randn(64, 128, 128)
    torch.sin(torch.tanh(image))
    profile = profile_step(model, lambda: model(image), calls=3)
    assert model.calls == 3 and len(profile["call_totals_s"]) == 3
    assert "aten::tanh" in profile["operators"] and "aten::sin" not in profile["operators"], profile["call_totals_s"]
    assert profile["total_s"] == sorted(profile["call_totals_s"])[1] < max(profile["call_totals_s"])


@pytest.mark.skipif(native.library(gelu_dwconv.LIBRARY) is None, reason="no C compiler: no fused MLP op to profile")
def test_inference_profile_times_the_fused_path_the_model_runs_and_names_its_parts():
    model = build("pico").eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(image)
        with module_scopes(model), torch.profiler.profile() as prof:
            profiled = model(image)
    assert torch.equal(profiled, expected)  # the same computation, profiled or not
    per_module, per_op = attribute(prof.events())
    # The fused MLP middle ran (profile ranges are not hooks that force the unfused path), and
    # it shows as an operator timed under the dwconv it stands in for; GELU never ran as a module.
    assert per_op["overlock::gelu_dwconv3x3_grn_forward"] > 0
    assert not any(name.endswith("mlp.act") for name in per_module)
    assert any(name.endswith("mlp.dwconv") and t["forward"] > 0 for name, t in per_module.items())
    # The large kernel is folded with its BN in eval, and still timed as the large kernel.
    assert any(name.endswith(".large_kernel") and t["forward"] > 0 for name, t in per_module.items())


def test_profile_ranges_are_observers_that_leave_the_fast_paths_on_but_real_hooks_are_not():
    conv = nn.Conv2d(2, 2, 1)
    assert not hooked(conv)
    handle = conv.register_forward_pre_hook(observer(lambda module, args: None))
    assert not hooked(conv)
    real = conv.register_forward_hook(lambda module, args, output: output * 2)
    assert hooked(conv)
    real.remove()
    handle.remove()
    anywhere = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        assert hooked(conv)  # a global hook sees every module's call
    finally:
        anywhere.remove()
    assert not hooked(conv)


@pytest.mark.skipif(native.library(gelu_dwconv.LIBRARY) is None, reason="no C compiler")
def test_c_kernel_calls_are_named_operators_only_while_a_profiler_runs():
    hidden = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 1, 3, 3)
    with torch.profiler.profile() as prof:
        gelu_dwconv.gelu_dwconv3x3(hidden, weight, None)
    assert "overlock::gelu_dwconv3x3_forward" in {event.name for event in prof.events()}


def test_attribution_sends_backward_time_to_the_module_that_ran_the_forward():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8)))
    x = torch.randn(4, 8)
    with module_scopes(model), torch.profiler.profile() as prof:
        model(x).sum().backward()
    per_module, _ = attribute(prof.events())
    assert per_module["0"]["forward"] > 0 and per_module["0"]["backward"] > 0
    assert per_module["2.0"]["backward"] > 0  # innermost module owns its ops


def test_gpu_profiles_charge_each_operator_its_kernels_device_time():
    """On CUDA an operator's CPU time is only its launch: the profile charges it the device time of
    the kernels it launched, and the kernels are not operators of their own. Events as torch.profiler
    gives them (name, parent, device type, times in microseconds), made up: no GPU here."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from overlock.bench import _SCOPE

    def event(name, parent=None, device=DeviceType.CPU, cpu_us=0.0, device_us=0.0):
        return SimpleNamespace(
            name=name, cpu_parent=parent, device_type=device, sequence_nr=-1,
            cpu_time_total=cpu_us, device_time_total=device_us,
        )  # fmt: skip

    scope = event(_SCOPE + "stem.conv")  # the range module_scopes opens around the module `stem.conv`
    conv = event("aten::conv2d", parent=scope, cpu_us=40.0, device_us=900.0)
    kernel = event("cudnn::conv2d_grouped_direct_kernel", device=DeviceType.CUDA, device_us=900.0)
    per_module, per_op = attribute([scope, conv, kernel], device_time=True)
    assert per_op == {"aten::conv2d": 900e-6} and per_module == {"stem.conv": {"forward": 900e-6, "backward": 0.0}}
    per_module, per_op = attribute([scope, conv, kernel])  # the CPU's clock: the launch
    assert per_op == {"aten::conv2d": 40e-6} and per_module["stem.conv"]["forward"] == 40e-6


def test_deploy_and_inference_run_and_bad_flags_are_clear_errors():
    ok = run("bench", "pico", *SMALL, "--deploy", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["settings"]["deploy"] is True
    bad = run("bench", "pico", *SMALL, "--device", "tpu")
    assert bad.exit_code == 2 and "valid devices are cpu and cuda" in bad.output
    both = run("bench", "pico", *SMALL, "--deploy", "--train")
    assert both.exit_code == 2 and "--deploy with --train" in both.output
    inference = run("bench", "pico", *SMALL, "--grad-checkpoint")
    assert inference.exit_code == 2 and "--grad-checkpoint without --train" in inference.output


def test_spread_of_times():
    stats = spread([3.0, 1.0, 2.0, 10.0])
    assert stats["median_s"] == 2.5 and stats["min_s"] == 1.0 and stats["max_s"] == 10.0 and stats["iqr_s"] > 0


class _Checkpointable(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        self.checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.checkpointing = enable


def test_grad_checkpoint_is_switched_on_where_the_model_has_it_and_refused_where_not():
    model = _Checkpointable()
    settings = BenchSettings(batch_size=2, img_size=16, threads=1, train=True, reps=3, grad_checkpoint=True)
    result = bench(model, settings, num_classes=10)
    assert model.checkpointing and result.images_per_s > 0
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(OverlockError, match="set_grad_checkpointing"):
        bench(plain, settings, num_classes=10)


def test_a_compiler_failure_is_a_clear_error_without_traceback(monkeypatch):
    def broken_compile(model):
        def compiled(*args):
            raise RuntimeError("InductorError: cannot determine truth value of Relational\nlong internal stack")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    result = run("bench", "pico", *SMALL, "--compile")
    assert result.exit_code == 2, result.output
    assert "torch.compile failed (RuntimeError: InductorError" in result.output
    assert "run without --compile" in result.output and "Traceback" not in result.output


def test_saved_tensors_script_reports_what_a_training_forward_keeps():
    """benchmarks/saved_tensors.py (the memory table of issue 10's results): per-module MiB that sum to its total."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "saved_tensors.py"
    done = subprocess.run(
        [sys.executable, str(script), "--preset", "pico", "--img-size", "32", "--top", "100"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.rsplit(maxsplit=1) for line in done.stdout.splitlines()[1:]]
    values = {name.strip(): float(value) for name, value in rows}
    total = values.pop("total")
    assert total > 0 and sum(values.values()) == pytest.approx(total, abs=0.01 * len(values))
    assert "BatchNorm2d" in values and "(outside any module)" not in values


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="this PyTorch has no oneDNN linear")
def test_compare_convnext_can_route_timm_products_as_overlock_routes_its_own(monkeypatch):
    """`compare_convnext.py --timm-products onednn`: inside the wrapped step, F.linear goes to oneDNN
    where `layers.onednn_linear_applies` (tall enough), with F.linear's gradients, and to F.linear
    elsewhere; outside the step F.linear is PyTorch's own again."""
    from overlock.builder import layers

    compare = load_benchmark("compare_convnext")
    routed = []
    onednn = torch.ops.mkldnn._linear_pointwise

    class Spy:
        @staticmethod
        def _linear_pointwise(*args):
            routed.append(args[0].shape[0])
            return onednn(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", Spy)
    monkeypatch.setattr(layers, "ONEDNN_LINEAR_MIN_ROWS", 10)
    linear = nn.Linear(6, 4).eval()
    tall, short = torch.randn(12, 6), torch.randn(5, 6)
    plain = torch.nn.functional.linear
    step = compare.products_through_onednn(lambda: (linear(tall), linear(short), linear(tall.requires_grad_())))
    with torch.no_grad():
        outputs = step()
    assert routed == [12, 12]  # not the short product; under no_grad the input's flag does not matter
    assert torch.nn.functional.linear is plain
    for out, x in zip(outputs, (tall, short, tall), strict=True):
        torch.testing.assert_close(out, plain(x, linear.weight, linear.bias))
    outputs = step()  # with autograd on: oneDNN too, and F.linear's gradients
    assert routed == [12, 12, 12, 12]
    ours = torch.autograd.grad(outputs[2].sum(), (tall, linear.weight, linear.bias))
    assert len(routed) == 5  # the input's gradient, as a oneDNN product
    theirs = torch.autograd.grad(plain(tall, linear.weight, linear.bias).sum(), (tall, linear.weight, linear.bias))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LAYERS_AB = BENCHMARKS / "layers_ab.py"


def test_compare_convnext_says_where_the_triton_depthwise_kernels_beat_cudnn():
    """A GPU report lists the timed choice per depthwise shape (`depthwise.cuda_choices`); the
    table's header counts them. A CPU report, or one recorded before, has no such line."""
    compare = load_benchmark("compare_convnext")
    recorded = BENCHMARKS / "results" / "compare_convnext_nvidia-h100-80gb-hbm3_fp32.json"
    report = json.loads(recorded.read_text())
    assert "Depthwise" not in compare.markdown(report)
    shape = {"dtype": "float32", "shape": [64, 56, 56, 56], "layout": "nchw", "kernel_size": 17, "dilation": 1}
    report["depthwise_cuda"] = [
        {"operation": "conv", **shape, "bias": False, "choice": "triton", "ms": {"pytorch": 2.0, "triton": 0.4}},
        {"operation": "conv", **shape, "bias": True, "choice": "pytorch", "ms": {"pytorch": 0.3, "triton": 0.4}},
        {"operation": "weight_grad", **shape, "choice": "triton", "ms": {"pytorch": 3.0, "triton": 1.0}},
    ]
    line = (
        "Depthwise convolutions: overlock's Triton kernels beat cuDNN in 1 of 2 forward / input-gradient "
        "shapes and 1 of 1 weight-gradient shapes (timed per shape)."
    )
    assert line in compare.markdown(report).splitlines()


def load_benchmark(name: str):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_ab_variants_patch_attributes_that_exist():
    """benchmarks/layers_ab.py puts old formulations back by replacing attributes of the library:
    each one it names must still exist (a renamed helper would otherwise fail only when run), and
    the variant of round 15 gives back what that round's code kept (more maps alive after a
    training forward, the same output)."""
    layers_ab = load_benchmark("layers_ab")
    missing = [
        (name, attr)
        for name, patches in layers_ab.OLD.items()
        for owner, attr, _ in patches
        if not hasattr(owner, attr)
    ]
    assert missing == []

    model = build("pico").train()
    x = torch.randn(2, 3, 128, 128)
    live = LiveMemory()
    if not live.available:
        pytest.skip("needs glibc's mallinfo2")
    live.measure(lambda: model(x))  # (first-call work out of the way)
    new = live.measure(lambda: model(x))
    patches = layers_ab.OLD["maps kept as before round 15"]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, value in patches:
            setattr(owner, attr, value)
        old = live.measure(lambda: model(x))
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)
    assert old > 1.1 * new  # pico at 128x128: about 7.3 against 6.1 MiB


def test_layers_ab_half_batch_mlp_computes_what_the_mlp_does():
    """The round-16 alternative that layers_ab measures (the MLP of a large map on two half
    batches) must compute the same training step, or its memory would not be comparable: the same
    outputs and gradients (float rounding aside), and it really splits pico's 32x32 maps."""
    layers_ab = load_benchmark("layers_ab")
    torch.manual_seed(0)
    model = build("pico").train()
    x = torch.randn(4, 3, 128, 128)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)["main"]
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    state = {k: v.clone() for k, v in model.state_dict().items()}  # (BN running statistics move)
    plain_out, plain_grads = step()
    model.load_state_dict(state)
    batches = []
    original = layers_ab.KEPT["ConvMLP.forward"]

    def counting(self, x, input_recipe=None):
        batches.append(x.shape[0])
        return original(self, x, input_recipe)

    saved = ConvMLP.forward
    try:
        layers_ab.KEPT["ConvMLP.forward"] = counting
        ConvMLP.forward = layers_ab.mlp_in_half_batches
        split_out, split_grads = step()
    finally:
        ConvMLP.forward = saved
        layers_ab.KEPT["ConvMLP.forward"] = original
    assert 2 in batches and 4 in batches  # halves on the 32x32 maps, whole batches on smaller ones
    torch.testing.assert_close(split_out, plain_out, rtol=1e-4, atol=1e-5)
    for split, plain in zip(split_grads, plain_grads, strict=True):
        torch.testing.assert_close(split, plain, rtol=1e-3, atol=1e-5)


def test_layers_ab_memory_mode_measures_variants_in_fresh_processes():
    """`--memory N`: each variant's training-step memory from its own processes. Remaking fc1's
    output on 24x24 maps too (pico at 96 px; the default remakes it from 28x28 up) must read fewer
    tensors alive than the default: 1.41 against 1.55 MiB per image, where 64 px read 0.85 / 0.91."""
    if not LiveMemory().available:
        pytest.skip("needs glibc's mallinfo2")
    variant = "fc1 outputs remade from 14x14 up"
    command = [sys.executable, str(LAYERS_AB), "--preset", "pico", "--img-size", "96", "--batch-size", "2"]
    done = subprocess.run([*command, "--memory", "1", "--only", variant], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("resident")[0].strip(): line for line in done.stdout.splitlines() if "old/new" in line}
    assert set(rows) == {"new", variant}

    def live(row: str) -> float:
        return float(row.split("live")[1].split()[0])

    assert live(rows[variant]) < live(rows["new"])
