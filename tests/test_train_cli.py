"""`overlock train` / `overlock eval` end to end through the CLI, on tiny specs and images.

Runs use a shrunken pico (small kernels, classes left open) on 32 px images so that each one
takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from overlock import archspec
from overlock.checkpoint import MODEL_FORMAT, load_file
from overlock.cli import app
from overlock.training import checkpoint, loss

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("single_thread")

SYNTH = "synthetic:classes=3,train=24,val=12"
FAST = ["--data", SYNTH, "--batch-size", "8", "--workers", "0"]


def train(*args: str | Path):
    return runner.invoke(app, ["train", *map(str, args)])


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def assert_user_error(result, *fragments: str) -> None:
    """Exit status 2, the message on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# a whole run


def test_train_writes_a_complete_run_directory(tiny_spec, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_spec, *FAST, "--epochs", "2", "--out", run, "--ema", "0.9", "--drop-path", "0.1")
    assert result.exit_code == 0, result.output
    assert {p.name for p in run.iterdir()} == {
        "spec.yaml",
        "config.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "best.safetensors",
        "curves.png",
    }
    spec = archspec.load(run / "spec.yaml")
    assert spec.head.num_classes == 3 and spec.drop_path_rate == 0.1  # from the data / --drop-path
    steps, epochs = records(run, "step"), records(run, "epoch")
    assert [r["step"] for r in steps] == list(range(1, 7))  # 24 images / batch 8 = 3 steps x 2 epochs
    assert {"loss", "loss_main", "loss_aux", "acc", "lr", "images_per_s"} <= set(steps[0])
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1"} <= set(epochs[-1])
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 6 and state["classes"] == ["class_0", "class_1", "class_2"]
    assert json.loads((run / "config.json").read_text())["ema"] == 0.9
    with Image.open(run / "curves.png") as png:
        assert png.format == "PNG" and png.width > 400
    assert "val top-1" in result.stdout and "best val top-1" in flat(result.stdout)
    assert "best.safetensors" in flat(result.stdout)
    assert_best_model_is_best_pt(run)


def assert_best_model_is_best_pt(run: Path) -> None:
    """best.safetensors: a model file (spec in its metadata, training form) of best.pt's model weights."""
    assert (run / "best.safetensors").read_bytes()[8:9] == b"{"  # safetensors, not a pickle
    model_file = load_file(run / "best.safetensors")
    best = load_file(run / "best.pt")
    assert model_file["format"] == MODEL_FORMAT and model_file["deploy"] is False
    assert model_file["spec"] == best["spec"] == (run / "spec.yaml").read_text()
    assert model_file["state_dict"].keys() == best["model"].keys()
    assert all(torch.equal(model_file["state_dict"][k], v) for k, v in best["model"].items())


def test_train_on_digits(tiny_spec, tmp_path):
    digits = train(tiny_spec, "--data", "digits", "--steps", "2", "--batch-size", "16", "--out", tmp_path / "d")
    assert digits.exit_code == 0, digits.output
    assert records(tmp_path / "d", "epoch")[-1]["step"] == 2
    assert "1437 train / 360 val" in flat(digits.stdout)


def test_steps_mode_ends_mid_epoch_with_a_final_evaluation(tiny_spec, tmp_path):
    result = train(tiny_spec, *FAST, "--steps", "4", "--deterministic", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert not torch.are_deterministic_algorithms_enabled()  # process-wide switch restored after the run
    epochs = records(tmp_path / "r", "epoch")
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 3), (2, 4)]
    assert "val_top1" in epochs[-1]


# ---------------------------------------------------------------------------------------------
# resume


def test_resumed_run_logs_exactly_the_losses_of_an_uninterrupted_one(tiny_spec, tmp_path):
    common = [tiny_spec, *FAST, "--epochs", "3", "--ema", "0.9", "--drop-path", "0.2", "--seed", "5"]
    assert train(*common, "--out", tmp_path / "whole").exit_code == 0
    first = train(*common, "--out", tmp_path / "split", "--stop-after", "4")  # stops mid-epoch 2
    assert first.exit_code == 0, first.output
    assert "--stop-after" in flat(first.stdout)
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["progress"]["step"] == 4
    # As if killed between writing best.pt and best.safetensors: the resume rewrites it from best.pt.
    (tmp_path / "split" / "best.safetensors").unlink()
    second = train("--resume", tmp_path / "split")
    assert second.exit_code == 0, second.output

    def losses(run):
        return [(r["step"], r["loss"], r["loss_aux"], r["acc"], r["lr"]) for r in records(run, "step")]

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 9

    def evals(run):
        return [
            (r["epoch"], r["train_loss"], r["val_loss"], r["val_top1"], r["ema_val_loss"])
            for r in records(run, "epoch")
        ]

    assert evals(tmp_path / "split") == evals(tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert_best_model_is_best_pt(tmp_path / "split")
    split_best, whole_best = (load_file(tmp_path / run / "best.safetensors") for run in ("split", "whole"))
    assert all(torch.equal(v, whole_best["state_dict"][k]) for k, v in split_best["state_dict"].items())


def test_resume_refuses_changed_options_and_missing_checkpoints(tiny_spec, tmp_path):
    assert train(tiny_spec, *FAST, "--steps", "3", "--out", tmp_path / "r").exit_code == 0
    assert_user_error(train("--resume", tmp_path / "r", "--lr", "0.5"), "cannot change --lr")
    assert_user_error(train("--resume", tmp_path / "nothing"), "nothing to resume")
    assert_user_error(
        train("--resume", tmp_path / "r" / "last.pt"), "takes a run directory, not a file", f"--resume {tmp_path / 'r'}"
    )
    assert_user_error(train("--resume", ""), "--resume is empty")
    (tmp_path / "old").mkdir()
    torch.save({"format": checkpoint.FORMAT, "model": {}}, tmp_path / "old" / "last.pt")
    assert_user_error(train("--resume", tmp_path / "old"), "format version None")


def test_resuming_a_finished_run_changes_nothing(tiny_spec, tmp_path):
    assert train(tiny_spec, *FAST, "--steps", "2", "--out", tmp_path / "r").exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    again = train("--resume", tmp_path / "r")
    assert again.exit_code == 0, again.output
    assert "already finished (2/2 steps): nothing to resume" in flat(again.stdout)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before


def test_ctrl_c_saves_a_resumable_checkpoint_at_the_next_step(tiny_spec, tmp_path):
    run = tmp_path / "r"
    command = [
        sys.executable,
        "-m",
        "overlock.cli",
        "train",
        str(tiny_spec),
        *FAST,
        "--epochs",
        "200",
        "--out",
        str(run),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or '"kind": "step"' not in (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "interrupted (Ctrl-C)" in flat(stdout)
    last_logged = records(run, "step")[-1]["step"]
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] == last_logged < 600


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_mixed_precision_training_runs_on_cpu(tiny_spec, tmp_path, backend):
    result = train(tiny_spec, *FAST, "--steps", "2", "--amp", "--contmix-backend", backend, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path / "r", "step"))


@pytest.mark.skipif(
    not os.environ.get("OVERLOCK_SLOW_TESTS"), reason="torch.compile takes minutes on CPU; set OVERLOCK_SLOW_TESTS=1"
)
def test_compiled_training_matches_eager(tiny_spec, tmp_path):
    # 160 px: at smaller sizes Focus-Net maps are resized to the ContMix kernel, a pattern that
    # torch 2.13's CPU inductor fails to compile (train then reports a clear --compile error).
    args = [tiny_spec, "--data", "synthetic:classes=3,train=16,val=12", "--img-size", "160", "-b", "8", "--steps", "3"]
    assert train(*args, "--out", tmp_path / "eager").exit_code == 0
    compiled = train(*args, "--compile", "--out", tmp_path / "compiled")
    assert compiled.exit_code == 0, compiled.output
    eager_losses = [r["loss"] for r in records(tmp_path / "eager", "step")]
    assert [r["loss"] for r in records(tmp_path / "compiled", "step")] == pytest.approx(eager_losses, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# divergence


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_spec, tmp_path, monkeypatch):
    real_forward = loss.OverlockLoss.forward
    calls = {"n": 0}

    def poisoned(self, output, target):
        calls["n"] += 1
        parts = real_forward(self, output, target)
        if calls["n"] == 5:  # step 5: in epoch 2, after epoch 1's checkpoint
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(loss.OverlockLoss, "forward", poisoned)
    run = tmp_path / "r"
    result = train(tiny_spec, *FAST, "--epochs", "3", "--out", run)
    assert_user_error(result, "training diverged", "the loss is nan at step 5", "last.pt (step 3)")
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert records(run, "diverged")[0]["step"] == 5


def test_non_finite_weights_are_never_written_over_a_good_checkpoint(tiny_spec, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def corrupting_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:  # last step of epoch 2: the loss was finite, the weights are not
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", corrupting_step)
    run = tmp_path / "r"
    result = train(tiny_spec, *FAST, "--epochs", "3", "--out", run)
    assert_user_error(result, "the weights became non-finite", "last.pt (step 3)")
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] == 3


# ---------------------------------------------------------------------------------------------
# bad input: clear message, exit status 2, nothing written


def test_existing_run_is_refused_unless_overwrite(tiny_spec, tmp_path):
    run = tmp_path / "r"
    assert train(tiny_spec, *FAST, "--steps", "1", "--out", run).exit_code == 0
    before = (run / "metrics.jsonl").read_text()
    assert_user_error(
        train(tiny_spec, *FAST, "--steps", "1", "--out", run), "already holds a run", f"--resume {run}", "--overwrite"
    )
    assert (run / "metrics.jsonl").read_text() == before
    first_best = load_file(run / "best.safetensors")["state_dict"]
    again = train(tiny_spec, *FAST, "--steps", "2", "--out", run, "--overwrite")
    assert again.exit_code == 0, again.output
    assert records(run, "step")[-1]["step"] == 2 and len(records(run, "start")) == 1
    new_best = load_file(run / "best.safetensors")["state_dict"]
    assert not torch.equal(new_best["head.fc.weight"], first_best["head.fc.weight"])  # the new run's weights
    assert_best_model_is_best_pt(run)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--data", SYNTH, "--set", "in_channels=1"], ["expects in_channels=1", "3-channel", "--channels 1"]),
        (["--data", SYNTH, "--batch-size", "25"], ["--batch-size 25 is larger than the training set", "at most 24"]),
        (["--data", SYNTH, "--set", "head.num_classes=10"], ["fixes head.num_classes=10", "3 classes"]),
        (["--data", SYNTH, "--epochs", "1", "--steps", "2"], ["either --epochs or --steps"]),
        (["--data", SYNTH, "--sync-bn"], ["--sync-bn needs CUDA"]),
        (["--data", SYNTH, "--set", "focus.stages.0.groups=0"], ["groups"]),
    ],
)
def test_bad_input_is_a_one_screen_error_and_writes_nothing(tiny_spec, tmp_path, args, fragments):
    result = train(tiny_spec, *args, "--out", tmp_path / "run")
    assert_user_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_an_out_that_cannot_be_a_run_directory_is_refused_before_anything_is_written(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(train(tiny_spec, *FAST, "--steps", "1", "--out", ""), "--out is empty")
    (tmp_path / "notes.txt").write_text("mine")
    result = train(tiny_spec, *FAST, "--steps", "1", "--out", tmp_path / "notes.txt" / "run")
    assert_user_error(result, "notes.txt is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_run_that_stopped_before_its_first_checkpoint_is_not_offered_for_resume(tiny_spec, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "spec.yaml").write_text("name: tiny\n")
    result = train(tiny_spec, *FAST, "--steps", "1", "--out", tmp_path / "r")
    assert_user_error(result, "already holds a run (spec.yaml)", "nothing to resume", "--overwrite")
    assert "--resume" not in result.stderr


def test_run_output_is_not_squeezed_and_user_text_is_not_markup(tiny_spec, tmp_path):
    run = tmp_path / "r[/b]"  # rich closing-tag syntax in a path: printed as is, never parsed
    result = train(tiny_spec, *FAST, "--steps", "1", "--set", 'name="[/x]"', "--out", run)
    assert result.exit_code == 0, result.output
    announce = [line for line in result.stdout.splitlines() if "24 train / 12 val images" in line]
    assert announce and "1 epochs x 3 steps" in announce[0] and announce[0].startswith("[/x]")
    assert f"-> {run}" in flat(result.stdout) and (run / "last.pt").exists()


def test_the_installed_command_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "overlock.cli",
            "train",
            "pico",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "not a known source" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_reports_top1_top5_and_loss_of_run_checkpoints_and_state_dicts(tiny_spec, tmp_path):
    run = tmp_path / "r"
    assert train(tiny_spec, *FAST, "--epochs", "1", "--ema", "0.9", "--out", run).exit_code == 0
    logged = records(run, "epoch")[-1]
    result = runner.invoke(app, ["eval", str(tiny_spec), "--weights", str(run / "best.pt"), "--data", SYNTH])
    assert result.exit_code == 0, result.output
    assert f"{100 * logged['val_top1']:.2f}%" in result.stdout and f"{logged['val_loss']:.4f}" in result.stdout
    assert "top-5" in result.stdout
    ema = runner.invoke(app, ["eval", str(tiny_spec), "-w", str(run / "last.pt"), "--data", SYNTH, "--ema"])
    assert ema.exit_code == 0 and f"{100 * logged['ema_val_top1']:.2f}%" in ema.stdout
    plain = tmp_path / "plain.pt"
    torch.save(checkpoint.model_state(torch.load(run / "last.pt", weights_only=True)), plain)
    again = runner.invoke(app, ["eval", str(tiny_spec), "-w", str(plain), "--data", SYNTH, "--img-size", "32"])
    assert again.exit_code == 0 and f"{100 * logged['val_top1']:.2f}%" in again.stdout
    shipped = str(run / "best.safetensors")
    model_file = runner.invoke(app, ["eval", str(tiny_spec), "-w", shipped, "--data", SYNTH, "--img-size", "32"])
    assert model_file.exit_code == 0, model_file.output
    assert f"{100 * logged['val_top1']:.2f}%" in model_file.stdout and f"{logged['val_loss']:.4f}" in model_file.stdout


def test_best_safetensors_loads_wherever_weights_are_taken(tiny_spec, tmp_path):
    """export's loader (also behind `overlock export --weights`), load_file and load_backbone."""
    from overlock.builder import build, load_backbone
    from overlock.export import load_model

    run = tmp_path / "r"
    assert train(tiny_spec, *FAST, "--steps", "1", "--out", run).exit_code == 0
    best = torch.load(run / "best.pt", weights_only=True)["model"]
    model = load_model(tiny_spec, run / "best.safetensors")  # the class count comes from the weights
    assert model.num_classes == 3 and all(torch.equal(model.state_dict()[k], v) for k, v in best.items())
    backbone = build(archspec.load(tiny_spec, ["head.num_classes=3"]), features_only=True)
    report = load_backbone(backbone, load_file(run / "best.safetensors"))
    assert "head.fc.weight" in report.dropped
    assert torch.equal(backbone.state_dict()["base.stem.conv1.weight"], best["base.stem.conv1.weight"])


def test_eval_of_weights_for_another_spec_is_a_checkpoint_error(tiny_spec, tmp_path):
    run = tmp_path / "r"
    assert train(tiny_spec, *FAST, "--steps", "1", "--out", run).exit_code == 0
    result = runner.invoke(
        app, ["eval", "pico", "-w", str(run / "last.pt"), "--data", "synthetic:classes=10,train=16,val=8"]
    )
    assert_user_error(result, "do not fit this spec", "wrong shape", "this run trained 'tiny'")


def test_eval_of_a_run_checkpoint_defaults_to_the_runs_data(tiny_spec, tmp_path):
    run = tmp_path / "r"
    assert train(tiny_spec, *FAST, "--steps", "1", "--out", run).exit_code == 0
    result = runner.invoke(app, ["eval", str(tiny_spec), "-w", str(run / "last.pt")])  # no --data: not digits
    assert result.exit_code == 0, result.output
    assert "synthetic validation split, 12 images, 32px" in flat(result.stdout)


def test_eval_reads_a_deploy_form_model_file(tiny_spec, tmp_path):
    model_file = tmp_path / "deploy.pt"
    build = ["build", str(tiny_spec), "--set", "head.num_classes=3", "--deploy", "--save", str(model_file)]
    saved = runner.invoke(app, build)
    assert saved.exit_code == 0, saved.output
    result = runner.invoke(app, ["eval", str(tiny_spec), "-w", str(model_file), "--data", SYNTH])
    assert result.exit_code == 0, result.output
    assert "top-1" in result.stdout


def test_eval_accepts_a_published_layout_state_dict(reference_dir):
    golden = reference_dir / "golden" / "pico.official_state_dict.pt"
    result = runner.invoke(app, ["eval", "pico", "-w", str(golden), "--data", "synthetic:classes=10,train=16,val=8"])
    assert result.exit_code == 0, result.output
    assert "top-1" in result.stdout
