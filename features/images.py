"""Decode any image file into RGB uint8 pixels, or fail with one ImageError naming the file and the reason.

Handles EXIF orientation, greyscale / palette / alpha / CMYK / 16-bit modes, animated files (first frame) and very
large images. Images whose long side exceeds `max_side` are downscaled while decoding; `LoadedImage` keeps the
original (oriented) size and the scale, so boxes stay in ORIGINAL pixels downstream. Images above `max_pixels`
(decompression bombs) are refused before decoding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from features.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
MAX_SIDE = 4096  # long side after decoding; detectors resize further (BUTD to <= 1000)
MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS)
DECODE_MARGIN = 2.0  # decode at this multiple of the detector's input size; the detector's own resize does the rest


@dataclass
class LoadedImage:
    """Decoded pixels [h, w, 3] uint8 RGB and the original size (H, W) they were scaled from (`scale` = h / H)."""

    pixels: np.ndarray
    original_hw: tuple[int, int]

    @property
    def scale(self) -> float:
        return max(self.pixels.shape[:2]) / max(self.original_hw)


def read_image(path: str | os.PathLike, max_side: int | None = MAX_SIDE, max_pixels: int = MAX_PIXELS,
               input_scale: Callable[[int, int], float] | None = None) -> LoadedImage:
    """Decode `path` to RGB, oriented as EXIF says, long side at most `max_side` (None: never downscale).

    `input_scale(height, width)`: the factor a detector will resize the image by; the image is then decoded at no
    more than twice that size (JPEG: decoded reduced by Pillow's draft mode, never at full size), which bounds the
    memory of a huge image by what the detector needs.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(f"{path}: empty file")
    except OSError as error:
        raise ImageError(f"{path}: cannot read ({error.strerror or error})") from error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _decode(path, image, max_side, max_pixels, input_scale)
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError(f"{path}: not an image (unrecognised format)") from error
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: too large to decode safely ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{path}: corrupt or truncated image data ({error})") from error


def load_image(path: str | os.PathLike, max_side: int | None = MAX_SIDE) -> np.ndarray:
    """RGB uint8 pixels [H, W, 3] of an image file (see `read_image`)."""
    return read_image(path, max_side).pixels


def _decode(path: str, image: Image.Image, max_side: int | None, max_pixels: int,
            input_scale: Callable[[int, int], float] | None = None) -> LoadedImage:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{path}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{path}: {width}x{height} pixels exceeds the limit of {max_pixels} (decompression bomb?)")
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    long_side = max(width, height)
    scale = 1.0 if max_side is None or long_side <= max_side else max_side / long_side
    if input_scale is not None:  # the detector's resize rules are symmetric in height and width
        scale = min(scale, DECODE_MARGIN * input_scale(height, width))
    if scale < 1.0 and image.format == "JPEG":
        image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))  # decode at 1/2, 1/4, 1/8
    image.load()
    image = _oriented(image)
    original_hw = _oriented_size(image, height, width)
    image = _to_rgb(image)
    if scale < 1.0:
        target = (max(1, round(original_hw[1] * scale)), max(1, round(original_hw[0] * scale)))
        if image.size != target:
            image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    pixels = np.array(image, dtype=np.uint8)  # a writable copy
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageError(f"{path}: decoded to an unexpected shape {pixels.shape}")
    return LoadedImage(pixels, original_hw)


def _oriented(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):  # damaged EXIF: keep the stored orientation
        return image


def _oriented_size(image: Image.Image, height: int, width: int) -> tuple[int, int]:
    """Original (H, W) after orientation: swapped when EXIF rotated the image by 90 degrees."""
    w, h = image.size
    return (height, width) if (w >= h) == (width >= height) else (width, height)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) > 255:  # 16-bit data: map 0..65535 onto 0..255
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
