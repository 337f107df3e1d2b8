"""Image loading: every odd file becomes RGB uint8 in the right orientation, or one ImageError naming it."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from features.errors import ImageError
from features.images import load_image, read_image


def _rgb(h=20, w=30):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_is_returned_exactly(tmp_path):
    pixels = _rgb()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, pixels)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after rotating 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    loaded = read_image(tmp_path / "r.jpg")
    assert loaded.pixels.shape == (40, 20, 3) and loaded.original_hw == (40, 20)
    assert loaded.pixels[5, 10, 0] > 200 and loaded.pixels[35, 10, 0] < 60  # red is now on top


def test_greyscale_becomes_three_equal_channels(tmp_path):
    grey = np.arange(200, dtype=np.uint8).reshape(10, 20)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (10, 20, 3)
    np.testing.assert_array_equal(out[..., 1], grey)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_palette_image_is_expanded(tmp_path):
    image = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), np.asarray(image.convert("RGB")))


def test_palette_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    image.save(tmp_path / "t.gif", transparency=0)
    np.testing.assert_array_equal(load_image(tmp_path / "t.gif"), np.full((4, 4, 3), 255, np.uint8))


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black
    rgba[0, 1] = (0, 0, 0, 0)  # transparent
    rgba[1, 0] = (200, 0, 0, 128)  # half red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    assert abs(int(out[1, 0, 0]) - 227) <= 1 and abs(int(out[1, 0, 1]) - 127) <= 1


def test_cmyk_jpeg_is_converted(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red in CMYK
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (6, 8, 3)
    assert out[3, 4, 0] > 200 and out[3, 4, 1] < 60 and out[3, 4, 2] < 60


def test_16_bit_greyscale_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[..., 0], [[0, 100], [255, 7]])


def _png_rgb16(path, values):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = values.shape
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_rgb_png_is_converted(tmp_path):
    values = np.zeros((3, 4, 3), np.uint16)
    values[..., 0] = 65535
    values[..., 2] = 257 * 50
    _png_rgb16(tmp_path / "c16.png", values)
    out = load_image(tmp_path / "c16.png")
    assert out.shape == (3, 4, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all() and (abs(out[..., 2].astype(int) - 50) <= 1).all()


def test_huge_image_is_downscaled_and_keeps_its_original_size(tmp_path):
    Image.new("RGB", (3000, 40), (0, 128, 0)).save(tmp_path / "wide.png")
    loaded = read_image(tmp_path / "wide.png", max_side=600)
    assert loaded.pixels.shape == (8, 600, 3) and loaded.original_hw == (40, 3000)
    assert loaded.scale == pytest.approx(0.2)
    assert (loaded.pixels[..., 1] == 128).all()


def test_huge_jpeg_decodes_reduced_to_the_bound(tmp_path):
    Image.new("RGB", (2400, 1200), (0, 0, 255)).save(tmp_path / "big.jpg")
    loaded = read_image(tmp_path / "big.jpg", max_side=500)
    assert loaded.pixels.shape == (250, 500, 3) and loaded.original_hw == (1200, 2400)


def test_extreme_aspect_ratio_keeps_at_least_one_pixel(tmp_path):
    Image.new("RGB", (5000, 1), (9, 9, 9)).save(tmp_path / "line.png")
    loaded = read_image(tmp_path / "line.png", max_side=1000)
    assert loaded.pixels.shape == (1, 1000, 3) and loaded.original_hw == (1, 5000)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("L", (1000, 1000)).save(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match=r"bomb.png: 1000x1000 pixels exceeds the limit"):
        read_image(tmp_path / "bomb.png", max_pixels=500_000)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"this is a text file, not a picture\n" * 4, "not an image"),
    ],
)
def test_non_images_are_reported_with_path_and_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=f"{name}: {reason}"):
        load_image(tmp_path / name)


def test_truncated_jpeg_is_reported(tmp_path):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg: corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ImageError, match="gone.png: cannot read"):
        load_image(tmp_path / "gone.png")
