"""What overlock writes never destroys what a user owns, and odd file names are clear errors (issue 13)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from overlock import archspec
from overlock.checkpoint import write_atomic
from overlock.cli import app
from overlock.errors import OverlockError

runner = CliRunner()
TOO_LONG = "a" * 300 + ".yaml"  # longer than NAME_MAX (255) on every common file system


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_clear_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.output


def test_writing_through_a_symlink_updates_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target.name)
    write_atomic(link, lambda handle: handle.write(b"new"))
    assert link.is_symlink() and os.readlink(link) == "real.json"
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640, "replacing a file keeps its permissions"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_a_fifo_is_written_into_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    result = run("schema", "-o", str(fifo))
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert received and received[0].startswith(b"{")


@pytest.fixture
def char_device(tmp_path):
    """A character device to write to: a copy of /dev/<name> in tmp_path where we may create one (root).

    Never the real /dev node as root: were write_atomic to regress to rename-over, the test would replace
    the machine's /dev/null. Without root, /dev/<name> itself is safe (renaming into /dev is not permitted).
    """

    def make(name: str) -> Path:
        real = Path("/dev") / name
        if os.geteuid() != 0:
            return real
        node = tmp_path / name
        try:
            os.mknod(node, stat.S_IFCHR | 0o666, os.stat(real).st_rdev)
            node.open("rb").close()
        except OSError:
            pytest.skip(f"cannot create a character device like {real} here")
        return node

    return make


def test_a_character_device_is_written_into_not_replaced(char_device):
    device = char_device("null")
    before = os.stat(device)
    write_atomic(device, lambda handle: handle.write(b"x" * 100))
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_device_is_a_clear_error_and_stays_a_device(char_device):
    device = char_device("full")
    result = run("schema", "-o", str(device))
    assert_clear_error(result, str(device), "No space left")
    assert stat.S_ISCHR(os.stat(device).st_mode)


def test_dash_means_standard_output(capfdbinary):
    write_atomic("-", lambda handle: handle.write(b"to stdout"))
    assert capfdbinary.readouterr().out == b"to stdout"
    assert not Path("-").exists()


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        with pytest.raises(OverlockError, match="it is a socket"):
            write_atomic(path, lambda handle: handle.write(b"x"))
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        server.close()


def test_a_symlink_loop_is_a_clear_error(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OverlockError, match="cannot write"):
        write_atomic(tmp_path / "a", lambda handle: handle.write(b"x"))


def test_a_name_as_long_as_the_os_allows_can_be_written(tmp_path):
    path = tmp_path / ("m" * 250 + ".pt")
    write_atomic(path, lambda handle: handle.write(b"x"))
    assert path.read_bytes() == b"x"


def test_build_save_never_overwrites_a_shipped_preset():
    preset = archspec.preset_dir() / "pico.yaml"
    before = preset.read_bytes()
    result = run("build", "pico", "--save", str(preset))
    assert_clear_error(result, "shipped preset")
    assert_clear_error(run("schema", "-o", str(preset)), "shipped preset")
    assert preset.read_bytes() == before


def test_build_save_never_overwrites_a_preset_through_a_symlink(tmp_path):
    # The output resolves to the preset file the name `pico` reads.
    link = tmp_path / "p.yaml"
    link.symlink_to(archspec.preset_dir() / "pico.yaml")
    before = link.read_bytes()
    assert_clear_error(run("build", "pico", "--save", str(link)), "shipped preset")
    assert link.read_bytes() == before


@pytest.mark.parametrize(
    "args",
    [
        ["validate", TOO_LONG],
        ["build", TOO_LONG],
        ["train", "pico", "--data", "/tmp/" + "d" * 300, "--epochs", "1"],
        ["eval", "pico", "--weights", "w" * 300 + ".pt", "--data", "synthetic"],
        ["schema", "-o", TOO_LONG],
    ],
)
def test_file_names_longer_than_the_os_allows_are_clear_errors(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clear_error(run(*args), "too long")


def test_an_extends_target_longer_than_the_os_allows_is_a_clear_error(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"extends: {TOO_LONG}\n")
    assert_clear_error(run("validate", str(spec)), "too long")


def test_build_save_never_overwrites_the_spec_file_a_relative_name_stands_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "mine.yaml"
    spec.write_text("extends: pico\n")
    assert_clear_error(run("build", "mine.yaml", "--save", str(spec)), "the spec file this command reads")
    assert spec.read_text() == "extends: pico\n"


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")],
    ids=["MemoryError", "torch-allocator"],
)
def test_a_failed_allocation_anywhere_in_a_command_is_a_one_screen_error(monkeypatch, error):
    # `train ... --data synthetic:classes=100000 --img-size 1024` failed like this while loading data,
    # where no command-specific handler runs: the command boundary turns it into a message.
    from overlock.training import setup

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(setup, "load_data", no_memory)
    assert_clear_error(run("train", "pico", "--data", "synthetic", "--epochs", "1"), "not enough memory")


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    from overlock.training import setup

    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not the user's input")

    monkeypatch.setattr(setup, "load_data", bug)
    result = run("train", "pico", "--data", "synthetic", "--epochs", "1")
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
