"""Images in every Pillow mode read correctly or are refused by name; oversized images are clear errors (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from overlock.training.data import load_data, open_image
from overlock.training.errors import DataError

GRADIENT = np.linspace(0.0, 1.0, 48 * 48).reshape(48, 48)


def as_array(path, channels=1) -> np.ndarray:
    return np.asarray(open_image(str(path), channels), dtype=np.float64)


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.round(GRADIENT * 65535).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    got = as_array(path)
    assert np.abs(got - GRADIENT * 255).max() <= 1.0
    assert (got == 255).mean() < 0.01  # Pillow's own convert put 99.6% of such pixels at 255


def test_a_float_tiff_in_0_1_is_scaled_not_zeroed(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(GRADIENT.astype(np.float32), mode="F").save(path)
    got = as_array(path, channels=3)
    assert got.shape == (48, 48, 3)
    assert np.abs(got[..., 0] - GRADIENT * 255).max() <= 1.0


@pytest.mark.parametrize(("values", "words"), [(GRADIENT * 1000, "values in [0, 1000]"), (GRADIENT - 0.5, "[-0.5")])
def test_a_float_image_outside_0_1_is_refused_by_name(tmp_path, values, words):
    path = tmp_path / "odd.tif"
    Image.fromarray(values.astype(np.float32), mode="F").save(path)
    with pytest.raises(DataError, match="odd.tif") as info:
        open_image(str(path), 3)
    assert words in str(info.value)


def test_a_32_bit_integer_image_beyond_16_bits_is_refused(tmp_path):
    path = tmp_path / "big.tif"
    Image.fromarray((GRADIENT * 1_000_000).astype(np.int32), mode="I").save(path)
    with pytest.raises(DataError, match="outside the 16-bit range"):
        open_image(str(path), 1)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK"])
def test_ordinary_modes_still_convert_as_pillow_does(tmp_path, mode):
    source = Image.fromarray(np.round(GRADIENT * 255).astype(np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    source.save(path)
    assert np.array_equal(as_array(path, 3), np.asarray(source.convert("RGB"), dtype=np.float64))


def test_a_decompression_bomb_is_a_data_error_when_scanned_and_when_loaded(tmp_path, monkeypatch):
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "ok.png")
    big = tmp_path / "train" / "a" / "big.png"
    Image.new("L", (100, 100)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels > 2x the limit: Pillow refuses
    with pytest.raises(DataError, match="big.png.*too large"):
        load_data(str(tmp_path), 32)
    with pytest.raises(DataError, match="big.png.*too large"):
        open_image(str(big), 3)
