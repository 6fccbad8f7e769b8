"""Images are read as a viewer shows them (pipeline/datasets/base.py read_rgb, shared by the datasets and predict):
greyscale, binary, palette, 16-bit and EXIF-rotated files, each generated here and checked pixel by pixel against
what it holds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets.base import read_rgb
from pipeline.errors import UserError
from stages.predict import read_image

H, W = 6, 10


def ramp(high: int) -> np.ndarray:
    """(H, W) values from 0 to `high` (both reached), different in every pixel."""
    return np.round(np.linspace(0, high, H * W)).reshape(H, W)


def rgb_of(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


@pytest.mark.parametrize("reader", [read_rgb, read_image])
def test_greyscale_binary_and_palette_become_the_rgb_a_viewer_shows(tmp_path, reader):
    grey = ramp(255).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(grey, "L").save(tmp_path / "grey.jpg", quality=100)
    bits = (np.arange(H * W).reshape(H, W) % 3 == 0)
    Image.fromarray(bits).convert("1").save(tmp_path / "binary.png")
    palette = np.array([[255, 0, 0], [0, 128, 255], [10, 20, 30]], np.uint8)
    index = (np.arange(H * W).reshape(H, W) % 3).astype(np.uint8)
    paletted = Image.fromarray(index, "P")
    paletted.putpalette(palette.flatten().tolist() + [0] * (768 - palette.size))
    paletted.save(tmp_path / "palette.png")

    np.testing.assert_array_equal(reader(tmp_path / "grey.png"), rgb_of(grey))
    jpeg = reader(tmp_path / "grey.jpg")
    assert jpeg.shape == (H, W, 3) and (jpeg[..., 0] == jpeg[..., 1]).all() and np.abs(
        jpeg[..., 0].astype(int) - grey).max() <= 3  # JPEG rounding only, the channels replicated
    np.testing.assert_array_equal(reader(tmp_path / "binary.png"), rgb_of(np.where(bits, 255, 0).astype(np.uint8)))
    np.testing.assert_array_equal(reader(tmp_path / "palette.png"), palette[index])


def test_16_bit_grey_is_scaled_to_the_nearest_8_bit_value(tmp_path):
    deep = ramp(65535).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # a 16-bit grey PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    expected = np.rint(deep.astype(np.float64) * 255 / 65535).astype(np.uint8)
    got = read_rgb(tmp_path / "deep.png")
    np.testing.assert_array_equal(got, rgb_of(expected))
    assert got[0, 0].tolist() == [0, 0, 0] and got[-1, -1].tolist() == [255, 255, 255]  # not clipped, not wrapped


def test_alpha_is_dropped_and_colour_kept(tmp_path):
    rgba = np.dstack([ramp(255), ramp(255)[::-1], np.full((H, W), 7), ramp(200)]).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), rgba[..., :3])


@pytest.mark.parametrize("orientation,turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                              (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                              (2, lambda a: a[:, ::-1])])
def test_the_exif_orientation_is_applied(tmp_path, orientation, turn):
    """A camera's portrait photo is stored landscape with an orientation tag: read upright, as a viewer shows it."""
    stored = np.zeros((H, W, 3), np.uint8)
    stored[0, 0] = [255, 0, 0]  # one red corner pixel, the rest black: where it lands says how it was turned
    stored[H - 1, 0] = [0, 255, 0]
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "photo.png", exif=exif)
    got = read_rgb(tmp_path / "photo.png")
    np.testing.assert_array_equal(got, turn(stored))
    assert got.shape[:2] == ((W, H) if orientation in (6, 8) else (H, W))


def test_an_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        read_image(tmp_path / "broken.png")
