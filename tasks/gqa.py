"""GQA: compositional questions on Visual Genome images, answered from a fixed answer list.

Files (in `data.root`, as released): `{train,val,testdev}_balanced_questions.json`, each a JSON object
{question id: {"imageId", "question", "answer", ...}} ("answer" absent on the challenge test set).
Answer list: the reference's `trainval_label2ans.pkl` (a pickled list, index = label; `data.answers_file`),
read with the restricted unpickler; else the one saved in the initial checkpoint's config (`gqa_answers`); else
every answer given by at least `data.min_answer_count` train questions, most frequent first. The model's
`gqa_num_labels` follows the list.

Model (12-in-1 task 15): `gqa_answer_logits`, BCE × number of answers on the one-hot answer (the original's
vilbert/task_utils.py: BCEWithLogitsLoss mean × number of labels).
Question types (for the answer prior of `data.debias`): each question's `types.detailed` (else `structural`).
Metric: exact match (`tasks.metrics.gqa_accuracy`); a question whose answer is outside the list cannot be right;
also per question type (`question_type/<type>`).
Predictions [{"questionId", "prediction"}]: the official submission format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks import debiasing
from tasks.data.annotations import load_json, require
from tasks.data.answer_labels import read_answer_list
from tasks.engine.task import ExampleInputs
from tasks.errors import AnnotationError
from tasks.finetuning import FinetuneConfig, build_task_model
from tasks.image_text import AnswerTask, ImageTextDataConfig, Sample, frequent_answers
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
        types = entry.get("types") if isinstance(entry.get("types"), dict) else {}
        samples.append(Sample(str(qid), [str(entry["question"])], [str(entry["imageId"])], entry.get("answer"),
                              {"question_type": str(types.get("detailed") or types.get("structural") or "")}))
    return sorted(samples, key=lambda s: s.id)


@dataclass
class GQADataConfig(ImageTextDataConfig):
    max_text_length: int = 26
    train_split: str = "train"
    val_split: str = "val"
    answers_file: str | None = None  # trainval_label2ans.pkl
    min_answer_count: int = 1


@dataclass
class GQAConfig(FinetuneConfig):
    """A GQA fine-tuning run (tasks/configs/gqa.yaml)."""

    data: GQADataConfig = field(default_factory=GQADataConfig)


class GQATask(AnswerTask):
    """GQA on `gqa_answer_logits`; exact-match accuracy."""

    name = "gqa"
    head = "gqa_answer_logits"
    split_files = SPLIT_FILES
    title = "GQA"
    metric_labels = {"accuracy": "accuracy (exact match)"}
    config_class = GQAConfig
    example_inputs = ExampleInputs("question", example_text="what color is the circle")
    debias_supported = True
    data: GQADataConfig

    def read_samples(self, split: str) -> list[Sample]:
        return read_gqa(self.annotation_file(split))

    def load_answers(self) -> list[str]:
        """The answer list (see the module docstring for where it comes from)."""
        if self.data.answers_file:
            return read_answer_list(self.data.answers_file)
        init = self.config.model.init
        config_file = Path(init) / "config.json" if init else None
        saved = load_json(config_file).get("gqa_answers") if config_file and config_file.is_file() else None
        if saved:
            return list(saved)
        return frequent_answers((s.label for s in self.samples("train") if s.label is not None),
                                self.data.min_answer_count)

    def build_model(self) -> nn.Module:
        answers = self.answers()
        return build_task_model(self.config.model, gqa_num_labels=len(answers), gqa_answers=answers,
                                **debiasing.model_settings(self.data.debias, len(answers)))

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
        return {"accuracy": gqa_accuracy(predicted, gold), **self.type_accuracy(predicted, split),
                "num_items": float(len(gold)), "num_predictions": float(len(predictions))}

    def type_accuracy(self, predicted: Mapping[str, str], split: str) -> dict[str, float]:
        """{"question_type/<type>": exact-match accuracy %} per question type of the split (`types.detailed`);
        empty when the split's questions carry no types."""
        by_type: dict[str, list[bool]] = {}
        for sample in self.samples(split):
            if question_type := self.question_type(sample):
                right = str(predicted.get(sample.id, "")).strip() == str(sample.label).strip()
                by_type.setdefault(question_type, []).append(right)
        return {f"question_type/{name}": 100.0 * sum(hits) / len(hits) for name, hits in sorted(by_type.items())}

    def report_lines(self, metrics: Mapping[str, float]) -> list[tuple[str, float, float | None]]:
        """Accuracy per question type (`make finetune TASK=gqa` prints the text-only start's beside it)."""
        return [(f"question type '{key.split('/', 1)[1]}'", value, None)
                for key, value in sorted(metrics.items()) if key.startswith("question_type/")]
