"""SNLI-VE (visual entailment): does a Flickr30k image entail, contradict, or leave neutral a hypothesis?

Files (in `data.root`, as released with the dataset): `snli_ve_{train,dev,test}.jsonl`, one JSON object a line
with `Flikr30kID` (sic; the image file name, e.g. "2248275918.jpg"), `sentence2` (the hypothesis), `gold_label`
and `pairID`. The image id is the file name's stem, matched against the Flickr30k feature store.
Head: `tri_logits` (12-in-1 task 13), labels contradiction 0 / neutral 1 / entailment 2, BCE on the one-hot
label (the original's VL-tri task type). Metric: accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.data.annotations import require
from tasks.engine.task import ExampleInputs
from tasks.errors import AnnotationError
from tasks.finetuning import FinetuneConfig
from tasks.image_text import ImageTextDataConfig, ImageTextTask, Sample, one_hot, read_json_lines

LABELS = ("contradiction", "neutral", "entailment")
SPLIT_FILES = {"train": "snli_ve_train.jsonl", "dev": "snli_ve_dev.jsonl", "test": "snli_ve_test.jsonl"}


def read_snli_ve(path: str | Path) -> list[Sample]:
    """One sample per line: the hypothesis with its image; an unknown gold_label names the file and line."""
    samples = []
    for number, entry in read_json_lines(path):
        require(entry, ["Flikr30kID", "sentence2", "gold_label", "pairID"], str(path), f"line {number}")
        if entry["gold_label"] not in LABELS:
            raise AnnotationError(f"{path}: line {number} has gold_label {entry['gold_label']!r}; "
                                  f"expected one of {', '.join(LABELS)}")
        image = Path(str(entry["Flikr30kID"])).stem
        samples.append(Sample(str(entry["pairID"]), [str(entry["sentence2"])], [image],
                              LABELS.index(entry["gold_label"])))
    return samples


@dataclass
class SNLIVEDataConfig(ImageTextDataConfig):
    max_text_length: int = 56
    train_split: str = "train"
    val_split: str = "dev"


@dataclass
class SNLIVEConfig(FinetuneConfig):
    """An SNLI-VE fine-tuning run (tasks/configs/snli-ve.yaml)."""

    data: SNLIVEDataConfig = field(default_factory=SNLIVEDataConfig)


class SNLIVETask(ImageTextTask):
    """SNLI-VE: three-way entailment on `tri_logits`; predictions [{"pairID", "gold_label", "scores"}]."""

    name = "snli-ve"
    head = "tri_logits"
    split_files = SPLIT_FILES
    title = "SNLI-VE"
    config_class = SNLIVEConfig
    example_inputs = ExampleInputs("hypothesis", example_text="there is a red circle")

    def read_samples(self, split: str) -> list[Sample]:
        return read_snli_ve(self.annotation_file(split))

    def target(self, sample: Sample) -> torch.Tensor:
        return one_hot(sample.label, len(LABELS))

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        return {"pairID": sample.id, "gold_label": LABELS[int(logits.argmax())],
                "scores": [round(v, 5) for v in torch.sigmoid(logits).tolist()]}

    def choice_labels(self, sample: Sample) -> list[str]:
        return list(LABELS)

    def id_of(self, prediction: dict) -> str:
        return prediction["pairID"]

    def predicted_label(self, prediction: dict) -> int:
        return LABELS.index(prediction["gold_label"])
