"""Pointing tasks: choose one of an image's candidate boxes (Visual7W "which" questions, GuessWhat?! guesses).

Regions (the original's V-logit-mc task type): the IMG token and up to `max_regions - 1` detected boxes from
`data.features`, then the image's ground-truth boxes from `data.gt_features` (at most `max_gt_regions`),
appended after them as the reference appends its GT store after index 101. Each candidate box of the annotation
is the appended GT row whose box overlaps it most (IoU ≥ 0.5; a candidate that matches none is masked out and
can never be chosen). Without a GT store (`gt_features: []`) the candidates are matched among the detected
rows instead (the shapes world's store holds the ground-truth boxes). One example of a user's (`predict_one`)
chooses among the regions the model sees: the given boxes, else the detector's.

Model: `region_logits` gathered at the candidates' rows [B, n]; BCE × n on the one-hot target candidate.
Metric: accuracy of the chosen candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.data.annotations import load_json, require
from tasks.data.regions import build_visual_input, iou_matrix
from tasks.engine.task import ExampleInputs, PredictExample
from tasks.errors import AnnotationError, ConfigError
from tasks.figures.drawing import draw_boxes
from tasks.finetuning import FinetuneConfig, soft_bce_sum
from tasks.image_text import ImageTextDataConfig, ImageTextTask, Sample, SampleDataset, known_samples
from tasks.metrics import xywh_to_xyxy

MATCH_IOU = 0.5


@dataclass
class PointingDataConfig(ImageTextDataConfig):
    gt_features: list[str] = field(default_factory=list)  # ground-truth-box store(s), appended after detections
    max_gt_regions: int = 99  # Visual7W: 101 + 99 = the reference's 200 regions


def candidate_rows(candidate_boxes: np.ndarray, row_boxes: np.ndarray, first_row: int) -> list[int]:
    """For each candidate box [n, 4], the row (offset by `first_row`) of the best-overlapping box, or -1."""
    if len(row_boxes) == 0:
        return [-1] * len(candidate_boxes)
    both = np.concatenate([np.asarray(candidate_boxes, dtype=np.float64).reshape(-1, 4),
                           np.asarray(row_boxes, dtype=np.float64).reshape(-1, 4)])
    iou = iou_matrix(both)[: len(candidate_boxes), len(candidate_boxes):]  # [n, K]
    best = iou.argmax(axis=1)
    return [first_row + int(k) if iou[i, k] >= MATCH_IOU else -1 for i, k in enumerate(best)]


class PointingTask(ImageTextTask):
    """Choose a candidate box; samples carry `extra["candidates"]` (ids) and `extra["boxes"]` (x1 y1 x2 y2)."""

    head = "region_logits"
    metric_labels = {"accuracy": "accuracy (chosen box)"}
    data: PointingDataConfig

    def __init__(self, config):
        super().__init__(config)
        self._gt_store = None

    def gt_store(self):
        if self._gt_store is None and self.data.gt_features:
            self._gt_store = self.open_store(self.data.gt_features, "data.gt_features")
        return self._gt_store

    def dataset(self, split: str) -> SampleDataset:
        ids = self.store().ids
        if self.gt_store() is not None:
            ids = [i for i in ids if i in self.gt_store()]
        kept = known_samples(self.samples(split), ids, self.source(split), self.data.strict, self.exact_image_ids)
        return SampleDataset(self, kept, self.store())

    def encode(self, sample: Sample, regions) -> dict:
        (detected,) = regions
        keep = min(len(detected.features), self.data.max_regions - 1)
        features, boxes = detected.features[:keep], detected.boxes[:keep]
        first = 1  # candidates are matched among the detected rows unless a GT store is appended
        if self.gt_store() is not None and not sample.extra.get("among_regions"):
            gt = self.gt_store().read(detected.image_id, float32=False, optional=())
            first = 1 + keep
            features = np.concatenate([features, gt.features[: self.data.max_gt_regions]])
            boxes = np.concatenate([boxes, gt.boxes[: self.data.max_gt_regions]])
        image_feature = detected.features.mean(axis=0) if len(detected.features) else None
        visual = build_visual_input(features, boxes, detected.image_hw, len(features) + 1, image_feature)
        rows = candidate_rows(np.asarray(sample.extra["boxes"]), boxes[first - 1:], first)
        target = torch.tensor([float(c == sample.label) for c in sample.extra["candidates"]])
        return {"texts": sample.texts, "visuals": [visual], "target": target, "rows": torch.tensor(rows)}

    def collate(self, samples: list) -> dict:
        width = max(len(s["rows"]) for s in samples)
        padded = []
        for s in samples:  # candidates padded with row -1 (masked) and target 0
            pad = width - len(s["rows"])
            padded.append({**s, "rows": torch.cat([s["rows"], torch.full((pad,), -1)]),
                           "target": torch.cat([s["target"], torch.zeros(pad)])})
        batch = super().collate(padded)
        batch["rows"] = torch.stack([s["rows"] for s in padded])  # [B, n]
        return batch

    def logits(self, model, batch) -> torch.Tensor:
        regions = self.forward(model, batch).region_logits.float()  # [B, R]
        rows = batch["rows"]
        chosen = regions.gather(1, rows.clamp(min=0))  # [B, n]
        return chosen.masked_fill(rows < 0, -10000.0)

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return soft_bce_sum(logits, batch["target"])

    def example_sample(self, example: PredictExample) -> Sample:
        """The text; the candidates are the boxes the model sees (numbered from 1 as drawn)."""
        boxes = [[float(v) for v in box] for box in example.boxes]
        return Sample("example", [example.text or ""], ["0"], None,
                      {"candidates": list(range(1, len(boxes) + 1)), "boxes": boxes, "among_regions": True})

    def choice_labels(self, sample: Sample) -> list[str]:
        return [f"box {c}: " + " ".join(f"{v:.0f}" for v in box)
                for c, box in zip(sample.extra["candidates"], sample.extra["boxes"], strict=True)]

    def predict_one(self, model, example: PredictExample) -> dict[str, Any]:
        """The choices as every image-text task gives them, and the chosen box (x1 y1 x2 y2, original pixels)."""
        result = super().predict_one(model, example)
        return {**result, "box": result["prediction"]["box"]}

    def draw(self, example: PredictExample, result: Mapping[str, Any]) -> Any:
        return draw_boxes(example.image, example.boxes, result["box"], self.headline(result))

    def chance(self, split: str, train: ImageTextTask | None = None) -> dict[str, float]:
        """Expected accuracy of a uniformly random candidate box."""
        return {"accuracy": 100 * float(np.mean([1 / len(s.extra["candidates"]) for s in self.samples(split)]))}

    def chosen(self, sample: Sample, logits: torch.Tensor) -> tuple:
        """(candidate id, its box) of the best-scoring candidate."""
        best = int(logits[: len(sample.extra["candidates"])].argmax())
        return sample.extra["candidates"][best], [round(float(v), 2) for v in sample.extra["boxes"][best]]


# ------------------------------------------------------------------------------------------------- Visual7W


def read_visual7w(path: str | Path, split: str) -> list[Sample]:
    """The pointing QA pairs of a split from `dataset_v7w_pointing.json`.

    Assumed layout (the released file; its documentation describes the telling file alike): {"images": [{"image_id",
    "filename", "split", "qa_pairs": [{"qa_id", "question", "answer" (a box id), "multiple_choices" (3 box
    ids)}]}], "boxes": [{"box_id", "x", "y", "width", "height", "name"}]}. Candidates are the answer and the three
    wrong choices, ordered by box id.
    """
    data = load_json(path)
    require(data, ["images", "boxes"], str(path), "the file")
    boxes = {}
    for i, box in enumerate(data["boxes"]):
        require(box, ["box_id", "x", "y", "width", "height"], str(path), f"boxes[{i}]")
        xywh = torch.tensor([box["x"], box["y"], box["width"], box["height"]], dtype=torch.float32)
        boxes[int(box["box_id"])] = xywh_to_xyxy(xywh).tolist()
    samples, splits = [], set()
    for i, image in enumerate(data["images"]):
        require(image, ["image_id", "split", "qa_pairs"], str(path), f"images[{i}]")
        splits.add(image["split"])
        if image["split"] != split:
            continue
        for j, qa in enumerate(image["qa_pairs"]):
            where = f"images[{i}].qa_pairs[{j}]"
            require(qa, ["qa_id", "question", "answer", "multiple_choices"], str(path), where)
            candidates = sorted({int(qa["answer"]), *(int(c) for c in qa["multiple_choices"])})
            unknown = [c for c in candidates if c not in boxes]
            if unknown:
                raise AnnotationError(f"{path}: {where} names box_id {unknown[0]}, which \"boxes\" does not have")
            samples.append(Sample(int(qa["qa_id"]), [str(qa["question"])], [str(image["image_id"])],
                                  int(qa["answer"]), {"candidates": candidates,
                                                      "boxes": [boxes[c] for c in candidates]}))
    if not samples:
        raise ConfigError(f"{path}: no QA pairs in split {split!r}; the file has {sorted(splits)}")
    return samples


@dataclass
class Visual7WDataConfig(PointingDataConfig):
    annotations: str = "dataset_v7w_pointing.json"
    max_text_length: int = 20
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class Visual7WConfig(FinetuneConfig):
    """A Visual7W pointing fine-tuning run (tasks/configs/visual7w.yaml)."""

    data: Visual7WDataConfig = field(default_factory=Visual7WDataConfig)


class Visual7WTask(PointingTask):
    """Visual7W pointing (12-in-1 task 4); predictions [{"qa_id", "answer" (box id), "box"}]."""

    name = "visual7w"
    config_class = Visual7WConfig
    example_inputs = ExampleInputs("which-question", example_text="which is the red circle?")
    data: Visual7WDataConfig

    def annotation_file(self, split: str) -> Path:
        return Path(self.data.root) / self.data.annotations

    def read_samples(self, split: str) -> list[Sample]:
        return read_visual7w(self.annotation_file(split), split)

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        answer, box = self.chosen(sample, logits)
        return {"qa_id": sample.id, "answer": answer, "box": box}

    def id_of(self, prediction: dict) -> int:
        return prediction["qa_id"]

    def predicted_label(self, prediction: dict) -> int:
        return prediction["answer"]
