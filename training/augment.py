"""Image transforms: random resized crop + flip for training, resize + centre crop for evaluation.

Written here because torchvision is not a dependency. Randomness never comes from a global RNG:
every training sample draws from a numpy Generator seeded by (seed, epoch, index), so the
augmentation a sample gets does not depend on the number of loader workers, on the rank that
loads it, or on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Fraction of the resized image the evaluation centre crop keeps (timm/DeiT default).
EVAL_CROP_RATIO = 0.875


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one training sample in one epoch (independent of workers and ranks)."""
    return np.random.default_rng([seed, epoch, index])


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of the Inception-style random resized crop.

    Draws an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, retrying up to
    ten times for a box that fits; falls back to the largest centred box with a valid ratio.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, round(height * ratio[1])
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of a (C, H, W) tensor."""
    mean_t = torch.tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (mode L or RGB) as a float (C, H, W) tensor in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class PilTrainTransform:
    """Random resized crop (scale 0.08-1) + horizontal flip + normalisation, for photo folders."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        top, left, crop_h, crop_w = random_resized_crop_box(image.height, image.width, rng)
        box = (left, top, left + crop_w, top + crop_h)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(pil_to_tensor(image), self.mean, self.std)


class PilEvalTransform:
    """Resize the shorter side to size / crop ratio, centre crop `size`, normalise."""

    def __init__(
        self, size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = EVAL_CROP_RATIO
    ) -> None:
        self.size, self.mean, self.std, self.crop_ratio = size, tuple(mean), tuple(std), crop_ratio

    def __call__(self, image: Image.Image) -> torch.Tensor:
        short = math.floor(self.size / self.crop_ratio)
        scale = short / min(image.width, image.height)
        new_w, new_h = max(short, round(image.width * scale)), max(short, round(image.height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return normalize(pil_to_tensor(image), self.mean, self.std)


def resize_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) tensor to (C, size, size)."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


class TensorTrainTransform:
    """Mild random resized crop (scale 0.7-1, near-square) of an already resized tensor image.

    For small in-memory sets (digits) whose classes are not mirror-invariant: no flip, and crops
    large enough to keep the whole glyph recognisable.
    """

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.7, 1.0), ratio: tuple[float, float] = (0.85, 1.18)
    ) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        top, left, crop_h, crop_w = random_resized_crop_box(
            image.shape[-2], image.shape[-1], rng, self.scale, self.ratio
        )
        return resize_tensor(image[:, top : top + crop_h, left : left + crop_w], self.size)
