"""FOIL-COCO: is a COCO caption right, or has one noun been swapped for a wrong ("foil") one?

Files (in `data.root`): `foilv1.0_{train,test}_2017.json`, COCO-caption style {"images": [...], "annotations":
[{"id", "image_id", "caption", "foil" (true for a foil caption), "target_word", "foil_word"}]}. The format is
taken from the dataset's release notes; the released files were not checked here. The FOIL paper has no
validation split: `test` is the default evaluation split.

Model (12-in-1 task 16 in the reference's numbering; not among the twelve trained): one logit per caption from
`pair_logit` ("the caption is right"), binary cross-entropy. The reference's head for FOIL could not be
confirmed; a two-way softmax is the same model as one logit. Metric: accuracy. Predictions [{"id", "foil"}].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.data.annotations import load_json, require
from tasks.engine.task import ExampleInputs, StepOutput
from tasks.errors import AnnotationError
from tasks.finetuning import FinetuneConfig
from tasks.image_text import ImageTextDataConfig, ImageTextTask, Sample

SPLIT_FILES = {"train": "foilv1.0_train_2017.json", "test": "foilv1.0_test_2017.json"}


def read_foil(path: str | Path) -> list[Sample]:
    """One sample per caption; label True for a foil caption."""
    data = load_json(path)
    require(data, ["annotations"], str(path), "the file")
    samples = []
    for i, entry in enumerate(data["annotations"]):
        require(entry, ["id", "image_id", "caption", "foil"], str(path), f"annotations[{i}]")
        if not isinstance(entry["foil"], bool):
            raise AnnotationError(f"{path}: annotations[{i}] has foil {entry['foil']!r}; expected true or false")
        samples.append(Sample(int(entry["id"]), [str(entry["caption"])], [str(entry["image_id"])], entry["foil"]))
    return samples


@dataclass
class FoilDataConfig(ImageTextDataConfig):
    max_text_length: int = 30
    train_split: str = "train"
    val_split: str = "test"


@dataclass
class FoilConfig(FinetuneConfig):
    """A FOIL-COCO fine-tuning run (tasks/configs/foil.yaml)."""

    data: FoilDataConfig = field(default_factory=FoilDataConfig)


class FoilTask(ImageTextTask):
    """FOIL on one logit (`pair_logit`): positive = the caption is right."""

    name = "foil"
    head = "pair_logit"
    split_files = SPLIT_FILES
    title = "FOIL"
    config_class = FoilConfig
    example_inputs = ExampleInputs("caption", example_text="a red circle beside a blue square")

    def read_samples(self, split: str) -> list[Sample]:
        return read_foil(self.annotation_file(split))

    def target(self, sample: Sample) -> torch.Tensor:
        return torch.tensor([0.0 if sample.label else 1.0])  # [1]: 1 = a right caption

    def logits(self, model, batch) -> torch.Tensor:
        return self.forward(model, batch).pair_logit.float()[:, None]  # [B, 1]

    def training_step(self, model, batch):
        logits = self.logits(model, batch)
        loss = self.loss(logits, batch)
        hit = ((logits > 0).float() == batch["target"]).float().mean()
        return StepOutput({"loss": loss}, metrics={"accuracy": hit.detach()})

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        return {"id": sample.id, "foil": bool(logits[0] <= 0)}

    def choice_labels(self, sample: Sample) -> list[str]:
        return ["right caption", "foil (a wrong word)"]

    def choice_scores(self, logits: torch.Tensor) -> torch.Tensor:
        right = torch.sigmoid(logits[0])
        return torch.stack([right, 1 - right])

    def predicted_label(self, prediction: dict) -> bool:
        return prediction["foil"]
