"""Pictures of single-image predictions: the regions thin, the chosen one thick, and one line of text on top.

Every task's `draw` (see tasks/engine/task.py) is this picture with its own box and text; the result has the
image's original size and its boxes are in original pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from features.images import LoadedImage

REGION_COLOUR = (0, 200, 255)
CHOSEN_COLOUR = (255, 40, 40)


def draw_boxes(loaded: LoadedImage, boxes: np.ndarray, chosen: Sequence[float] | None, text: str) -> Image.Image:
    """`boxes` [K, 4] thin, `chosen` (x1 y1 x2 y2) thick, `text` in a dark band at the top-left."""
    height, width = loaded.original_hw
    image = Image.fromarray(loaded.pixels)
    if image.size != (width, height):  # decoded downscaled: back to the original size
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    thin = max(1, round(min(width, height) / 400))
    for box in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        draw.rectangle([float(v) for v in box], outline=REGION_COLOUR, width=thin)
    if chosen is not None:
        draw.rectangle([float(v) for v in chosen], outline=CHOSEN_COLOUR, width=4 * thin)
    if text:
        font = ImageFont.load_default()
        left, top, right, bottom = draw.textbbox((4, 4), text, font=font)
        draw.rectangle([left - 3, top - 3, right + 3, bottom + 3], fill=(0, 0, 0))
        draw.text((4, 4), text, fill=(255, 255, 0), font=font)
    return image
