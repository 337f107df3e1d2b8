"""Pictures of single-example predictions: the regions thin, the chosen one thick, the answer in a band below.

Every task's `draw` (see tasks/engine/task.py) is this picture with its own box and text. Whatever the input size,
the picture reads well: a small image is scaled up so the picture is at least `MIN_WIDTH` pixels wide (a large one
keeps its size), the text's font grows with the picture's width and the text wraps onto as many lines as it needs
(never cut). Two images (NLVR2) stand side by side at one height. Boxes are given in original pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from features.images import LoadedImage

REGION_COLOUR = (0, 200, 255)
CHOSEN_COLOUR = (255, 40, 40)
MIN_WIDTH = 640  # pixels: smaller pictures are scaled up to this width
GAP = 8  # pixels between two pictures, at MIN_WIDTH
CHARS_PER_LINE = 48  # the font is sized so that about this many characters fill the picture's width


def original_picture(loaded: LoadedImage) -> Image.Image:
    """The decoded image at its original size (a downscaled decode is scaled back)."""
    height, width = loaded.original_hw
    image = Image.fromarray(loaded.pixels).convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return image


def wrap(text: str, draw: ImageDraw.ImageDraw, font, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels: broken at spaces, a word too long for a line at characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:  # a word wider than a line: cut it where it must be
                if line and draw.textlength(line + char, font=font) > width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def draw_pictures(pictures: Sequence[tuple[LoadedImage, np.ndarray]], chosen: Sequence[float] | None,
                  text: str) -> Image.Image:
    """Each (image, boxes [K, 4]) side by side at one height, boxes thin, `chosen` (x1 y1 x2 y2 on the first
    image) thick, and `text` wrapped in a dark band below."""
    originals = [original_picture(image) for image, _ in pictures]
    height = max(p.height for p in originals)
    fits = [height / p.height for p in originals]  # each picture to the common height
    natural = sum(p.width * f for p, f in zip(originals, fits, strict=True))
    scale = max(1.0, MIN_WIDTH / (natural + GAP * (len(originals) - 1)))
    gap = round(GAP * scale) if len(originals) > 1 else 0
    widths = [max(1, round(p.width * f * scale)) for p, f in zip(originals, fits, strict=True)]
    widths[-1] = max(1, round((natural + GAP * (len(originals) - 1)) * scale) - sum(widths[:-1])
                     - gap * (len(widths) - 1))  # the rounding goes to the last picture: MIN_WIDTH exactly
    sizes = [(w, max(1, round(height * scale))) for w in widths]
    width = sum(widths) + gap * (len(sizes) - 1)
    thin = max(1, round(width / 400))
    font = ImageFont.load_default(size=max(14, round(width / CHARS_PER_LINE * 1.8)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(6, round(font.size / 2))
    lines = wrap(text, measure, font, width - 2 * margin) if text else []
    line_height = round(font.size * 1.25)
    band = len(lines) * line_height + 2 * margin if lines else 0
    canvas = Image.new("RGB", (width, sizes[0][1] + band), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for index, (picture, (_, boxes), (w, h)) in enumerate(zip(originals, pictures, sizes, strict=True)):
        canvas.paste(picture.resize((w, h), Image.Resampling.BILINEAR), (x, 0))
        sx, sy = w / picture.width, h / picture.height
        factor = np.array([sx, sy, sx, sy], dtype=np.float32)
        shift = np.array([x, 0, x, 0], dtype=np.float32)
        for box in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
            draw.rectangle((box * factor + shift).tolist(), outline=REGION_COLOUR, width=thin)
        if chosen is not None and index == 0:
            draw.rectangle((np.asarray(chosen, dtype=np.float32) * factor + shift).tolist(), outline=CHOSEN_COLOUR,
                           width=3 * thin + 1)
        x += w + gap
    for number, line in enumerate(lines):
        draw.text((margin, sizes[0][1] + margin + number * line_height), line, fill=(255, 255, 0), font=font)
    return canvas


def draw_boxes(loaded: LoadedImage, boxes: np.ndarray, chosen: Sequence[float] | None, text: str) -> Image.Image:
    """One image: `boxes` [K, 4] thin, `chosen` (x1 y1 x2 y2) thick, `text` below (see `draw_pictures`)."""
    return draw_pictures([(loaded, boxes)], chosen, text)
