"""Shared fixtures: where the reference data lives, and small specs for fast tests."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

# Triton decides when a kernel is defined whether it compiles or interprets. Without a GPU every
# Triton test runs the kernels through its CPU interpreter, so the variable is set here, before
# anything imports overlock's kernels (the AOT compile tests drop it for their subprocesses).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CLI tests read plain text, as a pipe or a file gets it: a CI that forces colour (FORCE_COLOR,
# common on hosted runners) would otherwise style every line with escape sequences.
for _forcing in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "PY_COLORS", "CLICOLOR_FORCE"):
    os.environ.pop(_forcing, None)

from overlock import archspec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
# Where each test's outcome, duration and failure text go the moment it finishes. Set by
# benchmarks/gpu_session.sh: a GPU lease's step can be cut off by its time limit before pytest
# prints its end-of-session tracebacks, and the lease is over before anyone could rerun it.
FAILURE_LOG = os.environ.get("OVERLOCK_FAILURE_LOG")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if FAILURE_LOG is None or (report.when != "call" and not report.failed):
        return
    with open(FAILURE_LOG, "a") as log:
        log.write(f"{time.strftime('%H:%M:%S')} {report.outcome.upper()} {report.nodeid} ({report.duration:.1f} s)\n")
        if report.failed:
            log.write(report.longreprtext + "\n\n")


@pytest.fixture(autouse=True)
def _same_random_state_in_every_test():
    """Every test starts from one random state, whatever ran before it. A test's random data is then
    the same on every run and in every order: a tolerance that held once holds always, and a failure
    in CI reproduces here. Tests that need other data seed their own generator."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference beside the checkout (there in CI too); the goldens are not copied here."""
    if not REFERENCE.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE}: the checkout must sit beside shared/")
    return REFERENCE


@pytest.fixture
def single_thread():
    """Tiny models gain nothing from a second thread, and one avoids oversubscribing shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tiny_spec(directory: Path, *extra: str) -> Path:
    """pico with 5x5 kernels everywhere and an open class count (the data decides), as a YAML file."""
    kernels = ["base.stages.0", "base.stages.1", "base.stages.2", "overview", "focus.stages.0", "focus.stages.1"]
    overrides = [f"{k}.kernel_size=5" for k in kernels] + [
        "focus.stages.0.small_kernel_size=3",
        "focus.stages.1.small_kernel_size=3",
    ]
    overrides += ["head.num_classes=null", "head.projection=32", "name=tiny", *extra]
    path = directory / "tiny.yaml"
    path.write_text(archspec.load("pico", overrides).to_yaml())
    return path


@pytest.fixture(scope="session")
def make_tiny_spec():
    """`write_tiny_spec`, for test modules that want a variant of the tiny spec."""
    return write_tiny_spec


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> Path:
    """The tiny training spec (see `write_tiny_spec`), written once per session."""
    return write_tiny_spec(tmp_path_factory.mktemp("spec"))


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that folding BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            for name in ("gamma", "beta"):  # GRN starts at zero: make it do something
                if hasattr(module, name) and isinstance(getattr(module, name), torch.nn.Parameter):
                    getattr(module, name).copy_(torch.randn_like(getattr(module, name), generator=gen) * 0.1)


@pytest.fixture
def randomize_batchnorm():
    """The function that gives a model random BN statistics and GRN parameters (deploy-equivalence tests)."""
    return _randomize_batchnorm
