"""Export: exact region pooling and mixing sizes for symbolic shapes, and exported files that compute
what the eager model computes (onnxruntime, torch.export, TorchScript), through the library and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from overlock import archspec
from overlock.builder import build, load_official
from overlock.builder.blocks import ContMix
from overlock.builder.layers import RegionPool, adaptive_avg_pool
from overlock.cli import app
from overlock.export import (
    TOLERANCE,
    check_sizes,
    compare,
    export_model,
    load_exported_program,
    load_model,
    load_torchscript,
)

runner = CliRunner()


@pytest.mark.parametrize("bins", [1, 3, 7])
def test_exportable_pooling_equals_adaptive_avg_pool(bins):
    torch.manual_seed(0)
    for height, width in [(7, 7), (13, 9), (1, 5), (40, 23), (6, 14)]:
        x = torch.randn(2, 3, height, width)
        expected = F.adaptive_avg_pool2d(x, bins)
        assert (adaptive_avg_pool(x, bins, bins) - expected).abs().max().item() <= 1e-6
    x = torch.randn(1, 2, 5, 45)
    assert torch.allclose(adaptive_avg_pool(x, 4, 17), F.adaptive_avg_pool2d(x, (4, 17)), atol=1e-6)


def test_region_pool_holds_no_parameters_and_exports_for_every_size():
    pool = RegionPool(7)
    assert not list(pool.parameters()) and not pool.state_dict()
    dims = {2: torch.export.Dim.DYNAMIC(min=2, max=512), 3: torch.export.Dim.DYNAMIC(min=2, max=512)}
    program = torch.export.export(pool, (torch.randn(1, 4, 20, 30),), dynamic_shapes={"x": dims})
    for size in [(9, 31), (3, 4), (64, 64)]:
        x = torch.randn(1, 4, *size)
        assert (program.module()(x) - F.adaptive_avg_pool2d(x, 7)).abs().max().item() <= 1e-6


def _reference_mixing_size(k: int, height: int, width: int) -> tuple[int, int]:
    """The reference implementation's formula, as written there."""
    if min(height, width) >= k:
        return height, width
    return (k, int(k / height * width)) if height < width else (int(k / width * height), k)


@pytest.mark.parametrize("kernel_size", [3, 5, 7, 13])
def test_branch_free_mixing_size_equals_the_reference_formula(kernel_size):
    contmix = ContMix.__new__(ContMix)
    contmix.kernel_size = kernel_size
    for height in range(1, 50):
        for width in range(1, 50):
            assert contmix.mixing_size(height, width) == _reference_mixing_size(kernel_size, height, width)
    assert contmix.mixing_size(5, 45) == _reference_mixing_size(kernel_size, 5, 45)  # float truncation case


@pytest.mark.parametrize("kernel_size", [3, 7, 13])
def test_mixing_size_on_traced_sizes_equals_the_reference_formula(kernel_size):
    """A size-generic jit trace hands ContMix its sizes as 0-dim int64 tensors (TorchScript export)."""
    contmix = ContMix.__new__(ContMix)
    contmix.kernel_size = kernel_size
    for height in range(1, 40):
        for width in [*range(1, 40, 3), 45]:
            got = contmix.mixing_size(torch.tensor(height), torch.tensor(width))
            assert tuple(int(v) for v in got) == _reference_mixing_size(kernel_size, height, width), (height, width)


def test_check_sizes_cover_non_square_and_small_focus_maps():
    sizes = check_sizes((224, 224), True, kernel_size=13)
    assert sizes[0] == (224, 224) and any(h != w for h, w in sizes)
    assert any(min(h, w) // 32 < 13 for h, w in sizes) and min(min(s) for s in sizes) >= 96


@pytest.fixture(scope="module")
def pico_trained(reference_dir):
    """pico with the published-layout weights of the goldens (so the outputs are not near zero)."""
    state = torch.load(reference_dir / "golden" / "pico.official_state_dict.pt", weights_only=True)
    return load_official(build("pico"), state).eval()


def test_onnx_export_matches_pytorch_at_other_sizes(pico_trained, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is optional (pip install 'overlock[onnx]')")
    pytest.importorskip("onnxscript")
    report = export_model(
        pico_trained, tmp_path / "pico.onnx", "onnx", (128, 160), dynamic_batch=True, dynamic_size=True
    )
    assert report.skipped_check is None and len(report.checks) == 4
    assert report.ok, [(c.shape, c.relative) for c in report.checks]
    shapes = [c.shape for c in report.checks]
    assert shapes[0] == (2, 3, 128, 160) and any(s[2] > 160 for s in shapes[1:])
    assert all(c.relative <= TOLERANCE for c in report.checks)


def test_exported_program_keeps_the_custom_op_and_reloads(pico_trained, tmp_path):
    report = export_model(pico_trained, tmp_path / "pico.pt2", "exported-program", (96, 128))
    assert report.ok and report.checks[0].relative <= TOLERANCE
    program = load_exported_program(tmp_path / "pico.pt2")
    calls = [node for node in program.graph.nodes if str(node.target) == "overlock.contmix.default"]
    assert calls and all(node.args[-1] == "auto" for node in calls)  # picks the backend where it runs
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), pico_trained(x), rtol=1e-4, atol=1e-5)


def test_torchscript_trace_matches_at_the_exported_size(pico_trained, tmp_path):
    report = export_model(pico_trained, tmp_path / "pico.ts", "torchscript", (64, 96))
    assert report.ok and [c.shape for c in report.checks] == [(1, 3, 64, 96)]


def test_dynamic_torchscript_serves_other_sizes_and_batches(pico_trained, tmp_path):
    """Traced once at 224 px, batch 2; run at non-square sizes, another batch and small Focus-Net maps."""
    report = export_model(
        pico_trained, tmp_path / "pico.ts", "torchscript", (224, 224), dynamic_batch=True, dynamic_size=True
    )
    assert report.ok and len(report.checks) == 4, [(c.shape, c.relative) for c in report.checks]
    scripted = load_torchscript(tmp_path / "pico.ts")
    torch.manual_seed(1)
    for shape in [(3, 3, 256, 288), (1, 3, 96, 160), (2, 3, 33, 47)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected, got = pico_trained(x), scripted(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= TOLERANCE * expected.abs().max().item(), shape


def test_a_pyramid_spec_exports_and_checks_at_other_sizes(tmp_path):
    """Pyramids have no Focus-Net: the small-map check size comes from the ContMix kernels there are."""
    torch.manual_seed(0)
    shrink = [f"stages.{i}.depth=1" for i in range(4)] + ["stages.2.width=128", "stages.3.width=128"]
    model = build(archspec.load(Path(__file__).resolve().parents[1] / "specs/paper/table7/contmix.yaml", shrink)).eval()
    report = export_model(model, tmp_path / "p.ts", "torchscript", (64, 64), dynamic_size=True)
    assert report.ok and len(report.checks) == 4, [(c.shape, c.relative, c.error) for c in report.checks]
    assert (192, 256) in [c.shape[2:] for c in report.checks]  # /32 maps 6x8 < kernel 7: the resize path


def test_plain_torchscript_trace_is_frozen_at_its_size(pico_trained, tmp_path):
    """Without --dynamic-size the trace holds the sizes as constants: another size fails, loudly."""
    export_model(pico_trained, tmp_path / "pico.ts", "torchscript", (224, 224))
    scripted = load_torchscript(tmp_path / "pico.ts")
    with pytest.raises(RuntimeError), torch.no_grad():
        scripted(torch.randn(1, 3, 256, 288))


def test_a_file_that_cannot_run_at_a_checked_size_is_reported_not_raised(pico_trained):
    def frozen(x):
        raise RuntimeError(
            "The following operation failed\nTraceback ...\nRuntimeError: shape '[1, 4, -1, 196]' is invalid"
        )

    check = compare(frozen, pico_trained, torch.randn(1, 3, 64, 64))
    assert not check.ok and check.error == "RuntimeError: shape '[1, 4, -1, 196]' is invalid"


def test_cli_export_reads_a_safetensors_model_file_and_reports_equality(tmp_path):
    pytest.importorskip("safetensors")
    saved = tmp_path / "pico.safetensors"
    assert runner.invoke(app, ["build", "pico", "--save", str(saved)]).exit_code == 0
    model = load_model("pico", saved)
    assert torch.equal(model.state_dict()["head.fc.weight"], build_from_file(saved)["head.fc.weight"])
    out = tmp_path / "pico.pt2"
    result = runner.invoke(
        app,
        ["export", "pico", "-w", str(saved), "--format", "exported-program", "--img-size", "64", "64", "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and "equal to PyTorch at 1x3x64x64" in result.output


def build_from_file(path):
    from overlock.checkpoint import load_file

    return load_file(path)["state_dict"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "valid: onnx, exported-program, torchscript"),
        (["--img-size", "16", "64"], "between 32 and"),
        (["--dynamic-size", "--img-size", "32", "64"], "between 33 and"),
        (["-w", "missing.pt"], "does not exist"),
    ],
)
def test_cli_export_errors_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["export", "pico", "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
