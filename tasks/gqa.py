"""GQA: compositional questions on Visual Genome images, answered from a fixed answer list.

Files (in `data.root`, as released): `{train,val,testdev}_balanced_questions.json`, each a JSON object
{question id: {"imageId", "question", "answer", ...}} ("answer" absent on the challenge test set).
Answer list: the reference's `trainval_label2ans.pkl` (a pickled list, index = label; `data.answers_file`),
read with the restricted unpickler; else the one saved in the initial checkpoint's config (`gqa_answers`); else
every answer given by at least `data.min_answer_count` train questions, most frequent first. The model's
`gqa_num_labels` follows the list.

Model (12-in-1 task 15): `gqa_answer_logits`, BCE × number of answers on the one-hot answer (the original's
vilbert/task_utils.py: BCEWithLogitsLoss mean × number of labels).
Metric: exact match (`tasks.metrics.gqa_accuracy`); a question whose answer is outside the list cannot be right.
Predictions [{"questionId", "prediction"}]: the official submission format.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from features.safe_pickle import safe_load
from tasks.data.annotations import load_json, require
from tasks.engine.config import ModelConfig, OptimConfig, TrainConfig
from tasks.engine.task import ExampleInputs
from tasks.errors import AnnotationError, ConfigError
from tasks.finetuning import build_task_model, soft_bce_sum
from tasks.image_text import ImageTextDataConfig, ImageTextTask, Sample, one_hot
from tasks.metrics import gqa_accuracy

SPLIT_FILES = {"train": "train_balanced_questions.json", "val": "val_balanced_questions.json",
               "testdev": "testdev_balanced_questions.json", "challenge": "challenge_balanced_questions.json",
               "submission": "submission_all_questions.json"}


def read_gqa(path: str | Path) -> list[Sample]:
    """One sample per question, sorted by question id; `label` is the answer string (None when absent)."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected an object {{question id: question}}, got {type(data).__name__}")
    samples = []
    for qid, entry in data.items():
        require(entry, ["imageId", "question"], str(path), f"question {qid}")
        samples.append(Sample(str(qid), [str(entry["question"])], [str(entry["imageId"])], entry.get("answer")))
    return sorted(samples, key=lambda s: s.id)


def read_answer_list(path: str | Path) -> list[str]:
    """The reference's label2ans pickle: a list of answer strings (index = label)."""
    answers = safe_load(path)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise AnnotationError(f"{path}: expected a non-empty list of answer strings (label2ans)")
    return answers


@dataclass
class GQADataConfig(ImageTextDataConfig):
    max_text_length: int = 26
    train_split: str = "train"
    val_split: str = "val"
    answers_file: str | None = None  # trainval_label2ans.pkl
    min_answer_count: int = 1


@dataclass
class GQAConfig:
    """A GQA fine-tuning run (tasks/configs/gqa.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: GQADataConfig = field(default_factory=GQADataConfig)


class GQATask(ImageTextTask):
    """GQA on `gqa_answer_logits`; exact-match accuracy."""

    name = "gqa"
    head = "gqa_answer_logits"
    config_class = GQAConfig
    example_inputs = ExampleInputs("question", example_text="what color is the circle")
    data: GQADataConfig

    def __init__(self, config: GQAConfig):
        super().__init__(config)
        self._answers: list[str] | None = None
        self._label_of: dict[str, int] = {}

    def annotation_file(self, split: str) -> Path:
        if split not in SPLIT_FILES:
            raise ConfigError(f"unknown GQA split {split!r}; choose one of {', '.join(SPLIT_FILES)}")
        return Path(self.data.root) / SPLIT_FILES[split]

    def read_samples(self, split: str) -> list[Sample]:
        return read_gqa(self.annotation_file(split))

    def answers(self) -> list[str]:
        """The answer list (see the module docstring for where it comes from)."""
        if self._answers is None:
            if self.data.answers_file:
                self._answers = read_answer_list(self.data.answers_file)
            else:
                init = getattr(self.config.model, "init", None)
                config_file = Path(init) / "config.json" if init else None
                saved = load_json(config_file).get("gqa_answers") if config_file and config_file.is_file() else None
                if saved:
                    self._answers = list(saved)
                else:
                    counts = Counter(s.label for s in self.samples("train") if s.label is not None)
                    self._answers = sorted((a for a, c in counts.items() if c >= self.data.min_answer_count),
                                           key=lambda a: (-counts[a], a))
                    if not self._answers:
                        raise ConfigError(f"data.min_answer_count={self.data.min_answer_count}: no answer occurs "
                                          "that often in the train split")
            self._label_of = {answer: i for i, answer in enumerate(self._answers)}
        return self._answers

    def build_model(self) -> nn.Module:
        answers = self.answers()
        return build_task_model(self.config.model, gqa_num_labels=len(answers), gqa_answers=answers)

    def target(self, sample: Sample) -> torch.Tensor:
        self.answers()
        return one_hot(self._label_of.get(sample.label), len(self._answers))

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return soft_bce_sum(logits, batch["target"])

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        return {"questionId": sample.id, "prediction": self.answers()[int(logits.argmax())]}

    def prediction_problem(self, model_config: Mapping[str, Any]) -> str | None:
        if model_config.get("gqa_answers") or self.data.answers_file:
            return None
        return "config.json has no GQA answer list (gqa_answers) and the run no data.answers_file"

    def choice_labels(self, sample: Sample) -> list[str]:
        return list(self.answers())

    def id_of(self, prediction: dict) -> str:
        return prediction["questionId"]

    def predicted_label(self, prediction: dict) -> str:
        return prediction["prediction"]

    def score(self, predictions: list[dict], split: str) -> dict[str, float]:
        gold = self.gold(split)
        if any(label is None for label in gold.values()):
            return {"num_predictions": float(len(predictions))}
        predicted = {self.id_of(p): self.predicted_label(p) for p in predictions}
        return {"accuracy": gqa_accuracy(predicted, gold), "num_items": float(len(gold)),
                "num_predictions": float(len(predictions))}
