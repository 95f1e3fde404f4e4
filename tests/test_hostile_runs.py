"""Hand-made and damaged run checkpoints, resumed or evaluated: clear errors, the run left as it was (issue 13)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from overlock.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--data", "synthetic:classes=3,train=24,val=12", "--batch-size", "8", "--workers", "0"]


def invoke(*args: str | Path):
    return runner.invoke(app, list(map(str, args)))


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, message


@contextlib.contextmanager
def one_thread():
    """`single_thread` for module fixtures (which run before the function-scoped one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_spec) -> Path:
    """A run of 4 steps stopped after 2: resumable."""
    root = tmp_path_factory.mktemp("runs") / "r"
    with one_thread():
        result = invoke("train", tiny_spec, *FAST, "--steps", "4", "--stop-after", "2", "--out", root)
    assert result.exit_code == 0, result.output
    return root


def edited_copy(run: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    state = torch.load(copy / "last.pt", weights_only=True)
    state.pop("sha256")  # made by hand: no checksum (a stale one would be reported as corruption)
    edit(state)
    torch.save(state, copy / "last.pt")
    return copy


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir()}


def _set(path: tuple, value):
    def edit(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _wrong_shape(state):
    name = next(k for k, v in state["model"].items() if v.dim() == 4)
    state["model"][name] = torch.zeros(1, 1, 1, 1)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_set(("spec",), "name: [unclosed"), "YAML syntax error"),
        (_set(("spec",), "name: &a [*a]"), "recursive"),
        (_set(("spec",), 42), "spec is a int"),
        (_set(("progress", "step"), "three"), "progress.step is 'three'"),
        (_set(("progress", "step"), 2.5), "progress.step is 2.5"),
        (_set(("rng",), []), "random states for 0 processes"),
        (_wrong_shape, "cannot be resumed"),
        (_set(("config",), "lr=1"), "config is a str"),
    ],
    ids=["spec-not-yaml", "spec-recursive", "spec-not-text", "step-text", "step-float", "rng-empty", "shape", "config"],
)
def test_a_hand_made_run_checkpoint_is_a_clear_error_and_the_run_is_untouched(stopped_run, tmp_path, edit, fragment):
    run = edited_copy(stopped_run, tmp_path, edit)
    before = snapshot(run)
    assert_user_error(invoke("train", "--resume", run), fragment)
    assert snapshot(run) == before


def test_eval_of_a_run_checkpoint_with_a_damaged_spec_is_a_clear_error(stopped_run, tmp_path, tiny_spec):
    run = edited_copy(stopped_run, tmp_path, _set(("spec",), "name: [unclosed"))
    assert_user_error(invoke("eval", tiny_spec, "--weights", run / "last.pt"), "YAML syntax error")
    run = edited_copy(stopped_run, tmp_path / "b", _set(("img_size",), "big"))
    assert_user_error(invoke("eval", tiny_spec, "--weights", run / "last.pt"), "img_size is a str")


def test_the_untouched_run_still_resumes(stopped_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stopped_run, copy)
    result = invoke("train", "--resume", copy)
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "metrics.jsonl").read_text().splitlines()[-1])["kind"] in ("end", "eval", "epoch")


def test_resume_removes_the_temporary_files_of_killed_saves(stopped_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stopped_run, copy)
    for name in (".last.pt.k1ll3d.tmp", ".best.pt.x9.tmp", ".best.safetensors.q2.tmp"):
        (copy / name).write_bytes(b"half a checkpoint")
    (copy / ".notes.tmp").write_text("not ours")
    assert invoke("train", "--resume", copy).exit_code == 0
    assert sorted(p.name for p in copy.glob(".*.tmp")) == [".notes.tmp"]


def test_overwrite_removes_the_temporary_files_of_killed_saves(stopped_run, tmp_path, tiny_spec):
    copy = tmp_path / "copy"
    shutil.copytree(stopped_run, copy)
    for name in (".last.pt.k1ll3d.tmp", ".best.pt.x9.tmp", ".metrics.jsonl.a1.tmp"):
        (copy / name).write_bytes(b"half a file")
    (copy / ".notes.tmp").write_text("not ours")
    result = invoke("train", tiny_spec, *FAST, "--steps", "1", "--eval-every", "5", "--out", copy, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in copy.glob(".*.tmp")) == [".notes.tmp"]


def test_best_is_written_before_last_so_last_never_names_a_best_not_on_disk(tiny_spec, tmp_path, monkeypatch):
    """Each save: best.pt, then best.safetensors (its weights as a model file), then last.pt."""
    from overlock import checkpoint as overlock_checkpoint
    from overlock.training import checkpoint as training_checkpoint

    written: list[str] = []  # every file written, in order
    saved: list[tuple[str, int]] = []  # every run checkpoint, with its step
    original_write, original_save = overlock_checkpoint.write_atomic, training_checkpoint.save_atomic
    monkeypatch.setattr(
        overlock_checkpoint,
        "write_atomic",
        lambda path, write: (written.append(Path(path).name), original_write(path, write))[1],
    )

    def recording(obj, path):
        saved.append((Path(path).name, obj["progress"]["step"]))
        return original_save(obj, path)

    monkeypatch.setattr(training_checkpoint, "save_atomic", recording)
    assert invoke("train", tiny_spec, *FAST, "--epochs", "2", "--out", tmp_path / "r").exit_code == 0
    best_steps = [step for name, step in saved if name == "best.pt"]
    assert best_steps, saved
    for step in best_steps:  # of the saves at a step with a new best, best.pt comes first and last.pt right after
        assert [name for name, s in saved if s == step] == ["best.pt", "last.pt"], saved
    for index, name in enumerate(written):  # and the model file sits between them
        if name == "best.pt":
            assert written[index + 1 : index + 3] == ["best.safetensors", "last.pt"], written
    assert written.count("best.safetensors") == written.count("best.pt")


def test_a_damaged_block_in_a_checkpoint_is_detected_by_its_checksum(stopped_run, tmp_path, tiny_spec):
    data = bytearray((stopped_run / "last.pt").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    damaged = tmp_path / "last.pt"
    damaged.write_bytes(data)
    from overlock.checkpoint import load_file
    from overlock.errors import CheckpointError

    with pytest.raises(CheckpointError, match="checksum"):
        load_file(damaged)
    assert_user_error(invoke("eval", tiny_spec, "--weights", damaged), "corrupt")
    assert "sha256" not in load_file(stopped_run / "last.pt"), "the checksum is checked and removed on load"


def test_a_symlink_loop_in_a_class_folder_is_refused_not_multiplied(tmp_path):
    from PIL import Image

    from overlock.training.data import load_data
    from overlock.training.errors import DataError

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "a.png")
    assert len(load_data(str(tmp_path), 32).train) == 2
    (tmp_path / "train" / "cat" / "loop").symlink_to("..")
    with pytest.raises(DataError, match="again"):
        load_data(str(tmp_path), 32)


def test_a_truncated_image_found_mid_run_before_any_checkpoint_leaves_no_half_run(tiny_spec, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("cat", "dog", "eel"):
            (data / split / name).mkdir(parents=True)
            for i in range(4):
                noise = torch.randint(
                    0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8
                )
                Image.fromarray(noise.numpy()).save(data / split / name / f"{i}.jpg", quality=95)
    # The header is intact (the scan before the run passes it); the pixel data is cut off.
    victim = data / "train" / "eel" / "3.jpg"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) * 3 // 4])
    out = tmp_path / "run"
    result = invoke("train", tiny_spec, "--data", data, "--img-size", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1", "--out", out)  # fmt: skip
    assert_user_error(result, "3.jpg", "was removed: no checkpoint had been written")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# best.pt that does not hold the best epoch last.pt records (a kill during its save, an older overlock)


@pytest.fixture(scope="module")
def best_moving_run(tmp_path_factory, tiny_spec) -> tuple[Path, Path]:
    """A 4-epoch run whose best epoch moves (val top-1 per epoch: 1/3, 1/3, 2/3, 3/3).

    The top-1s are set, not learnt: what a 24-image run learns differs from one CPU to another
    (their float rounding differs), and these tests are about which checkpoint holds the best epoch.
    Returns (a copy stopped at the end of epoch 2: last.pt at step 6, best.pt of epoch 1; the finished run).
    """
    import overlock.training.loop as loop

    root = tmp_path_factory.mktemp("best")
    run = root / "finished"
    args = ["train", tiny_spec, *FAST, "--lr", "0.01", "--epochs", "4", "--out", run]
    tops = iter([1 / 3, 1 / 3, 2 / 3, 1.0])

    def evaluate(*args, **kwargs):
        return dataclasses.replace(real_evaluate(*args, **kwargs), top1=next(tops))

    real_evaluate = loop.evaluate
    with one_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "evaluate", evaluate)
        assert invoke(*args, "--stop-after", "6").exit_code == 0
        shutil.copytree(run, root / "epoch2")
        assert invoke("train", "--resume", run).exit_code == 0
    logged = [r["val_top1"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]  # fmt: skip
    assert logged == [1 / 3, 1 / 3, 2 / 3, 1.0], logged
    return root / "epoch2", run


def progress_of(path: Path) -> dict:
    from overlock.checkpoint import load_file

    return load_file(path)["progress"]


def test_resume_rebuilds_a_stale_best_from_last_when_last_holds_the_best_epoch(best_moving_run, tmp_path):
    epoch2, finished = best_moving_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.copy(epoch2 / "best.pt", run / "best.pt")  # best.pt of epoch 1 next to a last.pt whose best is epoch 4
    (run / "best.safetensors").unlink()  # as an older overlock left it: no model file
    assert progress_of(run / "last.pt")["best_epoch"] == 4 and progress_of(run / "best.pt")["epoch"] == 1
    result = invoke("train", "--resume", run)
    assert result.exit_code == 0, result.output
    message = " ".join(result.stderr.split())
    assert "holds epoch 1" in message and "best as epoch 4" in message and "Rebuilt" in message, message
    assert "already finished" in result.stdout
    from overlock.checkpoint import load_file

    best, last = load_file(run / "best.pt"), load_file(run / "last.pt")
    assert best["progress"] == last["progress"] and best["progress"]["epoch"] == 4
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())
    model_file = load_file(run / "best.safetensors")  # the model file follows the rebuilt best.pt
    assert all(torch.equal(model_file["state_dict"][k], v) for k, v in last["model"].items())
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in finished.iterdir()), "no temporaries left"
    again = invoke("train", "--resume", run)  # repaired: nothing more to say
    assert again.exit_code == 0 and "warning" not in again.stderr


def test_resume_says_when_best_cannot_be_rebuilt_and_writes_a_consistent_one(best_moving_run, tmp_path):
    epoch2, _ = best_moving_run
    run = tmp_path / "run"
    shutil.copytree(epoch2, run)
    (run / "best.pt").unlink()  # last.pt (end of epoch 2) says the best is epoch 1, whose weights are gone
    result = invoke("train", "--resume", run, "--stop-after", "3")  # one more epoch
    assert result.exit_code == 0, result.output
    message = " ".join(result.stderr.split())
    assert "is missing" in message and "cannot be rebuilt" in message and "next evaluated epoch" in message, message
    last, best = progress_of(run / "last.pt"), progress_of(run / "best.pt")
    assert best["epoch"] == last["best_epoch"] == last["epoch"] == 3 and best["best_top1"] == last["best_top1"]


def test_a_best_written_just_before_a_kill_is_ahead_of_last_and_not_a_problem(best_moving_run):
    from overlock.checkpoint import load_file
    from overlock.training.checkpoint import best_problem

    epoch2, finished = best_moving_run
    last = load_file(epoch2 / "last.pt")
    assert best_problem(last, finished / "best.pt")[0] is None  # ahead: the resumed run redoes that epoch
    assert best_problem(last, epoch2 / "best.pt")[0] is None
    assert best_problem(load_file(finished / "last.pt"), epoch2 / "best.pt")[0].startswith("holds epoch 1")
