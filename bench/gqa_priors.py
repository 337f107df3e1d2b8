"""What the question alone answers in GQA files: the accuracy of blind guesses on an evaluation split.

    python bench/gqa_priors.py --gqa data/shapes/world/gqa [--split testdev]

Each guess answers every question of the split with the most frequent training answer among the training questions
that share its key (else the most frequent training answer overall): the key is nothing (the majority answer), the
question type (`types.detailed`, else `structural`), the question with the shapes world's attribute words replaced
(the template: "is the S C K above the K?"), or the exact question. Then, per question type, the share of its most
frequent answer on the split. A balanced file keeps every guess near chance; a guess well above it is a shortcut
the text alone can take, and a text-only model can learn it (docs/results.md, NLVR2, SNLI-VE, GQA and Visual7W).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tasks.gqa import read_gqa
from tasks.image_text import Sample
from tasks.shapes.world import COLOURS, KINDS, SIZES

WORDS = {"C": tuple(COLOURS), "K": KINDS, "S": SIZES}


def template(question: str) -> str:
    """The question with colour, kind and size words replaced by C, K and S ("triangles" too)."""
    for letter, words in WORDS.items():
        question = re.sub(rf"\b({'|'.join(words)})s?\b", letter, question)
    return question


KEYS: dict[str, Callable[[Sample], str]] = {
    "majority answer": lambda s: "",
    "per question type": lambda s: s.extra["question_type"],
    "per template": lambda s: template(s.texts[0]),
    "per exact question": lambda s: s.texts[0],
}


def blind_accuracy(train: list[Sample], test: list[Sample], key: Callable[[Sample], str]) -> float:
    """% of `test` answered right by the most frequent training answer of each question's key."""
    by_key: dict[str, Counter] = {}
    for sample in train:
        by_key.setdefault(key(sample), Counter())[sample.label] += 1
    overall = Counter(s.label for s in train).most_common(1)[0][0]
    guesses = [by_key[key(s)].most_common(1)[0][0] if key(s) in by_key else overall for s in test]
    return 100.0 * sum(guess == s.label for guess, s in zip(guesses, test, strict=True)) / len(test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gqa", required=True, help="folder with train_ and <split>_balanced_questions.json")
    parser.add_argument("--split", default="testdev", help="the evaluation split (default testdev)")
    args = parser.parse_args(argv)
    folder = Path(args.gqa)
    train, test = (read_gqa(folder / f"{name}_balanced_questions.json") for name in ("train", args.split))
    print(f"Blind guesses on {folder / args.split} ({len(test)} questions; priors from {len(train)} train questions)")
    for name, key in KEYS.items():
        print(f"  {name:<22} {blind_accuracy(train, test, key):5.1f} %")
    print("  most frequent answer's share per question type")
    for question_type, total in sorted(Counter(s.extra["question_type"] for s in test).items()):
        answers = Counter(s.label for s in test if s.extra["question_type"] == question_type)
        answer, count = answers.most_common(1)[0]
        print(f"    {question_type:<20} {100 * count / total:5.1f} %  ({answer!r}, {total} questions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
