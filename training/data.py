"""Data sources of `overlock train/eval`: `synthetic`, `digits` and ImageFolder-style directories.

A source becomes a `DataSplits`: a train and a validation `ImageSet` (random access to an
untransformed image and its label), the class names, and the transforms to apply. `TrainView`
and `EvalView` turn an `ImageSet` into a torch `Dataset`; the training view is indexed by
`(index, epoch)` pairs (see `sampler.py`) so each sample's augmentation is a pure function of
(seed, epoch, index). Every check on the data happens in `load_data`, before a run directory
exists, so a bad source never leaves a half-written run behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PilEvalTransform,
    PilTrainTransform,
    TensorTrainTransform,
    sample_rng,
)
from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SOURCE_FORMS = "'digits', 'synthetic' (or 'synthetic:classes=4,train=64,val=32'), or a directory with train/ and val/"
SYNTHETIC_DEFAULTS = {"classes": 10, "train": 512, "val": 128}
#: Held-out fraction of the digits set; the split is stratified and fixed (random_state 0).
DIGITS_VAL_FRACTION = 0.2


class ImageSet(Protocol):
    """Random access to untransformed samples of one split."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Any, int]: ...


TrainTransform = Callable[[Any, np.random.Generator], torch.Tensor]
EvalTransform = Callable[[Any], torch.Tensor]


@dataclass
class DataSplits:
    """A loaded, validated data source."""

    name: str
    train: ImageSet
    val: ImageSet
    classes: list[str]
    channels: int
    img_size: int
    train_transform: TrainTransform | None
    eval_transform: EvalTransform | None
    in_memory: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class TrainView(Dataset):
    """Training samples, indexed by (index, epoch) so augmentation is reproducible anywhere."""

    def __init__(
        self, images: ImageSet, transform: TrainTransform | None, eval_transform: EvalTransform | None, seed: int
    ) -> None:
        self.images, self.transform, self.eval_transform, self.seed = images, transform, eval_transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        image, label = self.images.load(index)
        if self.transform is not None:
            return self.transform(image, sample_rng(self.seed, epoch, index)), label
        return (self.eval_transform(image) if self.eval_transform is not None else image), label


class EvalView(Dataset):
    """Validation samples with the deterministic evaluation transform."""

    def __init__(self, images: ImageSet, transform: EvalTransform | None) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images.load(index)
        return (self.transform(image) if self.transform is not None else image), label


# ---------------------------------------------------------------------------------------------
# In-memory sources


class TensorImages:
    """Images already resized and normalised, held as one (N, C, S, S) tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class SyntheticImages:
    """A deterministic, learnable toy task: a fixed smooth pattern per class plus per-sample noise.

    Nothing is stored: sample i of a split is regenerated from (split, i) on demand, so any size
    costs no memory and every process sees identical data.
    """

    def __init__(self, classes: int, count: int, size: int, channels: int, split: int) -> None:
        self.classes, self.count, self.size, self.channels, self.split = classes, count, size, channels, split
        # 6x6 per class; upsampled per sample (holding every class at full size took classes x size^2
        # floats: 9 GiB for 3000 classes at 512 px, before any check).
        self.patterns = torch.randn(classes, channels, 6, 6, generator=torch.Generator().manual_seed(1234))

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.classes
        noise_gen = torch.Generator().manual_seed(1_000_003 * (self.split + 1) + index)
        noise = torch.randn(self.channels, self.size, self.size, generator=noise_gen)
        prototype = F.interpolate(
            self.patterns[label : label + 1], size=(self.size, self.size), mode="bilinear", align_corners=False
        )
        return prototype[0] + 0.8 * noise, label


def _synthetic(options: dict[str, int], size: int, channels: int) -> DataSplits:
    classes, train, val = options["classes"], options["train"], options["val"]
    return DataSplits(
        name="synthetic",
        train=SyntheticImages(classes, train, size, channels, split=0),
        val=SyntheticImages(classes, val, size, channels, split=1),
        classes=[f"class_{i}" for i in range(classes)],
        channels=channels,
        img_size=size,
        train_transform=None,
        eval_transform=None,
        in_memory=True,
    )


def _digits(size: int, channels: int) -> DataSplits:
    """scikit-learn's 1797 bundled 8x8 digits, split 80/20 (stratified, fixed), upsampled to `size`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION, random_state=0, stratify=bunch.target
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = F.interpolate((images - mean) / std, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, channels, -1, -1).contiguous()
    return DataSplits(
        name="digits",
        train=TensorImages(images[train_idx], labels[train_idx]),
        val=TensorImages(images[val_idx], labels[val_idx]),
        classes=[str(d) for d in range(10)],
        channels=channels,
        img_size=size,
        train_transform=TensorTrainTransform(size),
        eval_transform=None,
        in_memory=True,
    )


# ---------------------------------------------------------------------------------------------
# Directories (ImageFolder layout)


class FolderImages:
    """Image files read with Pillow on demand, converted to RGB or grayscale (see `open_image`)."""

    def __init__(self, samples: list[tuple[str, int]], channels: int) -> None:
        self.samples, self.channels = samples, channels

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return open_image(path, self.channels), label


#: Integer modes with more than 8 bits: the full scale of the values they hold.
_WIDE_INTEGER_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def open_image(path: str, channels: int) -> Image.Image:
    """An image file as 8-bit RGB (channels=3) or L (channels=1), whatever its Pillow mode.

    Pillow's own `convert` clips wide modes instead of scaling them: a 16-bit PNG ("I;16") came out
    almost all white and a float TIFF in [0, 1] all black. Here 16-bit (and 32-bit integer images
    holding 16-bit values) scale by 65535 and float images in [0, 1] by 255; a mode or range that
    has no unambiguous 8-bit reading is refused, naming the file, rather than trained on silently.
    """
    target, mode = "RGB" if channels == 3 else "L", "?"
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in _WIDE_INTEGER_SCALE or mode == "F":
                return _wide_to_8bit(image, path).convert(target)
            return image.convert(target)
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(f"image {path} is too large to decode safely ({error}); downscale it") from None
    except ValueError as error:  # a mode Pillow cannot convert (e.g. LAB to L)
        raise DataError(f"cannot convert image {path} (mode {mode}) to {target}: {error}") from None
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def _wide_to_8bit(image: Image.Image, path: str) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(values).all() and low >= 0.0 and high <= 1.0):
            raise DataError(
                f"image {path} is a floating-point image with values in [{low:g}, {high:g}]; only float images in "
                "[0, 1] have an unambiguous 8-bit reading: rescale it or save it as 8- or 16-bit"
            )
        scale = 1.0
    else:
        scale = _WIDE_INTEGER_SCALE[image.mode]
        if low < 0 or high > scale:
            raise DataError(
                f"image {path} is a {image.mode} integer image with values in [{low:g}, {high:g}], outside the "
                f"16-bit range [0, {scale}]; save it as an 8- or 16-bit image"
            )
    return Image.fromarray(np.round(values * (255.0 / scale)).astype(np.uint8), mode="L")


def _check_image(path: str) -> None:
    """Open the header (cheap): catches files that are not images before any run starts."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - parsing the header is the point
    except Image.DecompressionBombError as error:
        raise DataError(f"image {path} is too large to decode safely ({error}); downscale or remove it") from None
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"unreadable image {path}: {error}\nremove or replace the file") from None


def _class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir} is missing: a data directory needs train/ and val/, each with one folder per class"
        )
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class name>/")
    return classes


def _scan_split(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = []
        # Symlinked folders are followed, but each real folder is read once: a link back up the tree
        # (`ln -s .. cat/loop`) made os.walk list the same images dozens of times.
        visited: dict[str, str] = {}
        for folder, subdirs, names in os.walk(class_dir, followlinks=True):
            real = os.path.realpath(folder)
            if real in visited:
                raise DataError(
                    f"{folder} is the folder {visited[real]} again (through a symbolic link): its images would be "
                    "counted more than once; remove the link"
                )
            visited[real] = folder
            subdirs.sort()
            files.extend(os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(
                f"class folder {class_dir} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        for path in files:
            _check_image(path)
        samples.extend((path, label) for path in files)
    return samples


def _folder(root: Path, size: int, channels: int) -> DataSplits:
    classes = _class_folders(root / "train")
    train = _scan_split(root / "train", classes)
    val_classes = _class_folders(root / "val")
    if val_classes != classes:
        missing, extra = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        parts = [f"missing in val/: {', '.join(missing)}"] if missing else []
        parts += [f"only in val/: {', '.join(extra)}"] if extra else []
        detail = "; ".join(parts)
        raise DataError(f"{root}: train/ and val/ must hold the same class folders ({detail})")
    mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)
    std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)
    return DataSplits(
        name=str(root),
        train=FolderImages(train, channels),
        val=FolderImages(_scan_split(root / "val", classes), channels),
        classes=classes,
        channels=channels,
        img_size=size,
        train_transform=PilTrainTransform(size, mean, std),
        eval_transform=PilEvalTransform(size, mean, std),
        in_memory=False,
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def _synthetic_options(text: str) -> dict[str, int]:
    options = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        value = value.strip()
        if not (sep and key in options and value.isascii() and value.isdigit() and len(value) <= 9) or int(value) < 1:
            raise DataError(
                f"bad synthetic option {item!r}: use positive integers (at most 100,000,000) for "
                f"{', '.join(options)}, e.g. synthetic:classes=4,train=64,val=32"
            )
        options[key] = int(value)
    if options["classes"] < 2:
        raise DataError("synthetic data needs classes >= 2")
    return options


def default_img_size(source: str) -> int:
    """The image size a source trains at when --img-size is not given."""
    return 32 if source == "digits" or source.split(":", 1)[0] == "synthetic" else 224


def load_data(source: str, img_size: int | None = None, channels: int = 3) -> DataSplits:
    """Resolve and validate a data source (see SOURCE_FORMS); raises DataError on any problem."""
    if not source.strip():
        raise DataError(f"--data is empty; use {SOURCE_FORMS}")
    size = img_size or default_img_size(source)
    kind, _, options = source.partition(":")
    if kind == "synthetic":
        return _synthetic(_synthetic_options(options), size, channels)
    if source == "digits":
        return _digits(size, channels)
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"data source {source!r} is not a known source nor an existing directory; use {SOURCE_FORMS}")
    if not root.is_dir():
        raise DataError(f"data source {source!r} is a file; use {SOURCE_FORMS}")
    return _folder(root, size, channels)


def default_workers(data: DataSplits) -> int:
    """In-memory sets are faster without worker processes; decoding files is not."""
    return 0 if data.in_memory else min(2, os.cpu_count() or 1)
