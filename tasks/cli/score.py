"""Score VQA predictions with the official accuracy, overall and per answer type.

`vilbert score --task vqa --predictions RESULTS.json --annotations v2_mscoco_val2014_annotations.json
--questions v2_OpenEnded_mscoco_val2014_questions.json` prints the accuracy (the official evaluation's numbers).
As in the official evaluator, the predictions must answer exactly the annotated questions: missing or extra
question ids, duplicates, non-integer ids and non-string answers are errors, never a score over fewer questions.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from tasks.errors import AnnotationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=["vqa"])
    parser.add_argument("--predictions", required=True, help='result file: [{"question_id", "answer"}]')
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--questions", required=True)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _entries(path: str, key: str | None, fields: list[str]) -> list[dict]:
    """The list of objects in `path` (under `key`), each with `fields` and an integer question_id."""
    from tasks.data.annotations import load_json, require

    data = load_json(path)
    if key is not None:
        require(data, [key], path, "the file")
        data = data[key]
    where = f'"{key}"' if key else "the file"
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: {where} is a {type(data).__name__}, expected a list of objects")
    for i, entry in enumerate(data):
        require(entry, fields, path, f"entry {i}")
        question_id = entry["question_id"]
        if isinstance(question_id, bool) or not isinstance(question_id, int):
            raise AnnotationError(f"{path}: entry {i}: question_id must be an integer, got {_short(question_id)}")
    duplicates = [qid for qid, n in Counter(e["question_id"] for e in data).items() if n > 1]
    if duplicates:
        raise AnnotationError(f"{path}: {len(duplicates)} question_id(s) appear more than once "
                              f"(first: {_short(duplicates[0])})")
    return data


def _same_ids(path: str, ids: set[int], reference_path: str, reference: set[int], what: str) -> None:
    missing, extra = sorted(reference - ids), sorted(ids - reference)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its questions missing (first: {', '.join(map(_short, missing[:5]))})")
        if extra:
            parts.append(f"{len(extra)} not in it (first: {', '.join(map(_short, extra[:5]))})")
        raise AnnotationError(f"{path}: {what} must be those of {reference_path} ({len(reference)}), but "
                              f"{'; '.join(parts)}")


def run(args: argparse.Namespace) -> int:
    from tasks.metrics import vqa_score

    predictions = _entries(args.predictions, None, ["question_id", "answer"])
    for i, entry in enumerate(predictions):
        if not isinstance(entry["answer"], str):
            raise AnnotationError(f"{args.predictions}: entry {i}: answer must be a string, got "
                                  f"{_short(entry['answer'])}")
    annotations = _entries(args.annotations, "annotations", ["question_id", "answers"])
    for i, entry in enumerate(annotations):
        answers = entry["answers"]
        if not isinstance(answers, list) or not answers or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise AnnotationError(f"{args.annotations}: entry {i} (question_id {entry['question_id']}): answers "
                                  'must be a non-empty list of {"answer": string}')
    questions = _entries(args.questions, "questions", ["question_id"])
    annotated = {e["question_id"] for e in annotations}
    _same_ids(args.questions, {q["question_id"] for q in questions}, args.annotations, annotated, "the question ids")
    _same_ids(args.predictions, {p["question_id"] for p in predictions}, args.annotations, annotated,
              "the predicted question ids")
    result = vqa_score(predictions, annotations)
    print(f"overall {result['overall']:.2f} over {result['num_questions']} questions")
    for name, value in result["per_answer_type"].items():
        print(f"{name:>8} {value:.2f}")
    return 0
