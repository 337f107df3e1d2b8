"""The shapes-world detector's boxes stay inside each image's own size, whatever the batch is padded to."""

import numpy as np
import pytest
import torch

from features.detector import pad_batch
from features.detectors import build_detector
from tests.fixtures.tiny_detector import save_random_shapes_detector

# none a multiple of the trunk's stride (16) before or after scaling to the detection short side (96)
SIZES = [(75, 101), (130, 47), (61, 61)]


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    directory = save_random_shapes_detector(tmp_path_factory.mktemp("shapes") / "detector")
    torch.manual_seed(0)  # the random trunk
    # every proposal kept (no NMS, up to the RPN's 30), so those clipped at the image's edges are among them
    return build_detector("shapes", weights=str(directory), random_trunk=True, nms_threshold=1.0,
                          max_nms_threshold=1.0, max_boxes=30)


def _batch(detector):
    rng = np.random.default_rng(0)
    prepared = [detector.prepare(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for hw in SIZES]
    return pad_batch(prepared), prepared


def test_detected_boxes_stay_inside_each_image_of_a_batch_of_other_sizes(detector):
    pixels, prepared = _batch(detector)
    assert pixels.shape[2:] == (130, 101)  # every image is padded past its own size on some side
    for (h, w), regions in zip(SIZES, detector(pixels, prepared), strict=True):
        boxes = regions.boxes
        assert 1 <= len(boxes) <= 30
        assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all(), (h, w, boxes)
        assert (boxes[:, 2:] >= boxes[:, :2]).all()


def test_given_boxes_are_kept_as_given_in_a_batch_of_other_sizes(detector):
    pixels, prepared = _batch(detector)
    given = [torch.tensor([[0.0, 0.0, w, h], [3.5, 2.0, w / 2, h / 3]]) for h, w in SIZES]
    for boxes, regions in zip(given, detector(pixels, prepared, given), strict=True):
        torch.testing.assert_close(regions.boxes, boxes)
        assert regions.features.shape == (2, 96) and regions.cls_prob.shape == (2, 3)
