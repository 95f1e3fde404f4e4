"""The models on a CUDA device, where the Triton ContMix kernels and PyTorch's GPU ops run instead of
the CPU paths every other test exercises: the pico goldens, CPU/GPU agreement of every preset-like
and paper spec (forward and gradients), deploy equivalence, gradient checkpointing, bfloat16
autocast and torch.compile.

Skipped without CUDA (CI has no GPU); `benchmarks/gpu_session.sh` runs it on a lent GPU. TF32 is
off in every test, so float32 on the GPU is float32 and the CPU tolerances (1e-4 of the largest
logit) hold.
"""

from __future__ import annotations

import copy

import pytest
import torch

from overlock.archspec.paper import paper_rows
from overlock.bench import _loss
from overlock.builder import build, load_official
from overlock.kernels.ops import resolve_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
PAPER_SPECS = [row.path for row in paper_rows("table6") + paper_rows("table7")]


@pytest.fixture(autouse=True)
def exact_float32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest absolute expected value (the goldens' rule)."""
    expected = expected.detach().float().cpu()
    return ((got.detach().float().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def test_auto_backend_is_triton_on_cuda():
    assert resolve_backend("auto", (torch.zeros(1, device=CUDA),)) == "triton"


@pytest.mark.parametrize("case", ["square224", "small160x192"])
def test_pico_reproduces_the_reference_logits_on_cuda(reference_dir, case):
    golden = torch.load(reference_dir / "golden" / "pico.expected.pt", weights_only=True)["cases"][case]
    state = torch.load(reference_dir / "golden" / "pico.official_state_dict.pt", weights_only=True)
    image = golden["input"].to(CUDA)
    with torch.no_grad():
        model = load_official(build("pico"), state).to(CUDA).eval()
        assert relative_error(model(image), golden["eval_logits"]) <= 1e-4
        model.train()
        out = model(image)
        assert relative_error(out["main"], golden["train_main"]) <= 1e-4
        assert relative_error(out["aux"], golden["train_aux"]) <= 1e-4
        deployed = load_official(build("pico"), state).reparameterize().to(CUDA).eval()
        assert relative_error(deployed(image), golden["eval_logits"]) <= 1e-4


def gradients_on(model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, forward=None) -> dict:
    """{parameter name: gradient on the CPU} of one loss through `forward` (default: the model itself)."""
    model.zero_grad(set_to_none=True)
    _loss((model if forward is None else forward)(image), target).backward()
    return {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}


def gradient_errors(got: dict, expected: dict) -> dict:
    """{parameter name: largest difference of its gradient from `expected`, relative to its largest
    expected entry}. A parameter whose gradient is zero but for rounding (a bias before a
    training-mode BN or another normalisation) is measured against 1e-3 of the model's largest
    gradient instead: on its own scale, rounding noise reads as a 200% error."""
    assert got.keys() == expected.keys()
    floor = 1e-3 * max(g.abs().max().item() for g in expected.values())
    return {
        name: (got[name].double() - expected[name].double()).abs().max().item()
        / max(expected[name].abs().max().item(), floor)
        for name in expected
    }


def assert_same_gradients(got: dict, expected: dict, tolerance: float, rounding: dict | None = None) -> None:
    """Each gradient within `tolerance` of `expected` (`gradient_errors`' measure). With `rounding`
    (another float32 computation of the same gradients: the CPU's, or a second run of the same code),
    a parameter may also be off by up to 10x as much as that one is: the gradient of a bias before a
    training-mode BN is zero but for rounding, and float32 rounding alone puts it 1e-3 to 3e-3 (of the
    floor) from float64 (Table 7's projection biases before the test bed's BN; the same noise between
    two CUDA runs, whose atomics add in a different order each time). A wrong gradient is off by
    orders of magnitude more."""
    errors = gradient_errors(got, expected)
    allowed = dict.fromkeys(errors, tolerance)
    if rounding is not None:
        allowed = {name: max(tolerance, 10 * error) for name, error in gradient_errors(rounding, expected).items()}
    worst = max(errors, key=lambda name: errors[name] / allowed[name])
    assert errors[worst] <= allowed[worst], f"{worst}: {errors[worst]:.2e} (allowed {allowed[worst]:.2e})"


@pytest.mark.parametrize("spec", ["xt", "pico", *PAPER_SPECS], ids=lambda s: getattr(s, "stem", s))
def test_cuda_forward_and_gradients_match_the_cpu(spec, randomize_batchnorm):
    """Eval logits and one training step's gradients, CPU against CUDA, for the XT preset, pico and
    every paper spec (Table 6 topologies, Table 7 token mixers). 96x80 makes the /32 Focus maps 3x2,
    smaller than every ContMix kernel, so the resize path runs too."""
    torch.manual_seed(0)
    model = build(spec, overrides=["head.num_classes=10"])
    randomize_batchnorm(model)
    gen = torch.Generator().manual_seed(1)
    image, target = torch.randn(2, 3, 96, 80, generator=gen), torch.randint(0, 10, (2,), generator=gen)
    on_cuda = copy.deepcopy(model).to(CUDA)
    with torch.no_grad():
        expected = model.eval()(image)
        assert relative_error(on_cuda.eval()(image.to(CUDA)), expected) <= 1e-4
    # Against float64 on the CPU, with the CPU's float32 gradients as the measure of rounding.
    exact = gradients_on(copy.deepcopy(model).double().train(), image.double(), target)
    cpu_grads = gradients_on(model.train(), image, target)
    got_grads = gradients_on(on_cuda.train(), image.to(CUDA), target.to(CUDA))
    assert_same_gradients(got_grads, exact, 1e-3, rounding=cpu_grads)


@pytest.mark.parametrize("setting", ["pytorch", "triton", "measure"])
@pytest.mark.parametrize("kernel_size,dilation,channels_last", [(17, 1, False), (7, 2, True), (3, 3, False)])
def test_depthwise_operator_on_cuda_matches_conv2d(monkeypatch, setting, kernel_size, dilation, channels_last):
    """kernels.depthwise on CUDA, each backend forced and the timed choice: output and the three
    gradients against F.conv2d's autograd on the CPU in float64."""
    from overlock.kernels import depthwise

    monkeypatch.setenv(depthwise.CUDA_BACKEND_VARIABLE, setting)
    monkeypatch.setattr(depthwise, "_cuda_choices", {})
    gen = torch.Generator().manual_seed(kernel_size)
    x = torch.randn(4, 24, 30, 28, generator=gen)
    weight, bias = torch.randn(24, 1, kernel_size, kernel_size, generator=gen), torch.randn(24, generator=gen)
    grad = torch.randn(4, 24, 30, 28, generator=gen)
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    padding = dilation * (kernel_size - 1) // 2
    expected = torch.nn.functional.conv2d(*leaves, padding=padding, dilation=dilation, groups=24)
    expected.backward(grad.double())
    on_cuda = [t.to(CUDA).requires_grad_() for t in (x, weight, bias)]
    image = on_cuda[0].contiguous(memory_format=torch.channels_last) if channels_last else on_cuda[0]
    out = depthwise.depthwise_conv2d(image, on_cuda[1], on_cuda[2], dilation=dilation)
    out.backward(grad.to(CUDA))
    assert relative_error(out, expected) <= 1e-5
    for got, leaf in zip(on_cuda, leaves, strict=True):
        assert relative_error(got.grad, leaf.grad) <= 1e-5
    if setting == "measure":
        # three choices: the forward (with bias), the input gradient (a forward without) and the weight gradient
        assert sorted(key[0] for key in depthwise._cuda_choices) == ["conv", "conv", "weight_grad"]
        assert set(depthwise._cuda_choices.values()) <= {"pytorch", "triton"}
    with torch.autocast("cuda", dtype=torch.bfloat16):  # cast as F.conv2d is under autocast
        low = depthwise.depthwise_conv2d(image, on_cuda[1], on_cuda[2], dilation=dilation)
    assert low.dtype == torch.bfloat16 and relative_error(low, expected) <= 0.02


def test_bilinear_resize_on_cuda_takes_the_channels_last_kernel_and_returns_the_same_map():
    from overlock.builder.layers import resize_bilinear

    x = torch.randn(8, 84, 7, 7, device=CUDA)
    for size in ((14, 14), (3, 2), (7, 7)):
        got = resize_bilinear(x, size)
        assert got.is_contiguous()  # back in the input's layout
        torch.testing.assert_close(
            got, torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False), rtol=0, atol=1e-6
        )


def test_deploy_form_equals_training_form_on_cuda(randomize_batchnorm):
    torch.manual_seed(0)
    model = build("t")
    randomize_batchnorm(model)
    model = model.to(CUDA).eval()
    image = torch.randn(2, 3, 224, 224, device=CUDA)
    with torch.no_grad():
        expected = model(image)
        assert relative_error(model.reparameterize()(image), expected) <= 1e-4


def test_grad_checkpointing_on_cuda_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build("pico").to(CUDA).train()
    image, target = torch.randn(2, 3, 128, 128, device=CUDA), torch.randint(0, 10, (2,), device=CUDA)
    plain = gradients_on(model, image, target)
    again = gradients_on(model, image, target)  # what CUDA's unordered sums change between two runs
    model.set_grad_checkpointing(True)
    assert_same_gradients(gradients_on(model, image, target), plain, 1e-5, rounding=again)


def test_bfloat16_autocast_step_is_finite_and_close_to_float32():
    torch.manual_seed(0)
    model = build("xt").to(CUDA).train()
    image, target = torch.randn(4, 3, 224, 224, device=CUDA), torch.randint(0, 1000, (4,), device=CUDA)
    with torch.no_grad():
        expected = model.eval()(image)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(image)
    assert relative_error(low, expected) <= 0.05
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = _loss(model(image), target)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torch_compile_on_cuda_matches_eager():
    torch.manual_seed(0)
    model = build("pico").to(CUDA)
    image, target = torch.randn(2, 3, 128, 128, device=CUDA), torch.randint(0, 10, (2,), device=CUDA)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert relative_error(compiled.eval()(image), model.eval()(image)) <= 1e-4
    exact = gradients_on(copy.deepcopy(model).cpu().double().train(), image.cpu().double(), target.cpu())
    eager = gradients_on(model.train(), image, target)
    assert_same_gradients(gradients_on(model, image, target, forward=compiled), exact, 1e-3, rounding=eager)
