"""Score VQA predictions with the official accuracy, overall and per answer type.

`vilbert score --task vqa --predictions RESULTS.json --annotations v2_mscoco_val2014_annotations.json
--questions v2_OpenEnded_mscoco_val2014_questions.json` prints the accuracy (the official evaluation's numbers).
"""

from __future__ import annotations

import argparse

from tasks.data.annotations import load_json, require
from tasks.errors import AnnotationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=["vqa"])
    parser.add_argument("--predictions", required=True, help='result file: [{"question_id", "answer"}]')
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--questions", required=True)


def run(args: argparse.Namespace) -> int:
    from tasks.metrics import vqa_score

    predictions = load_json(args.predictions)
    if not isinstance(predictions, list):
        raise AnnotationError(f"{args.predictions}: expected a list of {{question_id, answer}}")
    for i, entry in enumerate(predictions):
        require(entry, ["question_id", "answer"], args.predictions, f"entry {i}")
    annotations = load_json(args.annotations)
    require(annotations, ["annotations"], args.annotations, "the file")
    questions = load_json(args.questions)
    require(questions, ["questions"], args.questions, "the file")
    known = {int(q["question_id"]) for q in questions["questions"]}
    if unknown := [p["question_id"] for p in predictions if int(p["question_id"]) not in known]:
        raise AnnotationError(f"{args.predictions}: question_id {unknown[0]} is not in {args.questions} "
                              f"({len(unknown)} such)")
    try:
        result = vqa_score(predictions, annotations["annotations"])
    except (KeyError, ValueError) as error:  # a predicted question without annotation, or without human answers
        raise AnnotationError(f"{args.annotations}: {error.args[0]}") from error
    print(f"overall {result['overall']:.2f} over {result['num_questions']} questions")
    for name, value in result["per_answer_type"].items():
        print(f"{name:>8} {value:.2f}")
    return 0
