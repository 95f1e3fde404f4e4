"""The Triton depthwise-convolution kernels (kernels/triton_depthwise.py) against F.conv2d and its
autograd, and the CUDA dispatcher that times them against PyTorch's convolution on first use.

On CUDA when there is one, otherwise on CPU through Triton's interpreter (small shapes: the
interpreter runs every program in Python). The dispatcher's timing needs CUDA events; its choice
logic is tested here with a stand-in clock, and the whole CUDA path in tests/test_cuda.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from overlock.kernels import depthwise

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    module = depthwise._triton_kernels()
    if module is None:
        pytest.skip("triton_depthwise does not import here")
    if DEVICE == "cpu" and not module.INTERPRETED:
        pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set in this process")
    return module


def small_tiles(kernels, monkeypatch) -> None:
    """GPU-like small tiles in the interpreter: several row groups per dilation residue, several column
    and channel blocks, partial blocks at every edge."""
    monkeypatch.setattr(kernels, "forward_config", lambda *shape: {"ROWS": 2, "BLOCK_W": 4, "BLOCK_C": 4})


def reference(x, weight, bias, dilation, grad):
    """Output and the three gradients of the same-padded depthwise conv, by F.conv2d's autograd in float64."""
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    b64 = bias.double().requires_grad_() if bias is not None else None
    padding = dilation * (weight.shape[-1] - 1) // 2
    out = F.conv2d(x64, w64, b64, padding=padding, dilation=dilation, groups=x.shape[1])
    out.backward(grad.double())
    return out.detach(), x64.grad, w64.grad, (b64.grad if b64 is not None else None)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


# (batch, channels, height, width, kernel, dilation): DilatedRepConv's large kernels and dilated
# branches at small maps; a kernel larger than the map; a channel count off the block size.
SHAPES = [(2, 5, 9, 11, 3, 1), (1, 6, 10, 7, 7, 2), (1, 3, 5, 6, 13, 1), (1, 4, 11, 9, 3, 3), (2, 9, 6, 6, 5, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}K{}d{}".format(*s))
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhwc, small tiles"])
def test_forward_input_and_weight_gradients_match_conv2d(kernels, monkeypatch, shape, layout):
    if "small tiles" in layout:
        small_tiles(kernels, monkeypatch)
    batch, channels, height, width, kernel_size, dilation = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(batch, channels, height, width, generator=gen)
    weight = torch.randn(channels, 1, kernel_size, kernel_size, generator=gen)
    bias = torch.randn(channels, generator=gen)
    grad = torch.randn(batch, channels, height, width, generator=gen)
    out, grad_x, grad_w, _ = reference(x, weight, bias, dilation, grad)
    x, weight, bias, grad = (t.to(DEVICE) for t in (x, weight, bias, grad))
    if layout.startswith("nhwc"):
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))

    got = kernels.forward(x, weight, bias, dilation)
    assert got.is_contiguous(memory_format=torch.channels_last) == layout.startswith("nhwc")  # x's layout kept
    assert relative_error(got.cpu(), out) < 1e-5
    # the input gradient is the forward of the output gradient with the kernel mirrored
    assert relative_error(kernels.forward(grad, weight.flip(-1, -2), None, dilation).cpu(), grad_x) < 1e-5
    got_w = kernels.weight_grad(x, grad, kernel_size, dilation)
    assert got_w.shape == weight.shape and got_w.dtype == torch.float32
    assert relative_error(got_w.cpu(), grad_w) < 1e-5


def test_half_precision_inputs_accumulate_in_float32(kernels):
    """bfloat16 in, bfloat16 out; the sums in float32: the error is the output's last place (the
    interpreter truncates where a GPU rounds), not 169 products' rounding (a bfloat16 accumulator
    would be off by several units of its last place)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 8, generator=gen).to(DEVICE, torch.bfloat16)
    weight = torch.randn(6, 1, 13, 13, generator=gen).to(DEVICE, torch.bfloat16)
    grad = torch.randn(2, 6, 9, 8, generator=gen).to(DEVICE, torch.bfloat16)
    out, _, grad_w, _ = reference(x.cpu().float(), weight.cpu().float(), None, 1, grad.cpu().float())
    got = kernels.forward(x, weight, None, 1)
    assert got.dtype == torch.bfloat16
    assert relative_error(got.float().cpu(), out) < 2**-7  # one unit in bfloat16's last place
    assert relative_error(kernels.weight_grad(x, grad, 13, 1).cpu(), grad_w) < 1e-5


def test_weight_gradient_sums_every_split_of_the_rows(kernels, monkeypatch):
    """The rows are shared out among programs in strided splits; with more splits than rows, and with
    one, the sum is the same."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, 7, generator=gen).to(DEVICE)
    grad = torch.randn(3, 4, 5, 7, generator=gen).to(DEVICE)
    expected = reference(x.cpu(), torch.zeros(4, 1, 5, 5), None, 2, grad.cpu())[2]
    results = []
    for splits in (1, 4, 15):
        monkeypatch.setattr(kernels, "_row_splits", lambda rows, *_, n=splits: min(n, rows))
        results.append(kernels.weight_grad(x, grad, 5, 2).cpu())
    for got in results:
        assert relative_error(got, expected) < 1e-5


def test_kernels_compile_for_h100_without_spilling(kernels):
    """The interpreter checks numbers, not compilation: compile both kernels in every autotuning
    config for sm_90 with ptxas (no GPU needed) at the presets' largest-kernel maps (XT's 17x17 at
    56x56, T's 13x13 on 256 channels, the 7x7 on 7x7 maps), in float32 and bfloat16."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    compiled = []
    for dtype in ("float32", "bfloat16"):
        command = [sys.executable, "-m", "overlock.kernels.triton_aot", "56:17:56", "14:13:256", "7:7:336"]
        done = subprocess.run(command + ["--depthwise", "--dtype", dtype], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        compiled += [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted({c["kernel"] for c in compiled}) == ["_depthwise_forward", "_depthwise_weight_grad"]
    variants = len(kernels.FORWARD_TILES) + len(kernels.WEIGHT_GRAD_TILES)  # every config the autotuner may pick
    assert len(compiled) == 2 * 3 * variants
    assert not [c for c in compiled if c["spill_bytes"] > 0]
    assert max(c["registers"] for c in compiled) <= 128  # at least 4 programs of 4 warps per SM


def test_the_autotuner_times_only_the_tiles_that_suit_the_maps_layout(kernels):
    """The first call of a shape compiles and times every tile it keeps: in channels_last the block
    of channels, in NCHW the block of columns, must cover the contiguous dimension (up to 32) and
    waste no more than half its lanes; a map in neither layout keeps all of them."""
    configs = kernels._forward_configs()

    def kept(height, width, channels, layout):
        x = torch.empty(2, channels, height, width, device="meta")
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = x.transpose(2, 3)
        stride = dict(zip(("sx_b", "sx_c", "sx_h", "sx_w"), x.stride(), strict=True))
        named = {"H": height, "W": width, "C": channels, **stride}
        return [
            tuple(c.kwargs[f] for f in ("ROWS", "BLOCK_W", "BLOCK_C"))
            for c in kernels.forward_tiles_for(configs, named)
        ]

    assert kept(56, 56, 56, "nhwc") == [(8, 16, 32), (4, 8, 64), (8, 32, 32)]
    assert kept(7, 7, 336, "nhwc") == [(8, 16, 32), (4, 8, 64), (8, 32, 32)]
    assert kept(56, 56, 56, "nchw") == [(8, 32, 16), (4, 64, 8), (8, 32, 32)]
    assert kept(14, 14, 256, "nchw") == [(8, 16, 32), (8, 32, 16), (16, 16, 16), (8, 32, 32)]
    assert kept(7, 7, 336, "nchw") == [(8, 16, 32), (16, 16, 16), (4, 8, 64)]
    assert len(kept(8, 9, 16, "strided")) == len(configs)
    for height, width, channels in ((1, 1, 1), (3, 2, 4), (5, 300, 1000)):  # never none left
        for layout in ("nchw", "nhwc"):
            assert kept(height, width, channels, layout), (height, width, channels, layout)


def test_the_tuned_launcher_times_the_kept_tiles_briefly_and_runs_the_fastest(kernels, monkeypatch):
    """Triton's autotuner as the GPU runs it (in the interpreter on a CPU, where Triton's own timing
    has no driver): a stand-in clock, which ranks the tiles in the order they are timed, takes the
    place of Triton's timing."""
    import triton
    import triton.testing

    timed = []

    def stand_in(kernel_call, warmup, rep, quantiles):
        timed.append((warmup, rep))
        kernel_call()
        return [float(len(timed))] * len(quantiles)  # the first tile timed is the fastest

    monkeypatch.setattr(triton.testing, "do_bench", stand_in)
    monkeypatch.setattr(kernels._forward_tuned, "cache", {})
    monkeypatch.setattr(kernels._forward_tuned, "cache_results", False)  # on a GPU: no stand-in times on disk
    x = torch.randn(2, 6, 9, 7, device=DEVICE)  # NCHW, 7 columns: three tiles kept
    weight = torch.randn(6, 1, 3, 3, device=DEVICE)
    out = torch.empty_like(x)
    arguments = (x, weight, weight, out, 9, 7, 6, *x.stride(), *out.stride())

    def grid(tiles):
        return triton.cdiv(9, tiles["ROWS"]) * triton.cdiv(7, tiles["BLOCK_W"]), 2, triton.cdiv(6, tiles["BLOCK_C"])

    kernels._forward_tuned[grid](*arguments, K=3, DILATION=1, HAS_BIAS=False)
    assert timed == [(5, 20)] * 3
    assert kernels._forward_tuned.best_config.kwargs == {"ROWS": 8, "BLOCK_W": 16, "BLOCK_C": 32}
    assert torch.allclose(out, F.conv2d(x, weight, padding=1, groups=6), atol=1e-5)
    assert kernels._forward_tuned.early_config_prune is kernels.forward_tiles_for
    assert kernels._weight_grad_tuned._do_bench is kernels._quick_bench


@pytest.mark.parametrize("setting", ["pytorch", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_the_cuda_operator_and_its_gradients_match_conv2d(kernels, monkeypatch, setting, layout):
    """`overlock::depthwise_conv2d`, the op CUDA models run (eagerly and under torch.compile), with each
    backend forced: its output in the input's layout, and its autograd formula (mirrored-kernel input
    gradient, weight and bias gradients). The op's implementation does not look at the device, so it
    runs here too."""
    monkeypatch.setenv(depthwise.CUDA_BACKEND_VARIABLE, setting)
    gen = torch.Generator().manual_seed(5)
    x, grad = torch.randn(2, 5, 8, 9, generator=gen), torch.randn(2, 5, 8, 9, generator=gen)
    weight, bias = torch.randn(5, 1, 5, 5, generator=gen), torch.randn(5, generator=gen)
    out, grad_x, grad_w, grad_b = reference(x, weight, bias, 2, grad)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, weight, bias)]
    image = leaves[0].contiguous(memory_format=torch.channels_last) if layout == "nhwc" else leaves[0]
    got = depthwise.depthwise_conv2d_op(image, *leaves[1:], 2)
    assert got.stride() == torch.empty_like(image).stride()  # what the op's fake promises torch.compile
    got.backward(grad.to(DEVICE))
    assert relative_error(got.detach().cpu(), out) < 1e-5
    for leaf, expected in zip(leaves, (grad_x, grad_w, grad_b), strict=True):
        assert leaf.grad.dtype == torch.float32 and relative_error(leaf.grad.cpu(), expected) < 1e-5


def test_the_cuda_operator_passes_opcheck(monkeypatch):
    """Schema, fake (meta) implementation, autograd registration and AOT tracing, as torch.compile
    needs them (torch.library.opcheck)."""
    monkeypatch.setenv(depthwise.CUDA_BACKEND_VARIABLE, "pytorch")
    gen = torch.Generator().manual_seed(6)
    args = (torch.randn(2, 3, 7, 6, generator=gen).requires_grad_(), torch.randn(3, 1, 3, 3, generator=gen), None, 3)
    torch.library.opcheck(depthwise.depthwise_conv2d_op, args)
    grad = torch.randn(2, 3, 7, 6, generator=gen)
    torch.library.opcheck(depthwise.depthwise_weight_grad_op, (args[0].detach(), grad, 3, 3))


class StandInClock:
    """Device times by candidate name, for the dispatcher's choice (CUDA events need a GPU)."""

    def __init__(self, times: dict[str, float]):
        self.times, self.calls = times, []

    def __call__(self, run):
        name = run()
        self.calls.append(name)
        return self.times[name]


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(depthwise, "_cuda_choices", {})
    monkeypatch.setattr(depthwise, "_cuda_timings", {})
    monkeypatch.delenv(depthwise.CUDA_BACKEND_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def install(times):
        stand_in = StandInClock(times)
        monkeypatch.setattr(depthwise, "_median_device_ms", stand_in)
        return stand_in

    return install


def test_the_dispatcher_times_each_candidate_once_per_key_and_runs_the_fastest(clock):
    stand_in = clock({"pytorch": 2.0, "triton": 0.5})
    candidates = {"pytorch": lambda: "pytorch", "triton": lambda: "triton"}
    assert depthwise._cuda_pick(("conv", 0, 17), candidates) == "triton"
    assert depthwise._cuda_pick(("conv", 0, 17), candidates) == "triton"
    assert stand_in.calls == ["pytorch", "triton"]  # timed once; the second call reads the cache
    stand_in.times = {"pytorch": 0.1, "triton": 0.5}
    assert depthwise._cuda_pick(("conv", 0, 3), candidates) == "pytorch"  # another shape, its own choice
    assert depthwise._cuda_choices == {("conv", 0, 17): "triton", ("conv", 0, 3): "pytorch"}


def test_the_dispatchers_choices_are_listed_with_their_times(clock):
    """`cuda_choices()`: what a GPU benchmark records beside its table, one record per key."""
    stand_in = clock({"pytorch": 2.0, "triton": 0.5})
    x = torch.empty(8, 56, 56, 56).contiguous(memory_format=torch.channels_last)
    candidates = {"pytorch": lambda: "pytorch", "triton": lambda: "triton"}
    depthwise._cuda_pick(depthwise._cuda_key("conv", x, 17, 1, True), candidates)
    stand_in.times = {"pytorch": 0.1, "triton": 0.5}
    depthwise._cuda_pick(depthwise._cuda_key("weight_grad", x.to(torch.bfloat16), 3, 4), candidates)
    depthwise._cuda_pick(depthwise._cuda_key("conv", x, 5, 1, False), {"pytorch": lambda: "pytorch"})  # no choice
    assert depthwise.cuda_choices() == [
        {
            "operation": "conv",
            "dtype": "float32",
            "shape": [8, 56, 56, 56],
            "layout": "nhwc",
            "kernel_size": 17,
            "dilation": 1,
            "bias": True,
            "choice": "triton",
            "ms": {"pytorch": 2.0, "triton": 0.5},
        },
        {
            "operation": "weight_grad",
            "dtype": "bfloat16",
            "shape": [8, 56, 56, 56],
            "layout": "nhwc",
            "kernel_size": 3,
            "dilation": 4,
            "choice": "pytorch",
            "ms": {"pytorch": 0.1, "triton": 0.5},
        },
    ]


def test_the_setting_skips_the_timing_and_a_bad_one_is_named(clock, monkeypatch):
    stand_in = clock({"pytorch": 2.0, "triton": 0.5})
    candidates = {"pytorch": lambda: "pytorch", "triton": lambda: "triton"}
    monkeypatch.setenv(depthwise.CUDA_BACKEND_VARIABLE, "pytorch")
    assert depthwise._cuda_pick(("conv",), candidates) == "pytorch"
    monkeypatch.setenv(depthwise.CUDA_BACKEND_VARIABLE, "triton")
    assert depthwise._cuda_pick(("conv",), candidates) == "triton"
    assert depthwise._cuda_pick(("conv",), {"pytorch": lambda: "pytorch"}) == "pytorch"  # where Triton cannot run
    assert stand_in.calls == [] and depthwise._cuda_choices == {}
    monkeypatch.setenv(depthwise.CUDA_BACKEND_VARIABLE, "cudnn")
    with pytest.raises(ValueError, match="OVERLOCK_DEPTHWISE_CUDA='cudnn': valid values are measure, pytorch, triton"):
        depthwise._cuda_pick(("conv",), candidates)


def test_a_triton_kernel_that_fails_here_is_left_out_with_a_warning(clock):
    """A Triton or driver version that cannot compile the kernel costs speed, not the run."""
    stand_in = clock({"pytorch": 2.0})

    def broken():
        raise RuntimeError("PTX compilation failed")

    with pytest.warns(RuntimeWarning, match="the triton depthwise kernel failed .*PTX compilation failed"):
        assert depthwise._cuda_pick(("conv",), {"pytorch": lambda: "pytorch", "triton": broken}) == "pytorch"
    assert stand_in.calls == ["pytorch"] and depthwise._cuda_choices == {("conv",): "pytorch"}


def test_no_timing_inside_a_cuda_graph_capture(clock, monkeypatch):
    stand_in = clock({"pytorch": 2.0, "triton": 0.5})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    candidates = {"pytorch": lambda: "pytorch", "triton": lambda: "triton"}
    assert depthwise._cuda_pick(("conv",), candidates) == "pytorch"
    assert stand_in.calls == [] and depthwise._cuda_choices == {}  # decided at the next eager call
