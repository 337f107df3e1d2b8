"""Flickr30k Entities phrase grounding: find the box a phrase of a caption names.

Files (in `data.root`, as released): `{train,val,test}.txt` (the split's image ids, one a line),
`Sentences/<image id>.txt` (five captions, phrases marked "[/EN#18/people A man]") and `Annotations/<image
id>.xml` (PASCAL-VOC style: each <object> has one or more <name> entity ids and a <bndbox>, or <nobndbox>).
One sample per marked phrase whose entity has a box; a phrase whose entity has several boxes is grounded to
their union (the "merged boxes" protocol), in training and in the metric alike.

Regions, targets and loss are those of the referring-expression tasks (`tasks.refexp`: detected boxes, GT
boxes joined for training, BCE × R on `region_logits` against IoU targets; 12-in-1 task 18). Metric: percent
of phrases whose chosen box has IoU ≥ 0.5 with the gold box (`tasks.metrics.grounding_accuracy`).
Predictions [{"image_id", "sentence", "phrase", "entity_id", "box", "score"}] (sentence = caption line,
phrase = its order in the caption, both from 0).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from tasks.errors import AnnotationError, ConfigError
from tasks.finetuning import FinetuneConfig, FinetuneDataConfig, resolve_split
from tasks.metrics import grounding_accuracy
from tasks.refexp import Expression, RefExpDataset, RefExpTask

PHRASE = re.compile(r"\[/EN#(\d+)/(\S+) ([^\]]+)\]")
SPLITS = ("train", "val", "test")


@dataclass
class Phrase:
    image_id: str
    sentence: int  # caption line in Sentences/<image id>.txt
    phrase: int  # order of the phrase in its caption
    entity_id: int
    text: str
    box: tuple[float, float, float, float]  # the union of the entity's boxes, x1 y1 x2 y2 pixels

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.image_id, self.sentence, self.phrase)


def read_entity_boxes(path: str | Path) -> dict[int, list[list[float]]]:
    """{entity id: [[x1, y1, x2, y2], ...]} of an Annotations/<id>.xml file (objects without a box skipped)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise AnnotationError(f"{path}: not a readable annotation XML ({error})") from error
    boxes: dict[int, list[list[float]]] = {}
    for k, obj in enumerate(root.iter("object")):
        box = obj.find("bndbox")
        if box is None:
            continue
        try:
            coords = [float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as error:
            raise AnnotationError(f"{path}: object {k} has a bndbox without numeric xmin/ymin/xmax/ymax") from error
        for name in obj.findall("name"):
            boxes.setdefault(int(name.text), []).append(coords)
    return boxes


def read_phrases(root: str | Path, split: str) -> list[Phrase]:
    """Every boxed phrase of the split's images."""
    root = Path(root)
    if split not in SPLITS:
        raise ConfigError(f"unknown Flickr30k Entities split {split!r}; choose one of {', '.join(SPLITS)}")
    try:
        image_ids = [line.strip() for line in (root / f"{split}.txt").read_text().splitlines() if line.strip()]
    except OSError as error:
        raise AnnotationError(f"{root / f'{split}.txt'}: cannot read ({error.strerror or error})") from error
    phrases = []
    for image_id in image_ids:
        boxes = read_entity_boxes(root / "Annotations" / f"{image_id}.xml")
        sentence_file = root / "Sentences" / f"{image_id}.txt"
        try:
            lines = sentence_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise AnnotationError(f"{sentence_file}: cannot read ({error.strerror or error})") from error
        for s, line in enumerate(lines):
            if line.count("[") != len(PHRASE.findall(line)):
                raise AnnotationError(f"{sentence_file}: line {s + 1} has a malformed [/EN#id/type phrase] mark")
            for p, match in enumerate(PHRASE.finditer(line)):
                entity = int(match.group(1))
                if entity not in boxes:
                    continue  # scene or non-visual phrase: no box to ground
                entity_boxes = boxes[entity]
                union = (min(b[0] for b in entity_boxes), min(b[1] for b in entity_boxes),
                         max(b[2] for b in entity_boxes), max(b[3] for b in entity_boxes))
                phrases.append(Phrase(image_id, s, p, entity, match.group(3), union))
    if not phrases:
        raise ConfigError(f"{root}: split {split!r} has no phrase with a box")
    return phrases


@dataclass
class FlickrGroundingDataConfig(FinetuneDataConfig):
    gt_features: list[str] = field(default_factory=list)  # ground-truth-box store(s), training only
    max_text_length: int = 24
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class FlickrGroundingConfig(FinetuneConfig):
    """A Flickr30k Entities grounding run (tasks/configs/flickr-grounding.yaml)."""

    data: FlickrGroundingDataConfig = field(default_factory=FlickrGroundingDataConfig)


class FlickrGroundingTask(RefExpTask):
    """Phrase grounding on `region_logits`, on the referring-expression machinery."""

    name = "flickr-grounding"
    config_class = FlickrGroundingConfig

    def __init__(self, config: FlickrGroundingConfig):
        super().__init__(config)
        self._phrases: dict[str, list[Phrase]] = {}

    def phrases(self, split: str) -> list[Phrase]:
        split = resolve_split(self.data, split)
        if split not in self._phrases:
            self._phrases[split] = read_phrases(self.data.root, split)
        return self._phrases[split]

    def expressions(self, split: str) -> list[Expression]:
        """The phrases as expressions; ref_id indexes `phrases(split)`."""
        return [Expression(i, 0, p.image_id, p.text, p.box) for i, p in enumerate(self.phrases(split))]

    def dataset(self, split: str) -> Dataset:
        split = resolve_split(self.data, split)
        training = split == self.data.train_split
        return RefExpDataset(self.expressions(split), self.store(training), self.tokenizer(),
                             self.data.max_text_length, self.data.max_regions, training,
                             f"{Path(self.data.root) / f'{split}.txt'} ({split})")

    def predict(self, model: nn.Module, split: str, progress: Callable | None = None) -> list[dict]:
        phrases = self.phrases(split)
        predictions = []
        for p in super().predict(model, split, progress):
            phrase = phrases[p["ref_id"]]
            predictions.append({"image_id": phrase.image_id, "sentence": phrase.sentence, "phrase": phrase.phrase,
                                "entity_id": phrase.entity_id, "box": p["box"], "score": p["score"]})
        return predictions

    def score(self, predictions: list[dict], split: str) -> dict[str, float]:
        gold = {p.key: p.box for p in self.phrases(split)}
        predicted = {(p["image_id"], p["sentence"], p["phrase"]): p["box"] for p in predictions}
        return {"accuracy": grounding_accuracy(predicted, gold), "num_phrases": float(len(gold)),
                "num_predictions": float(len(predictions))}
