"""`overlock train` under torchrun: 2 CPU processes with gloo on localhost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SYNTH = "synthetic:classes=3,train=32,val=13"


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",  # torchrun takes a free port itself: no race with another test's port
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory, make_tiny_spec) -> Path:
    """The shared tiny spec with stochastic depth on, so the ranks' drop-path draws must agree too."""
    return make_tiny_spec(tmp_path_factory.mktemp("spec"), "drop_path_rate=0.1")


def test_two_gloo_processes_train_to_identical_weights(tiny_spec, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, torch
            from overlock.training.runner import train
            result = train({{"spec": {str(tiny_spec)!r}, "data": {SYNTH!r}, "batch_size": 4, "epochs": 2, "ema": 0.9}}, out={str(tmp_path / "run")!r})
            torch.save(result.model.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
            """
        )
    )
    proc = torchrun(str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # parameters and BatchNorm statistics
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert all(torch.equal(saved["model"][k], v) for k, v in rank0.items())
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"kind": "start", "step": 0, "world_size": 2, "global_batch": 8}
    steps = [r for r in lines if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6, 7, 8]  # 32 images / (2 ranks x 4) = 4 steps per epoch
    epoch = [r for r in lines if r["kind"] == "epoch"][-1]
    assert round(epoch["val_top1"] * 13) == epoch["val_top1"] * 13  # exact over all 13 images, none counted twice


def test_the_cli_under_torchrun_writes_one_run_from_rank_zero(tiny_spec, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(
        "-m",
        "overlock.cli",
        "train",
        str(tiny_spec),
        "--data",
        SYNTH,
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--out",
        str(run),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("overlock train") == 1  # one summary table, printed by rank 0
    assert "2 processes" in " ".join(proc.stdout.split())
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "best.safetensors",
        "config.json",
        "curves.png",
        "last.pt",
        "metrics.jsonl",
        "spec.yaml",
    ]
