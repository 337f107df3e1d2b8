"""The 12-in-1 task metrics against hand-computed cases (missing predictions count as wrong)."""

import pytest

from tasks.metrics import (
    accuracy,
    gqa_accuracy,
    grounding_accuracy,
    nlvr2_scores,
    nlvr2_sentence_key,
    vcr_scores,
)


def test_gqa_accuracy_is_exact_match_over_every_question():
    gold = {"1": "yes", "2": "left", "3": "red", "4": "metal"}
    predictions = {"1": "yes", "2": "right", "3": " red "}  # "4" has no prediction: wrong
    assert gqa_accuracy(predictions, gold) == pytest.approx(50.0)
    assert gqa_accuracy({"1": "Yes"}, {"1": "yes"}) == 0.0  # no normalisation beyond whitespace
    with pytest.raises(KeyError, match="question '9'"):
        gqa_accuracy({"9": "yes"}, gold)
    with pytest.raises(ValueError, match="empty split"):
        gqa_accuracy({}, {})


def test_accuracy_counts_missing_items_as_wrong():
    assert accuracy({"a": 2, "b": 0}, {"a": 2, "b": 1, "c": 0}) == pytest.approx(100 / 3)
    assert accuracy({1: True}, {1: True}) == 100.0


def test_nlvr2_consistency_groups_by_sentence():
    assert nlvr2_sentence_key("dev-850-0-1") == "dev-850-1"
    gold = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-0": True,  # sentence dev-1-0: three pairs
            "dev-1-0-1": False, "dev-1-1-1": False,  # sentence dev-1-1: two pairs
            "dev-2-0-0": True}  # sentence dev-2-0: one pair
    predictions = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-0": False,  # one wrong: inconsistent
                   "dev-1-0-1": False, "dev-1-1-1": False,  # all right
                   }  # dev-2-0-0 missing: wrong
    scores = nlvr2_scores(predictions, gold)
    assert scores["accuracy"] == pytest.approx(100 * 4 / 6)
    assert scores["consistency"] == pytest.approx(100 * 1 / 3)
    with pytest.raises(ValueError, match="split-set-pair-sentence"):
        nlvr2_sentence_key("dev-1")


def test_vcr_q_ar_needs_both_right():
    gold_a = {"val-0": 0, "val-1": 1, "val-2": 2, "val-3": 3}
    gold_r = {"val-0": 1, "val-1": 1, "val-2": 0, "val-3": 3}
    answers = {"val-0": 0, "val-1": 1, "val-2": 3, "val-3": 3}  # 3 of 4
    rationales = {"val-0": 1, "val-1": 2, "val-2": 0}  # 2 of 4 (val-3 missing)
    scores = vcr_scores(answers, rationales, gold_a, gold_r)
    assert scores == pytest.approx({"q_a": 75.0, "qa_r": 50.0, "q_ar": 25.0})  # only val-0 has both


def test_grounding_accuracy_takes_any_gold_box_at_iou_half():
    gold = {"p1": [0, 0, 10, 10], "p2": [[0, 0, 10, 10], [20, 20, 30, 30]], "p3": [0, 0, 10, 10], "p4": [0, 0, 4, 4]}
    predictions = {"p1": [0, 0, 10, 5],  # IoU exactly 0.5: a hit
                   "p2": [20, 20, 30, 31],  # matches the second gold box
                   "p3": [0, 0, 10, 4.9]}  # IoU 0.49: a miss; p4 missing: a miss
    assert grounding_accuracy(predictions, gold) == pytest.approx(50.0)
