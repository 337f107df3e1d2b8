"""Visual input: IMG token first, 5-d locations, truncation, masks and padding."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tasks.data.regions import collate_visual, iou_matrix, masked_image_mean, visual_input


def make_regions(k, dim=4, hw=(100, 200)):
    rng = np.random.default_rng(k)
    x1 = rng.uniform(0, 100, k)
    y1 = rng.uniform(0, 50, k)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, 100, k), y1 + rng.uniform(1, 50, k)], 1).astype(np.float32)
    return SimpleNamespace(features=rng.normal(size=(k, dim)).astype(np.float32), boxes=boxes, image_hw=(hw[0], hw[1]))


def test_img_token_is_mean_of_all_boxes_before_truncation():
    regions = make_regions(10)
    v = visual_input(regions, max_regions=5)
    assert v.features.shape == (5, 4) and v.num_boxes == 4
    np.testing.assert_allclose(v.features[0], regions.features.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(v.features[1:], regions.features[:4])
    np.testing.assert_array_equal(v.locations[0], [0, 0, 1, 1, 1])


def test_locations_are_normalised_corners_and_area_fraction():
    regions = SimpleNamespace(features=np.ones((1, 2), np.float32),
                              boxes=np.array([[20, 10, 120, 60]], np.float32), image_hw=(100, 200))
    v = visual_input(regions, max_regions=37)
    np.testing.assert_allclose(v.locations[1], [0.1, 0.1, 0.6, 0.6, 100 * 50 / (200 * 100)], rtol=1e-6)


def test_collate_pads_features_locations_and_mask():
    batch = collate_visual([visual_input(make_regions(2), 37), visual_input(make_regions(5), 37)])
    assert batch["region_features"].shape == (2, 6, 4)
    assert batch["region_locations"].shape == (2, 6, 5)
    assert batch["region_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert torch.all(batch["region_features"][0, 3:] == 0)
    fixed = collate_visual([visual_input(make_regions(2), 37)], pad_to=37)
    assert fixed["region_features"].shape == (1, 37, 4)
    with pytest.raises(ValueError, match="pad_to"):
        collate_visual([visual_input(make_regions(5), 37)], pad_to=3)


def test_masked_image_mean_divides_by_regions_clear_of_masking():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60], [70, 70, 80, 80]], np.float32)
    features = np.ones((4, 3), np.float32)
    selected = np.array([True, False, False, False])
    masked = features.copy()
    masked[0] = 0
    # box 1 overlaps the masked box 0 with IoU 100/110 > 0.4: only boxes 2 and 3 count
    np.testing.assert_allclose(masked_image_mean(masked, boxes, selected), [1.5, 1.5, 1.5])
    np.testing.assert_allclose(masked_image_mean(features, boxes, np.zeros(4, bool)), [1, 1, 1])
    everything = np.ones(4, bool)
    np.testing.assert_allclose(masked_image_mean(np.zeros((4, 3), np.float32), boxes, everything), [0, 0, 0])


def test_box_iou_of_identical_boxes_is_one():
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], np.float32)
    iou = iou_matrix(boxes)
    np.testing.assert_allclose(np.diag(iou), 1)
    assert iou[0, 1] == pytest.approx(1 / 7)
