"""Visual Genome QA: free-form questions on Visual Genome images, answered from the VQA answer list.

File (in `data.root`): Visual Genome's `question_answers.json`, a list of images {"id", "qas": [{"qa_id",
"image_id", "question", "answer"}]}. Visual Genome has no official QA split; as an assumption stated here, the
last `data.val_images` images by id are `val` and the others `train`.

Answers: the VQA answer list (12-in-1 task 2 answers through the VQA head): the initial checkpoint's
(config id2label, e.g. a VQA or converted 12-in-1 checkpoint), else `data.answers_file` (the reference's
`trainval_label2ans.pkl`), else the normalised answers given by at least `data.min_answer_count` train questions.
Answers are normalised as VQA's (`tasks.vqa.vocabulary_key`). Loss: BCE × number of answers on the one-hot answer
(`answer_logits`, as the original's vilbert/task_utils.py). Metric: with one human answer per question the
ten-way VQA formula is undefined, so the score is the exact match of the normalised answers
(`tasks.metrics.accuracy`). Question type (the answer prior of `data.debias`): the question's first word.
Predictions [{"qa_id", "answer"}].
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
from tasks.data.answer_labels import config_answers, read_answer_list
from tasks.engine.task import ExampleInputs
from tasks.errors import AnnotationError, ConfigError
from tasks.finetuning import FinetuneConfig, build_task_model
from tasks.image_text import AnswerTask, ImageTextDataConfig, Sample, frequent_answers
from tasks.metrics import accuracy
from tasks.vqa import checkpoint_answers, vocabulary_key


def read_genome_qa(path: str | Path, split: str, val_images: int) -> list[Sample]:
    """The questions of `split` ("train" or "val"); labels are normalised answers."""
    if split not in ("train", "val"):
        raise ConfigError(f"unknown Visual Genome QA split {split!r}; choose train or val")
    data = load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of images with \"qas\", got {type(data).__name__}")
    for i, image in enumerate(data):
        require(image, ["id", "qas"], str(path), f"images[{i}]")
    images = sorted(data, key=lambda image: int(image["id"]))
    chosen = images[len(images) - val_images:] if split == "val" else images[: max(len(images) - val_images, 0)]
    samples = []
    for image in chosen:
        for j, qa in enumerate(image["qas"]):
            require(qa, ["qa_id", "question", "answer"], str(path), f"image {image['id']} qas[{j}]")
            question = str(qa["question"])
            samples.append(Sample(int(qa["qa_id"]), [question], [str(image["id"])],
                                  vocabulary_key(str(qa["answer"])), {"question_type": question_type(question)}))
    return samples


def question_type(question: str) -> str:
    """Visual Genome QA's question type: its first word, lower case (the 7W: what, where, when, who, why, how,
    which)."""
    words = question.strip().lower().split()
    return words[0].strip("?,.") if words else ""


@dataclass
class GenomeQADataConfig(ImageTextDataConfig):
    annotations: str = "question_answers.json"
    max_text_length: int = 26
    train_split: str = "train"
    val_split: str = "val"
    val_images: int = 5000
    answers_file: str | None = None  # trainval_label2ans.pkl
    min_answer_count: int = 9


@dataclass
class GenomeQAConfig(FinetuneConfig):
    """A Visual Genome QA fine-tuning run (tasks/configs/genome-qa.yaml)."""

    data: GenomeQADataConfig = field(default_factory=GenomeQADataConfig)


class GenomeQATask(AnswerTask):
    """Visual Genome QA on the VQA head (`answer_logits`)."""

    name = "genome-qa"
    head = "answer_logits"
    config_class = GenomeQAConfig
    example_inputs = ExampleInputs("question", example_text="what color is the circle")
    debias_supported = True
    data: GenomeQADataConfig

    def annotation_file(self, split: str) -> Path:
        return Path(self.data.root) / self.data.annotations

    def read_samples(self, split: str) -> list[Sample]:
        return read_genome_qa(self.annotation_file(split), split, self.data.val_images)

    def load_answers(self) -> list[str]:
        """The VQA answer list (see the module docstring for where it comes from)."""
        answers = checkpoint_answers(self.config.model.init)
        if answers is None and self.data.answers_file:
            answers = read_answer_list(self.data.answers_file)
        if answers is None:
            answers = frequent_answers((s.label for s in self.samples("train") if s.label), self.data.min_answer_count)
        return answers

    def build_model(self) -> nn.Module:
        answers = self.answers()
        return build_task_model(self.config.model, id2label=dict(enumerate(answers)),
                                label2id={a: i for i, a in enumerate(answers)},
                                **debiasing.model_settings(self.data.debias, len(answers)))

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        return {"qa_id": sample.id, "answer": self.answers()[int(logits.argmax())]}

    def prediction_problem(self, model_config: Mapping[str, Any]) -> str | None:
        if config_answers(model_config) is not None or self.data.answers_file:
            return None
        return "config.json has no VQA answer list (id2label) and the run no data.answers_file"

    def choice_labels(self, sample: Sample) -> list[str]:
        return list(self.answers())

    def id_of(self, prediction: dict) -> int:
        return prediction["qa_id"]

    def predicted_label(self, prediction: dict) -> str:
        return vocabulary_key(prediction["answer"])

    def score(self, predictions: list[dict], split: str) -> dict[str, float]:
        gold = self.gold(split)
        return {"accuracy": accuracy({self.id_of(p): self.predicted_label(p) for p in predictions}, gold),
                "num_items": float(len(gold)), "num_predictions": float(len(predictions))}
