"""The detector's held-out scores: PASCAL VOC average precision at IoU 0.5 and the operating rule's precision and
recall, on hand-made detections whose right values are known."""

import numpy as np
import pytest

from features.detector_training import (
    DetectionSample,
    TrainingSettings,
    average_precision,
    precision_recall,
    step_images,
)

BOXES = np.array([[10, 10, 40, 40], [60, 60, 100, 100]], np.float32)
SAMPLES = [DetectionSample("a", "", BOXES, np.array([1, 2])), DetectionSample("b", "", BOXES[:1], np.array([1]))]


def _detections(*per_image):
    return [{"boxes": np.array([d[0] for d in dets], np.float32).reshape(-1, 4),
             "labels": np.array([d[1] for d in dets]), "scores": np.array([d[2] for d in dets])}
            for dets in per_image]


def test_perfect_detections_score_one_and_nothing_scores_zero():
    perfect = _detections([(BOXES[0], 1, 0.9), (BOXES[1], 2, 0.8)], [(BOXES[0], 1, 0.7)])
    assert average_precision(perfect, SAMPLES)["map"] == 1.0
    assert precision_recall(perfect, SAMPLES) == {"precision": 1.0, "recall": 1.0, "images_exact": 1.0}
    assert average_precision(_detections([], []), SAMPLES)["map"] == 0.0


def test_a_wrong_class_a_misplaced_box_and_a_duplicate_cost_what_they_should():
    # class 1: image a's box found (0.9), image b's box found only by a box of IoU < 0.5 (0.8): AP 0.5
    # class 2: the hit (0.95), then a duplicate of it (0.6): a false positive after full recall, so AP stays 1
    detections = _detections([(BOXES[0], 1, 0.9), (BOXES[1], 2, 0.95), (BOXES[1], 2, 0.6)],
                             [(BOXES[0] + [0, 20, 0, 20], 1, 0.8)])
    ap = average_precision(detections, SAMPLES)
    assert ap["per_class"][1] == pytest.approx(0.5)
    assert ap["per_class"][2] == pytest.approx(1.0)
    wrong_class = _detections([(BOXES[0], 2, 0.9), (BOXES[1], 2, 0.8)], [(BOXES[0], 1, 0.7)])
    assert average_precision(wrong_class, SAMPLES)["per_class"][1] == pytest.approx(0.5)
    counts = precision_recall(detections, SAMPLES)
    assert counts["precision"] == pytest.approx(2 / 4) and counts["recall"] == pytest.approx(2 / 3)
    assert counts["images_exact"] == 0.0


def test_steps_take_consecutive_slices_of_a_seeded_permutation_per_epoch():
    settings = TrainingSettings(batch_size=4, seed=3)
    epoch = [i for step in range(5) for i in step_images(settings, step, 20)]
    assert sorted(epoch) == list(range(20))  # one epoch sees every image once
    assert step_images(settings, 5, 20) != step_images(settings, 0, 20)  # the next epoch is reshuffled
    assert step_images(settings, 7, 20) == step_images(TrainingSettings(batch_size=4, seed=3), 7, 20)
