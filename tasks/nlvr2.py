"""NLVR2: is a sentence true of a pair of images?

Files (in `data.root`, as released): `train.json`, `dev.json`, `test1.json` — JSON lines despite the extension,
each with `identifier` ("split-set-pair-sentence", e.g. "dev-850-0-0"), `sentence` and `label` ("True" /
"False"; absent on unreleased test sets). The images are named by the identifier without its sentence number:
"dev-850-0-img0" (left) and "dev-850-0-img1" (right), the file stems of the released PNGs, matched exactly
against the feature store (or, with `data.images_from_urls`, the file stems of `left_url` / `right_url`).

Model (12-in-1 task 12, the original's VL-binary task type): each sample is two rows, the sentence with the left
image and with the right image; `binary_logits` reads their pooled products concatenated ([B/2, 2]), BCE on the
one-hot label.
Metric: accuracy and consistency (the share of unique sentences whose examples are all right,
`tasks.metrics.nlvr2_scores`). Predictions [{"identifier", "prediction": "True"/"False"}], the leaderboard's
two CSV columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.data.annotations import require
from tasks.engine.task import ExampleInputs, PredictExample
from tasks.errors import AnnotationError
from tasks.finetuning import FinetuneConfig
from tasks.image_text import ImageTextDataConfig, ImageTextTask, Sample, one_hot, read_json_lines
from tasks.metrics import nlvr2_scores

SPLIT_FILES = {"train": "train.json", "dev": "dev.json", "test1": "test1.json", "test2": "test2.json"}
LABELS = {"False": False, "True": True}


def image_pair(identifier: str) -> list[str]:
    """The left and right image ids of an NLVR2 identifier: "dev-850-0-0" -> dev-850-0-img0, dev-850-0-img1."""
    stem = identifier.rsplit("-", 1)[0]
    return [f"{stem}-img0", f"{stem}-img1"]


def read_nlvr2(path: str | Path, images_from_urls: bool = False) -> list[Sample]:
    """One sample per line: the sentence twice, with the left and the right image; label True/False or None.

    With `images_from_urls` the image ids are the file stems of `left_url` / `right_url` instead of the
    identifier's (the shapes world names its scenes' PNGs there).
    """
    samples = []
    for number, entry in read_json_lines(path):
        require(entry, ["identifier", "sentence", *(["left_url", "right_url"] if images_from_urls else [])],
                str(path), f"line {number}")
        identifier = str(entry["identifier"])
        if identifier.count("-") < 3:
            raise AnnotationError(f"{path}: line {number} has identifier {identifier!r}, not split-set-pair-sentence")
        label = entry.get("label")
        if label is not None and str(label) not in LABELS:
            raise AnnotationError(f"{path}: line {number} has label {label!r}; expected True or False")
        sentence = str(entry["sentence"])
        images = ([Path(str(entry[key])).stem for key in ("left_url", "right_url")] if images_from_urls
                  else image_pair(identifier))
        samples.append(Sample(identifier, [sentence, sentence], images,
                              None if label is None else LABELS[str(label)]))
    return samples


@dataclass
class NLVR2DataConfig(ImageTextDataConfig):
    max_text_length: int = 40
    train_split: str = "train"
    val_split: str = "dev"
    images_from_urls: bool = False  # image ids from left_url/right_url file stems instead of the identifier


@dataclass
class NLVR2Config(FinetuneConfig):
    """An NLVR2 fine-tuning run (tasks/configs/nlvr2.yaml)."""

    data: NLVR2DataConfig = field(default_factory=NLVR2DataConfig)


class NLVR2Task(ImageTextTask):
    """NLVR2 on `binary_logits` over the two images' pooled products; accuracy and consistency."""

    name = "nlvr2"
    head = "binary_logits"
    split_files = SPLIT_FILES
    title = "NLVR2"
    exact_image_ids = True
    config_class = NLVR2Config
    example_inputs = ExampleInputs("statement", images=("left image", "right image"),
                                   example_text="the left image has more circles than the right image")

    def read_samples(self, split: str) -> list[Sample]:
        return read_nlvr2(self.annotation_file(split), self.data.images_from_urls)

    def target(self, sample: Sample) -> torch.Tensor:
        return one_hot(None if sample.label is None else int(sample.label), 2)

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        return {"identifier": sample.id, "prediction": str(bool(logits.argmax() == 1))}

    def example_sample(self, example: PredictExample) -> Sample:
        """The statement with the left image, then with the right one."""
        return Sample("example-0-0-0", [example.text or ""] * 2, ["0", "1"])

    def choice_labels(self, sample: Sample) -> list[str]:
        return ["False", "True"]  # binary_logits: column 1 is "the statement is true"

    def id_of(self, prediction: dict) -> str:
        return prediction["identifier"]

    def predicted_label(self, prediction: dict) -> bool:
        return LABELS[prediction["prediction"]]

    def score(self, predictions: list[dict], split: str) -> dict[str, float]:
        gold = self.gold(split)
        if any(label is None for label in gold.values()):
            return {"num_predictions": float(len(predictions))}
        scores = nlvr2_scores({self.id_of(p): self.predicted_label(p) for p in predictions}, gold)
        return {**scores, "num_items": float(len(gold)), "num_predictions": float(len(predictions))}
