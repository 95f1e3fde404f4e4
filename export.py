"""Export a built model to ONNX, a torch.export program or TorchScript, and check the result.

`overlock export` is a thin layer over `export_model`. Every export is followed by an equality
check: the exported artefact is run (onnxruntime for ONNX, the loaded program for torch.export,
the loaded module for TorchScript) and compared with the eager PyTorch model on random inputs at
the exported size and, for dynamic sizes, at other sizes (non-square ones and ones whose Focus-Net
maps are smaller than the ContMix kernel). The report says what was compared and how close it was.

How each overlock piece exports:
- `overlock::contmix` / `overlock::aggregate` (custom ops) stay single nodes in a torch.export
  program, so a loaded program runs the fast backends; loading one needs `import overlock.kernels`
  first (it registers the ops). For ONNX they are decomposed into aten ops (`kernels/onnx.py`).
- ContMix's region pooling and the small-map resize follow the input size under export
  (`builder.layers.RegionPool`, `ContMix.mixing_size`), so one graph serves every size.
- TorchScript is a `torch.jit.trace` (the model is not `torch.jit.script`-able: its blocks pass
  modules to helpers, its forward returns a list or a dict). A plain trace freezes the input size;
  with --dynamic-size the trace runs under `builder.layers.size_generic_trace`, which records every
  size-dependent step as a computation on the input's shape, so the file serves other sizes too
  (checked like the other formats). Loading one needs `import overlock.kernels` first (the trace
  holds `overlock::contmix` nodes).
- Dynamic sizes start at 33 px: a 32 px input makes 1x1 maps at /32, and torch.export specialises
  every size-1 dimension (broadcasting), so a program traced with dynamic sizes refuses exactly 32.
  Export at 32 px with static sizes when that size is needed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import archspec
from .checkpoint import MODEL_FORMAT, load_file, write_atomic
from .errors import CheckpointError, OverlockError

FORMATS = ("onnx", "exported-program", "torchscript")
#: Smallest side of a dynamically sized export (see the module docstring).
MIN_DYNAMIC_SIZE = 33
MAX_DYNAMIC_SIZE = 4096
#: Largest relative difference (max |exported - eager| / max |eager|) that counts as equal.
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# Loading the model to export


def load_model(
    spec: archspec.SpecSource,
    weights: str | Path | None,
    *,
    overrides: list[str] | None = None,
    deploy: bool = False,
    ema: bool = False,
) -> nn.Module:
    """The model of `spec` with the weights `overlock eval` accepts, in eval mode.

    `weights`: a run checkpoint (last.pt/best.pt, `ema` picks its EMA weights), a model file of
    `overlock build --save` / `convert`, a plain state dict or one in the published layout; None
    keeps the random initialisation. An open class count (or input channels) is taken from the
    weights. `deploy` re-parameterises after loading, whatever form the file holds.
    """
    from .builder import build, convert_official
    from .training import checkpoint as run_checkpoint
    from .training.runner import _load_weights

    resolved = archspec.load(spec, overrides)
    if weights is None:
        if resolved.head.num_classes is None:
            resolved = archspec.load(spec, [*(overrides or []), "head.num_classes=1000"])
        model = build(resolved)
        return (model.reparameterize() if deploy else model).eval()
    state = load_file(weights)
    run_ckpt = run_checkpoint.is_run_checkpoint(state)
    if run_ckpt:
        run_checkpoint.check_run_checkpoint(state, str(weights))
    tensors = run_checkpoint.model_state(state, use_ema=ema)
    resolved = _fit_spec_to_weights(spec, overrides, resolved, tensors)
    file_deploy = isinstance(state, dict) and state.get("format") == MODEL_FORMAT and bool(state.get("deploy"))
    if not file_deploy and not run_ckpt:
        file_deploy = any(k.endswith(".lk.bias") or k.endswith("lk_origin.bias") for k in tensors)
    model = build(resolved, deploy=file_deploy)
    if set(tensors) != set(model.state_dict()) and not run_ckpt:
        try:  # a published checkpoint (reference layout)?
            tensors = convert_official(model, tensors)
        except CheckpointError:
            pass  # report the mismatch in our own layout below
    _load_weights(model, tensors, str(weights), "check that SPEC (and --set) are the ones the weights belong to")
    if deploy:
        model.reparameterize()
    return model.eval()


def _fit_spec_to_weights(
    spec: archspec.SpecSource, overrides: list[str] | None, resolved: archspec.Spec, tensors: dict[str, torch.Tensor]
) -> archspec.Spec:
    """Fill an open class count and the input channels from the weights' head and stem."""
    extra: list[str] = []
    if resolved.head.num_classes is None:
        head = tensors.get("head.fc.weight", tensors.get("head.4.weight"))
        if head is None:
            raise CheckpointError(
                "head.num_classes is open in the spec and the weights have no classifier head to read it from; "
                "give --set head.num_classes=N"
            )
        extra.append(f"head.num_classes={head.shape[0]}")
    stem = tensors.get("base.stem.conv1.weight", tensors.get("patch_embed1.0.weight"))
    if stem is not None and stem.shape[1] != resolved.in_channels:
        extra.append(f"in_channels={stem.shape[1]}")
    return archspec.load(spec, [*(overrides or []), *extra]) if extra else resolved


# ---------------------------------------------------------------------------------------------
# Exporting


@dataclass
class Comparison:
    """One equality check of the exported artefact against eager PyTorch."""

    shape: tuple[int, ...]
    max_abs: float
    relative: float
    #: Why the exported file could not run at this shape (its first line), if it could not.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.relative <= TOLERANCE


@dataclass
class ExportReport:
    path: Path
    format: str
    size: tuple[int, int]
    dynamic_batch: bool
    dynamic_size: bool
    checks: list[Comparison] = field(default_factory=list)
    skipped_check: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise OverlockError(f"--format {fmt!r} is not known; valid: {', '.join(FORMATS)}")


def _check_size(size: tuple[int, int], dynamic_size: bool) -> None:
    low = MIN_DYNAMIC_SIZE if dynamic_size else 32
    if min(size) < low or max(size) > MAX_DYNAMIC_SIZE:
        why = (
            " with --dynamic-size (a 32 px input makes 1x1 maps, which torch.export specialises)"
            if dynamic_size
            else ""
        )
        raise OverlockError(
            f"--img-size {size[0]} {size[1]}: each side must be between {low} and {MAX_DYNAMIC_SIZE}{why}"
        )


def example_input(model: nn.Module, size: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.spec.in_channels, *size, generator=generator)


def export_program(
    model: nn.Module, size: tuple[int, int], *, dynamic_batch: bool = False, dynamic_size: bool = False
) -> torch.export.ExportedProgram:
    """torch.export of the eval-mode model; overlock's ops stay custom-op nodes."""
    # A batch of 1 would be specialised (size-1 dims always are), so trace a dynamic batch with 2.
    x = example_input(model, size, batch=2 if dynamic_batch else 1)
    dims: dict[int, Any] = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim.DYNAMIC
    if dynamic_size:
        dims[2] = torch.export.Dim.DYNAMIC(min=MIN_DYNAMIC_SIZE, max=MAX_DYNAMIC_SIZE)
        dims[3] = torch.export.Dim.DYNAMIC(min=MIN_DYNAMIC_SIZE, max=MAX_DYNAMIC_SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, not the user's business
        return torch.export.export(model, (x,), dynamic_shapes={"x": dims} if dims else None)


def _require_onnx() -> None:
    """Fail before the (slow) export when the ONNX packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise OverlockError(
            f"--format onnx needs the onnx and onnxscript packages ({exc.name} is missing): "
            "pip install 'overlock[onnx]'"
        ) from None


def _onnx_bytes(program: torch.export.ExportedProgram) -> bytes:
    import onnx

    from .kernels import onnx as onnx_decompositions

    decomposed = program.run_decompositions(onnx_decompositions.decompositions())
    # The exporter narrates its passes on stdout and logs warnings about torchvision ops: keep the
    # command's output to what overlock reports.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(decomposed, dynamo=True, verbose=False, optimize=True)
    finally:
        logger.setLevel(level)
    buffer = io.BytesIO()
    onnx.save_model(onnx_program.model_proto, buffer)
    return buffer.getvalue()


def _torchscript_bytes(model: nn.Module, size: tuple[int, int], batch: int, dynamic_size: bool) -> bytes:
    """torch.jit.trace (the blocks pass modules to helper functions and the model returns a list or
    a dict, which torch.jit.script does not compile; a trace records the ops). With `dynamic_size`
    sizes are traced as computations (see `size_generic_trace`), else frozen at `size`."""
    from .builder.layers import size_generic_trace

    generic = size_generic_trace() if dynamic_size else contextlib.nullcontext()
    with torch.no_grad(), generic, warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks seen as constants: expected
        traced = torch.jit.trace(model, example_input(model, size, batch=batch), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def check_sizes(size: tuple[int, int], dynamic_size: bool, kernel_size: int) -> list[tuple[int, int]]:
    """The sizes the equality check runs at: the exported one and, if dynamic, three others.

    A non-square size, a larger one, and one whose /32 Focus-Net map is smaller than the largest
    ContMix kernel (so the small-map resize path runs).
    """
    sizes = [size]
    if dynamic_size:
        small = max(96, 32 * (kernel_size - 1))  # /32 map (kernel_size - 1) < kernel: resized
        for other in ((size[0] + 32, size[1] + 64), (small, small + 64), (size[1] + 96, size[0])):
            if other not in sizes:
                sizes.append(other)
    return sizes


def _runner(fmt: str, data: bytes) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """A callable running the exported artefact, or why the check cannot run here."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime is not installed (pip install 'overlock[onnx]')"
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "exported-program":
        program = load_exported_program(io.BytesIO(data))
        module = program.module()
        return lambda x: module(x)
    scripted = load_torchscript(io.BytesIO(data))
    return lambda x: scripted(x)


def compare(run: Callable[[torch.Tensor], Any], model: nn.Module, x: torch.Tensor) -> Comparison:
    with torch.no_grad():
        expected = _first(model(x)).float()
        try:
            got = _first(run(x)).float()
        except Exception as exc:  # noqa: BLE001 - a file that cannot run at this size is the finding
            return Comparison(tuple(x.shape), float("inf"), float("inf"), _error_line(exc))
    if got.shape != expected.shape:
        return Comparison(tuple(x.shape), float("inf"), float("inf"))
    max_abs = (got - expected).abs().max().item()
    return Comparison(tuple(x.shape), max_abs, max_abs / max(expected.abs().max().item(), 1e-12))


def _error_line(exc: BaseException) -> str:
    """The line of an error that says what went wrong (TorchScript's put it after a stack of frames)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^\w*(Error|Exception): ", line)]
    return (named or lines or [type(exc).__name__])[-1]


def _first(output: Any) -> torch.Tensor:
    """The logits (or the deepest pyramid level of a features-only model)."""
    if isinstance(output, list | tuple):
        return output[-1]
    return output


def export_model(
    model: nn.Module,
    path: str | Path,
    fmt: str,
    size: tuple[int, int] = (224, 224),
    *,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
) -> ExportReport:
    """Export `model` (eval mode) to `path` in `fmt`, then check the file against the model."""
    _check_format(fmt)
    _check_size(size, dynamic_size)
    if fmt == "onnx":
        _require_onnx()
    model = model.eval()
    if fmt == "torchscript":
        data = _torchscript_bytes(model, size, batch=2 if dynamic_batch else 1, dynamic_size=dynamic_size)
    else:
        program = export_program(model, size, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
        if fmt == "onnx":
            data = _onnx_bytes(program)
        else:
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            data = buffer.getvalue()
    path = write_atomic(path, lambda handle: handle.write(data))
    report = ExportReport(path, fmt, size, dynamic_batch, dynamic_size)
    run = _runner(fmt, data)
    if isinstance(run, str):
        report.skipped_check = run
        return report
    kernel = _largest_contmix_kernel(model)
    batch = 2 if dynamic_batch else 1
    for i, check_size in enumerate(check_sizes(size, dynamic_size, kernel)):
        report.checks.append(compare(run, model, example_input(model, check_size, batch=batch, seed=i)))
    return report


def _largest_contmix_kernel(model: nn.Module) -> int:
    """The largest ContMix kernel in the model (any topology; 3 when it has no ContMix)."""
    from .builder.contmix import ContMix

    return max((m.kernel_size for m in model.modules() if isinstance(m, ContMix)), default=3)


def load_exported_program(source: str | Path | io.BytesIO) -> torch.export.ExportedProgram:
    """torch.export.load with overlock's ops registered (a program that uses them needs this).

    Outside overlock, `import overlock.kernels` before `torch.export.load` does the same.
    """
    from . import kernels  # noqa: F401  (registers torch.ops.overlock.*)

    return torch.export.load(source)


def load_torchscript(source: str | Path | io.BytesIO) -> torch.jit.ScriptModule:
    """torch.jit.load with overlock's ops registered (the trace holds `overlock::contmix` nodes).

    Outside overlock, `import overlock.kernels` before `torch.jit.load` does the same.
    """
    from . import kernels  # noqa: F401  (registers torch.ops.overlock.*)

    return torch.jit.load(source)
