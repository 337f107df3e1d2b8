"""Inputs checked at the edge (issue 24, silently wrong): annotation ids, scores, configs, text lists, evaluation
splits and free text are refused in one line naming the file or option, never used wrong.
"""

from __future__ import annotations

import json

import pytest

from tasks.data.answer_labels import read_answer_list
from tasks.data.reference_files import read_image_ids
from tasks.errors import AnnotationError, ConfigError
from tasks.multitask import MemberConfig, MultiTaskConfig, MultiTaskSettings
from tasks.retrieval import read_karpathy
from tasks.vqa import read_questions
from tests.fixtures.cli_check import assert_refused

# ------------------------------------------------------------------------------------------------ vilbert boxes


def _coco(tmp_path, images, annotations=(), name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": list(annotations)}))
    return path


def _boxes(tmp_path, *extra):
    return ["boxes", "--out", str(tmp_path / "boxes.json"), *extra]


@pytest.mark.parametrize("images, annotations, problem", [
    ([{"id": 1, "file_name": "a/x.jpg"}, {"id": 2, "file_name": "b/x.jpg"}], [], "same file stem 'x'"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], [], "repeats image id 1"),
    ([{"id": 1.7, "file_name": "a.jpg"}], [], "1.7, not an integer"),
    ([{"id": True, "file_name": "a.jpg"}], [], "True, not an integer"),
    ([{"id": [1], "file_name": "a.jpg"}], [], "[1], not an integer"),
    ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": "one", "bbox": [0, 0, 1, 1]}], "'one', not an integer"),
    ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": None, "bbox": [0, 0, 1, 1]}], "None, not an integer"),
])
def test_boxes_refuses_ids_that_would_merge_or_truncate(tmp_path, images, annotations, problem):
    coco = _coco(tmp_path, images, annotations)
    assert problem in assert_refused(_boxes(tmp_path, "--coco", str(coco)), names=[str(coco)], watch=[tmp_path])


@pytest.mark.parametrize("score", ["high", None, [0.5]])
def test_boxes_refuses_non_numeric_detection_scores(tmp_path, score):
    coco = _coco(tmp_path, [{"id": 1, "file_name": "a.jpg"}])
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "box": [0, 0, 5, 5], "score": score}]))
    line = assert_refused(_boxes(tmp_path, "--coco", str(coco), "--detections", str(dets)), names=[str(dets)],
                          watch=[tmp_path])
    assert "not a finite number" in line


def test_boxes_refuses_a_nan_min_score(tmp_path):
    coco = _coco(tmp_path, [{"id": 1, "file_name": "a.jpg"}])
    assert_refused(_boxes(tmp_path, "--coco", str(coco), "--min-score", "nan"), names=["--min-score"],
                   watch=[tmp_path])


# ------------------------------------------------------------------------------------------------ configs and lists


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_multitask_temperature_and_loss_scale_must_be_finite(value):
    with pytest.raises(ConfigError, match="multitask.temperature must be a positive finite number"):
        MultiTaskSettings(temperature=value).validate()
    config = MultiTaskConfig(tasks=[MemberConfig(name="vqa", loss_scale=value)])
    with pytest.raises(ConfigError, match="vqa loss_scale must be a positive finite number"):
        config.validate()


def test_an_answer_list_with_a_blank_line_inside_is_refused_not_shifted(tmp_path):
    path = tmp_path / "answers.txt"
    path.write_text("yes\nno\n\nred\n\n")
    with pytest.raises(ConfigError, match="line 3 is blank"):
        read_answer_list(path)
    path.write_text("yes\nno\nred\n\n")
    assert read_answer_list(path) == ["yes", "no", "red"]


def test_non_utf8_text_lists_are_one_line(tmp_path):
    answers, ids = tmp_path / "answers.txt", tmp_path / "ids.txt"
    for path in (answers, ids):
        path.write_bytes(b"yes\n\xff\xfeno\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_answer_list(answers)
    with pytest.raises(AnnotationError, match="not UTF-8 text"):
        read_image_ids(ids)


# ------------------------------------------------------------------------------------------------ evaluation splits


def test_evaluation_refuses_a_split_that_repeats_a_question_or_an_image(tmp_path):
    path = tmp_path / "questions.json"
    question = {"question_id": 7, "image_id": 1, "question": "what color?"}
    path.write_text(json.dumps({"questions": [question, {**question, "image_id": 2}]}))
    with pytest.raises(AnnotationError, match=r"questions\[1\] repeats question_id 7"):
        read_questions(path)
    split = tmp_path / "dataset_flickr30k.json"
    entry = {"filename": "1000.jpg", "split": "test", "sentences": [{"raw": "a dog"}]}
    split.write_text(json.dumps({"images": [entry, {**entry, "sentences": [{"raw": "a cat"}]}]}))
    with pytest.raises(AnnotationError, match="image '1000' is listed twice in the split"):
        read_karpathy(split, "test")


@pytest.mark.parametrize("argv", [
    ["predict", "--checkpoint", "ckpt", "--image", "a.jpg", "--question", ""],
    ["predict", "--checkpoint", "ckpt", "--image", "a.jpg", "--expression", "   "],
    ["predict-task", "--task", "gqa", "--checkpoint", "ckpt", "--image", "a.jpg", "--text", " \t"],
    ["search", "--index", "idx", "--text", ""],
], ids=["question", "expression", "predict-task", "search"])
def test_blank_text_is_refused_at_the_command_line(tmp_path, argv):
    option = next(a for a in argv if a in ("--question", "--expression", "--text"))
    assert "empty or blank text" in assert_refused(argv, names=[option], watch=[tmp_path])
