"""Data sources of `overlock train`: synthetic, digits, ImageFolder directories, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from overlock.cli import app
from overlock.training.data import EvalView, TrainView, load_data
from overlock.training.errors import DataError

pytestmark = pytest.mark.usefixtures("single_thread")


def make_image_folder(
    root: Path, classes=("cat", "dog", "owl"), train_per_class=4, val_per_class=2, mode="RGB"
) -> Path:
    """A small ImageFolder tree of random images in assorted sizes and formats."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 40 + 7 * i, 48 + 5 * c
                pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert(mode)
                image.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_synthetic_is_deterministic_and_sized_by_options():
    a = load_data("synthetic:classes=4,train=20,val=8", img_size=40)
    b = load_data("synthetic:classes=4,train=20,val=8", img_size=40)
    assert (len(a.train), len(a.val), a.num_classes) == (20, 8, 4)
    image, label = a.train.load(5)
    assert image.shape == (3, 40, 40) and label == 1
    assert torch.equal(image, b.train.load(5)[0])
    assert not torch.equal(a.train.load(5)[0], a.val.load(5)[0])  # the splits hold different samples


@pytest.mark.parametrize("source", ["synthetic:classes=1", "synthetic:size=3", "synthetic:train=-1", "synthetic:train"])
def test_synthetic_rejects_bad_options(source):
    with pytest.raises(DataError, match="synthetic"):
        load_data(source)


def test_digits_are_split_stratified_and_resized():
    data = load_data("digits", img_size=48)
    assert (len(data.train), len(data.val)) == (1437, 360)
    assert data.classes == [str(d) for d in range(10)]
    image, label = data.train.load(0)
    assert image.shape == (3, 48, 48) and 0 <= label < 10
    assert torch.equal(image[0], image[2])  # grey replicated to 3 channels
    val_labels = {data.val.load(i)[1] for i in range(len(data.val))}
    assert val_labels == set(range(10))
    view = TrainView(data.train, data.train_transform, data.eval_transform, seed=0)
    first, again = view[(3, 1)][0], view[(3, 1)][0]
    assert first.shape == (3, 48, 48) and torch.equal(first, again)
    assert not torch.equal(first, view[(3, 2)][0])  # another epoch, another crop


def test_digits_in_one_channel():
    data = load_data("digits", channels=1)
    assert data.train.load(0)[0].shape == (1, 32, 32) and data.channels == 1


def test_image_folder_reads_classes_and_applies_train_and_eval_transforms(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    data = load_data(str(root), img_size=32)
    assert data.classes == ["cat", "dog", "owl"]
    assert (len(data.train), len(data.val)) == (12, 6)
    train = TrainView(data.train, data.train_transform, data.eval_transform, seed=0)
    image, label = train[(5, 0)]
    assert image.shape == (3, 32, 32) and label == 1
    assert torch.equal(train[(5, 0)][0], image)
    val = EvalView(data.val, data.eval_transform)
    assert val[0][0].shape == (3, 32, 32) and torch.equal(val[0][0], val[0][0])
    grey = load_data(str(root), img_size=32, channels=1)
    assert EvalView(grey.val, grey.eval_transform)[0][0].shape == (1, 32, 32)


def test_image_folder_ignores_non_image_files(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    assert len(load_data(str(root)).train) == 12


@pytest.mark.parametrize("source", ["", "  "])
def test_an_empty_source_is_a_data_error_not_the_current_directory(source, tmp_path, monkeypatch):
    make_image_folder(tmp_path)  # the current directory even looks like a data set
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="--data is empty"):
        load_data(source)


def test_missing_data_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not a known source nor an existing directory"):
        load_data(str(tmp_path / "nowhere"))


def test_directory_without_val_split_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    for file in (root / "val").rglob("*.*"):
        file.unlink()
    for folder in sorted((root / "val").iterdir()):
        folder.rmdir()
    (root / "val").rmdir()
    with pytest.raises(DataError, match="val is missing"):
        load_data(str(root))


def test_empty_class_folder_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    (root / "train" / "emu").mkdir()
    (root / "val" / "emu").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/emu has no images"):
        load_data(str(root))


def test_unreadable_image_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"unreadable image .*broken\.png"):
        load_data(str(root))


def test_train_and_val_with_different_classes_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    (root / "val" / "owl").rename(root / "val" / "eagle")
    with pytest.raises(DataError, match="missing in val/: owl; only in val/: eagle"):
        load_data(str(root))


# ---------------------------------------------------------------------------------------------
# through the CLI: a folder run, and bad data as one-screen errors that write nothing


def test_train_on_an_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    out = tmp_path / "run"
    args = ["train", "pico", "--set", "head.num_classes=null", "--data", str(root), "--img-size", "32"]
    result = CliRunner().invoke(app, [*args, "--steps", "2", "--batch-size", "4", "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "12 train / 6 val images, 3 classes" in " ".join(result.stdout.split())
    assert (out / "best.pt").is_file() and "num_classes: 3" in (out / "spec.yaml").read_text()


def _missing(root: Path) -> str:
    return str(root / "nowhere")


def _empty_class(root: Path) -> str:
    make_image_folder(root / "d")
    (root / "d" / "train" / "yak").mkdir()
    return str(root / "d")


def _broken_image(root: Path) -> str:
    make_image_folder(root / "d")
    (root / "d" / "val" / "owl" / "broken.png").write_bytes(b"garbage")
    return str(root / "d")


def _grey_for_rgb_spec(root: Path) -> str:
    return str(make_image_folder(root / "d"))


@pytest.mark.parametrize(
    ("make_source", "extra", "fragments"),
    [
        (_missing, [], ["not a known source nor an existing directory"]),
        (_empty_class, [], ["class folder", "train/yak has no images"]),
        (_broken_image, [], ["unreadable image", "broken.png"]),
        (_grey_for_rgb_spec, ["--channels", "1"], ["expects in_channels=3", "1-channel", "--channels 3"]),
        (_grey_for_rgb_spec, ["--batch-size", "13"], ["--batch-size 13 is larger than the training set: 12 images"]),
    ],
    ids=["missing-dir", "empty-class", "unreadable-image", "channel-mismatch", "batch-too-large"],
)
def test_bad_data_is_a_one_screen_error_and_writes_nothing(tmp_path, make_source, extra, fragments):
    source = make_source(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "pico", "--set", "head.num_classes=null", "--data", source, *extra, "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message
    assert "Traceback" not in result.output
    assert not out.exists()
