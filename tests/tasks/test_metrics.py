"""The task metrics against worked examples of the official rules and hand-computed cases (missing predictions count
as wrong)."""

import math

import pytest
import torch

from tasks.metrics import (
    accuracy,
    box_iou,
    gqa_accuracy,
    grounding_accuracy,
    nlvr2_scores,
    nlvr2_sentence_key,
    normalize_answer,
    paired_box_iou,
    recall_at_k,
    refexp_accuracy,
    retrieval_ranks,
    soft_score,
    vcr_scores,
    vqa_accuracy,
    vqa_score,
    xywh_to_xyxy,
)

# ---------------------------------------------------------------- VQA answer normalisation, one rule per example


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("\tyes \n", "yes"),  # tabs/newlines become spaces, then strip
        ("Yes", "yes"),  # lower-case
        ("yes, it is", "yes it is"),  # a mark touching a space is deleted
        ("what? no", "what no"),  # (before a space too)
        ("black/white", "black white"),  # a mark touching no space becomes a space
        ("t-shirt", "t shirt"),
        ("2,000", "2000"),  # comma between digits: marks are deleted, not spaced
        ("10,000/year", "10000year"),  # ... every mark of such an answer, even away from the digits
        ("end.", "end"),  # a period not followed by a digit is deleted
        ("u.s.a.", "usa"),
        ("3.5", "3.5"),  # a decimal point stays
        (".5", ".5"),
        ("two", "2"),  # number words become digits
        ("none", "0"),
        ("Ten", "10"),
        ("a dog", "dog"),  # articles are dropped
        ("an apple", "apple"),
        ("the cat", "cat"),
        ("there", "there"),  # ... only as whole words
        ("dont", "don't"),  # contractions are restored from the official table
        ("isnt", "isn't"),
        ("thats right", "that's right"),
        ("don't", "don't"),  # an apostrophe is not punctuation
        ("The Two dogs!", "2 dogs"),  # all rules together
        ("  many   spaces ", "many spaces"),
    ],
)
def test_normalize_answer_applies_each_official_rule(raw, normalised):
    assert normalize_answer(raw) == normalised


# ---------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_ten_leave_one_out_subsets(matching, expected):
    humans = ["red"] * matching + ["blue", "green", "pink", "grey", "white", "black", "brown", "teal", "gold", "tan"][
        : 10 - matching
    ]
    assert vqa_accuracy("red", humans) == pytest.approx(expected)


def test_vqa_accuracy_worked_leave_one_out_example():
    # 3 of 10 humans said "2": dropping one of those 3 leaves 2 matches (2/3); dropping any of the 7 others
    # leaves 3 matches (1). Mean = (3 * 2/3 + 7 * 1) / 10 = 0.9.
    humans = ["2", "2", "2", "3", "3", "3", "3", "4", "4", "5"]
    assert vqa_accuracy("2", humans) == pytest.approx(0.9)
    assert vqa_accuracy("3", humans) == pytest.approx(1.0)
    assert vqa_accuracy("4", humans) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)


def test_vqa_accuracy_normalises_both_sides_when_humans_disagree():
    humans = ["two", "2", "2 ", "Two.", "three", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("The two", humans) == pytest.approx(1.0)


def test_unanimous_humans_compare_without_normalisation_as_official():
    # The official script normalises only when the humans disagree among themselves.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0


def test_vqa_accuracy_rejects_empty_human_answers():
    with pytest.raises(ValueError, match="human answer"):
        vqa_accuracy("yes", [])


def _annotation(question_id, answer_type, answers, question_type="what is"):
    return {
        "question_id": question_id,
        "image_id": 1,
        "answer_type": answer_type,
        "question_type": question_type,
        "multiple_choice_answer": answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


def test_vqa_score_reports_overall_and_per_answer_type_percentages():
    annotations = [
        _annotation(1, "yes/no", ["yes"] * 10, "is the"),
        _annotation(2, "number", ["2"] * 2 + ["3"] * 8, "how many"),
        _annotation(3, "other", ["red"] * 10),
        _annotation(4, "other", ["blue"] * 10),  # not predicted: not scored
    ]
    predictions = [
        {"question_id": 1, "answer": "yes"},  # 1.0
        {"question_id": 2, "answer": "two"},  # 0.6 after normalisation
        {"question_id": 3, "answer": "green"},  # 0.0
    ]
    result = vqa_score(predictions, annotations)
    assert result["num_questions"] == 3
    assert result["overall"] == pytest.approx(100 * 1.6 / 3)
    assert result["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 0.0})
    assert result["per_question_type"]["how many"] == pytest.approx(60.0)
    assert vqa_score({1: "no"}, annotations)["overall"] == 0.0


def test_vqa_score_names_a_prediction_without_annotation():
    with pytest.raises(KeyError, match="question_id 99"):
        vqa_score([{"question_id": 99, "answer": "yes"}], [_annotation(1, "yes/no", ["yes"] * 10)])


@pytest.mark.parametrize(("count", "score"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_soft_score_steps(count, score):
    assert soft_score(count) == pytest.approx(score)


def test_soft_score_equals_vqa_accuracy_for_ten_annotators():
    for count in range(11):
        humans = ["x"] * count + [f"other{i}" for i in range(10 - count)]
        assert soft_score(count) == pytest.approx(vqa_accuracy("x", humans))


# ---------------------------------------------------------------- retrieval


def test_recall_counts_ties_against_the_positive():
    scores = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 3.0, 3.0]])
    ranks = retrieval_ranks(scores, [0, 0, 1])
    assert ranks.tolist() == [2, 0, 1]  # all tied -> last; clear winner -> 0; tie with one negative -> 1
    result = recall_at_k(scores, [0, 0, 1], ks=(1, 2, 3))
    assert result["r1"] == pytest.approx(100 / 3)
    assert result["r2"] == pytest.approx(200 / 3)
    assert result["r3"] == pytest.approx(100.0)
    assert result["median_rank"] == 2.0
    assert result["mean_rank"] == pytest.approx((3 + 1 + 2) / 3)


def test_recall_with_several_positives_uses_the_best_and_ignores_other_positives():
    scores = torch.tensor([[0.7, 0.9, 0.9, 0.1, 0.7]])
    assert retrieval_ranks(scores, [[1, 2]]).tolist() == [0]  # the two tied positives do not push each other
    assert retrieval_ranks(scores, [[3, 0]]).tolist() == [3]  # best positive 0.7: 0.9, 0.9 and the tied 0.7
    assert retrieval_ranks(scores, [[0, 4]]).tolist() == [2]  # tied positives; the negatives at 0.9 count
    assert retrieval_ranks(scores, [[3]]).tolist() == [4]


def test_recall_at_k_of_a_perfect_and_a_reversed_ranking():
    scores = torch.eye(20)
    assert recall_at_k(scores, list(range(20)))["r1"] == 100.0
    reversed_scores = -torch.eye(20)
    result = recall_at_k(reversed_scores, list(range(20)))
    assert result["r10"] == 0.0 and result["median_rank"] == 20.0


def test_recall_rejects_a_query_without_positive():
    with pytest.raises(ValueError, match="no positive"):
        retrieval_ranks(torch.zeros(1, 3), [[]])


# ---------------------------------------------------------------- boxes and referring expressions


def test_iou_of_touching_boxes_is_zero():
    assert box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[1.0, 0, 2, 1]])).item() == 0.0
    assert box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[1.0, 1, 2, 2]])).item() == 0.0


def test_iou_of_contained_box_is_area_ratio():
    assert box_iou(torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([[1.0, 1, 3, 3]])).item() == pytest.approx(0.25)


def test_iou_of_identical_boxes_is_one_and_matrix_shape():
    a = torch.tensor([[0.0, 0, 2, 2], [5.0, 5, 6, 7]])
    b = torch.tensor([[0.0, 0, 2, 2], [1.0, 0, 3, 2], [100.0, 100, 101, 101]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0].item() == 1.0
    assert iou[0, 1].item() == pytest.approx(2 / 6)
    assert torch.equal(paired_box_iou(a, b[:2]), torch.stack([iou[0, 0], iou[1, 1]]))


def test_iou_of_degenerate_boxes_is_zero_not_nan():
    point = torch.tensor([[1.0, 1, 1, 1]])
    line = torch.tensor([[0.0, 1, 4, 1]])
    inverted = torch.tensor([[3.0, 3, 1, 1]])
    for box in (point, line, inverted):
        iou = box_iou(box, box)
        assert not math.isnan(iou.item()) and iou.item() == 0.0
        assert box_iou(box, torch.tensor([[0.0, 0, 4, 4]])).item() == 0.0


def test_xywh_to_xyxy():
    assert xywh_to_xyxy(torch.tensor([[10.0, 20, 5, 7]])).tolist() == [[10.0, 20.0, 15.0, 27.0]]


def test_refexp_accuracy_counts_iou_equal_to_threshold():
    gt = torch.tensor([[0.0, 0, 2, 1], [0.0, 0, 2, 1], [0.0, 0, 2, 1]])
    pred = torch.tensor([[0.0, 0, 1, 1], [0.0, 0, 2, 1], [3.0, 3, 4, 4]])  # IoU 0.5, 1, 0
    assert refexp_accuracy(pred, gt) == pytest.approx(200 / 3)
    assert refexp_accuracy(pred, gt, threshold=0.51) == pytest.approx(100 / 3)

# ---------------------------------------------------------------- the 12-in-1 task metrics


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
