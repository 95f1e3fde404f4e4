"""benchmarks/gpu_session.sh and gpu_lease.sh: a GPU lease is short and rare, so their mistakes must
show before one starts: step names are checked first, a machine without CUDA is refused in one line,
and the lease wrapper refuses to run outside the device tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_gpu_session_rejects_an_unknown_step_before_running_anything(tmp_path):
    result = run("gpu_session.sh", str(tmp_path / "out"), "tests", "compre")
    assert result.returncode == 2
    assert "unknown step 'compre'" in result.stderr and "compare_compile" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_session_refuses_a_machine_without_cuda_in_one_line(tmp_path):
    result = run("gpu_session.sh", str(tmp_path), "tests")
    assert result.returncode == 1
    assert result.stderr.strip() == "no CUDA device: this script is for a GPU machine"


def test_gpu_lease_needs_the_device_tools_out_folder_and_a_known_verb():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    outside = run("gpu_lease.sh", "run", "tests", env=env)
    assert outside.returncode == 2 and "OUT (set by the device tool)" in outside.stderr
    unknown = run("gpu_lease.sh", "launch", env=env)
    assert unknown.returncode == 2 and unknown.stderr.startswith("usage: bash benchmarks/gpu_lease.sh prepare")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("script", ["gpu_profile.py", "depthwise_gpu.py"])
def test_gpu_only_benchmarks_refuse_a_machine_without_cuda_without_a_traceback(script):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script)], capture_output=True, text=True, timeout=120, cwd=BENCHMARKS.parent
    )
    assert result.returncode == 2
    assert "error: no CUDA device here" in result.stderr and "Traceback" not in result.stderr
