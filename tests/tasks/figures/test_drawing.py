"""The pictures of single-example predictions read well at any input size (tasks/figures/drawing.py)."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from features.images import LoadedImage
from tasks.figures.drawing import CHOSEN_COLOUR, MIN_WIDTH, draw_boxes, draw_pictures, wrap


def _loaded(hw, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    return LoadedImage(pixels=pixels, original_hw=hw)


def test_a_small_image_is_scaled_up_and_a_large_one_keeps_its_size():
    small = draw_boxes(_loaded((48, 64)), np.array([[8, 8, 40, 40]]), [8, 8, 40, 40], "Q: what color A: red")
    assert small.size[0] == MIN_WIDTH and small.size[1] > 48 * MIN_WIDTH / 64  # the text band below the image
    assert small.getpixel((round(8 * 10) + 1, round(24 * 10))) == CHOSEN_COLOUR  # the chosen box, scaled x10
    large = draw_boxes(_loaded((700, 1200)), np.zeros((0, 4)), None, "")
    assert large.size == (1200, 700)


def test_long_text_wraps_onto_more_lines_and_is_never_cut():
    short = draw_boxes(_loaded((64, 64)), np.zeros((0, 4)), None, "Q: what color")
    text = "Q: what color is the small circle to the left of the large purple triangle  A: red (0.93)"
    long = draw_boxes(_loaded((64, 64)), np.zeros((0, 4)), None, text)
    assert long.size[0] == short.size[0] and long.size[1] > short.size[1]
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default(size=20)
    lines = wrap(text + " " + "x" * 80, draw, font, 300)
    assert " ".join(lines).replace(" ", "") == (text + "x" * 80).replace(" ", "")  # every character kept
    assert all(draw.textlength(line, font=font) <= 300 for line in lines) and len(lines) > 3


def test_two_images_stand_side_by_side_at_one_height():
    drawn = draw_pictures([(_loaded((80, 100)), np.zeros((0, 4))), (_loaded((40, 60), 1), np.zeros((0, 4)))],
                          None, "the left image has more circles")
    # at height 80 the right image is 120 wide: 100 + 8 + 120 = 228 px scaled to 640
    assert drawn.size[0] == MIN_WIDTH
    image_height = round(80 * MIN_WIDTH / 228)
    pixels = np.asarray(drawn)
    assert pixels[:image_height, -5:].std() > 10  # the right image reaches the bottom of the image row
    assert (pixels[image_height + 2:, :].reshape(-1, 3) == 0).mean() > 0.5  # then the dark text band
