"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg): the refer toolkit's files, IoU targets, and the task.

Files (in `data.root`): `refs(unc).p` (`refs(umd).p` for RefCOCOg), a pickled list of refs {ref_id, ann_id,
image_id, split, sentences [{sent}]}, read with the restricted unpickler; and `instances.json` (COCO format,
bbox [x, y, w, h]). Splits come from each ref's `split`: train / val / testA / testB (unc) or train / val / test
(umd). One sample per sentence.

Regions: the detected-box store (`data.features`) for every split; for training the ground-truth-box store
(`data.gt_features`) is joined after it (FeatureStore join: detected boxes first), truncated to
`max_regions - 1` boxes after the IMG token. The IMG token's box is the whole image.
Targets: the IoU of every region's box with the referred box; in training values below 0.5 are set to 0 (the
positives keep their IoU as a soft target, as the reference). Loss: BCE-with-logits (mean) × R on
`region_logits`, padded regions excluded from the target (their logit is −10000 and target 0).
Metric: percent of expressions whose top-scoring region has IoU ≥ 0.5 with the referred box (see
`tasks.metrics.refexp_accuracy` for how this compares with the reference's > 0.5 on "+1" pixel boxes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from features.safe_pickle import safe_load
from features.store import FeatureStore
from tasks.data.annotations import (
    box_field,
    id_field,
    image_key_resolver,
    int_field,
    keep_known_images,
    list_field,
    load_json,
    require,
    str_field,
)
from tasks.data.regions import collate_visual, region_boxes, visual_input, visual_rows
from tasks.engine.evaluation import eval_batches, in_dataset_order
from tasks.engine.padding import MODEL_PADDED_KEYS, REGIONS, cut_to_longest
from tasks.engine.sampler import length_order
from tasks.engine.task import ExampleInputs, PredictExample, StepOutput, TaskDataset
from tasks.errors import AnnotationError, ConfigError
from tasks.figures.drawing import draw_boxes
from tasks.finetuning import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneTask,
    model_inputs,
    resolve_split,
    soft_bce_sum,
)
from tasks.metrics import box_iou, refexp_accuracy, xywh_to_xyxy

logger = logging.getLogger(__name__)

POSITIVE_IOU = 0.5


@dataclass
class Expression:
    ref_id: int
    sent_id: int
    image_id: int
    text: str
    box: tuple[float, float, float, float]  # referred object, x1 y1 x2 y2 pixels


def read_refs(refs_path: str | Path, instances_path: str | Path, split: str) -> list[Expression]:
    """Every sentence of the refs in `split`, each with its referred box from instances.json."""
    refs = safe_load(refs_path)
    if not isinstance(refs, list):
        raise AnnotationError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    instances = load_json(instances_path)
    require(instances, ["annotations"], str(instances_path), "the file")
    boxes = {}
    source = str(instances_path)
    for i, ann in enumerate(list_field(instances, "annotations", source, "the file")):
        require(ann, ["id", "bbox"], source, f"annotations[{i}]")
        box = box_field(ann, "bbox", source, f"annotations[{i}]")
        boxes[int_field(ann, "id", source, f"annotations[{i}]")] = tuple(
            xywh_to_xyxy(torch.tensor(box, dtype=torch.float32)).tolist())
    splits = set()
    expressions = []
    source = str(refs_path)
    for i, ref in enumerate(refs):
        where = f"refs[{i}]"
        require(ref, ["ref_id", "ann_id", "image_id", "split", "sentences"], source, where)
        if not isinstance(ref["split"], str):
            raise AnnotationError(f"{source}: {where}: split must be a string, got {ref['split']!r}")
        splits.add(ref["split"])
        if ref["split"] != split:
            continue
        ann_id, ref_id = int_field(ref, "ann_id", source, where), int_field(ref, "ref_id", source, where)
        image_id = id_field(ref, "image_id", source, where)
        if ann_id not in boxes:
            raise AnnotationError(f"{refs_path}: ref {ref_id} names ann_id {ann_id}, which {instances_path} does "
                                  "not have")
        for j, sentence in enumerate(list_field(ref, "sentences", source, where)):
            inner = f"{where}.sentences[{j}]"
            require(sentence, ["sent"], source, inner)
            sent_id = int_field(sentence, "sent_id", source, inner) if "sent_id" in sentence else j
            expressions.append(Expression(ref_id, sent_id, image_id, str_field(sentence, "sent", source, inner),
                                          boxes[ann_id]))
    if not expressions:
        raise ConfigError(f"{refs_path}: no expressions in split {split!r}; the file has {sorted(splits)}")
    return expressions


def iou_targets(boxes: torch.Tensor, referred: torch.Tensor, training: bool) -> torch.Tensor:
    """IoU of each region box [R, 4] with the referred box [4]; in training IoU < 0.5 becomes 0."""
    iou = box_iou(boxes, referred[None]).squeeze(1)  # [R]
    return torch.where(iou >= POSITIVE_IOU, iou, torch.zeros_like(iou)) if training else iou


@dataclass
class RefExpDataConfig(FinetuneDataConfig):
    gt_features: list[str] = field(default_factory=list)  # ground-truth-box store(s), training only
    refs_file: str = "refs(unc).p"
    instances_file: str = "instances.json"
    eval_splits: list[str] = field(default_factory=lambda: ["val", "testA", "testB"])


@dataclass
class RefExpConfig(FinetuneConfig):
    """A referring-expression fine-tuning run (tasks/configs/refcoco*.yaml)."""

    data: RefExpDataConfig = field(default_factory=RefExpDataConfig)


class RefExpDataset(TaskDataset):
    """One item per sentence: tokens, regions (IMG + boxes), each region's box and IoU target."""

    def __init__(self, expressions, store, tokenizer, max_text_length, max_regions, training, source, strict=False):
        kept = keep_known_images(expressions, lambda e: e.image_id, image_key_resolver(store.ids), source,
                                 "expressions", strict)
        self.expressions = [e for e, _ in kept]
        self.image_keys = [sid for _, sid in kept]
        self.image_ids = [(key,) for key in self.image_keys]
        self.text = tokenizer.encode([e.text for e in self.expressions], max_text_length)
        self.text_lengths = self.text.attention_mask.sum(1)
        self.region_counts = visual_rows(store, self.image_ids, max_regions)
        self.store, self.max_regions, self.training = store, max_regions, training

    def __len__(self) -> int:
        return len(self.expressions)

    def __getitem__(self, index: int) -> dict:
        expression = self.expressions[index]
        regions = self.store.read(self.image_keys[index], float32=False, optional=())
        visual = visual_input(regions, self.max_regions)
        boxes = region_boxes(regions.boxes[: visual.num_boxes], regions.image_hw)  # [R', 4]
        return {
            "index": index,
            "input_ids": torch.from_numpy(self.text.input_ids[index]),
            "attention_mask": torch.from_numpy(self.text.attention_mask[index]),
            "token_type_ids": torch.from_numpy(self.text.token_type_ids[index]),
            "visual": visual,
            "boxes": boxes,
            "referred": torch.tensor(expression.box),
            "target": iou_targets(boxes, torch.tensor(expression.box), self.training),
        }


def collate_refexp(samples: list[dict]) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in
             ("input_ids", "attention_mask", "token_type_ids", "referred")}
    batch.update(collate_visual([s["visual"] for s in samples]))
    regions = batch["region_mask"].shape[1]
    batch["target"] = torch.zeros(len(samples), regions)
    batch["boxes"] = torch.zeros(len(samples), regions, 4)
    for i, s in enumerate(samples):
        batch["target"][i, : len(s["target"])] = s["target"]
        batch["boxes"][i, : len(s["boxes"])] = s["boxes"]
    batch["index"] = torch.tensor([s["index"] for s in samples])
    return batch


class RefExpTask(FinetuneTask):
    """Referring-expression comprehension; subclasses fix the dataset name, task token and split files."""

    name = "refexp"
    main_metric = "accuracy"
    higher_is_better = True
    config_class = RefExpConfig
    predict_modes = ("expression",)
    example_inputs = ExampleInputs("expression", example_text="the red circle")
    head = "region_logits"
    metric_labels = {"accuracy": "accuracy (IoU >= 0.5)"}
    padded_keys = {**MODEL_PADDED_KEYS, "target": (REGIONS, 0), "boxes": (REGIONS, 0)}  # one row per region
    data: RefExpDataConfig

    def __init__(self, config: RefExpConfig):
        super().__init__(config)
        self._stores: dict[bool, FeatureStore] = {}

    def expressions(self, split: str) -> list[Expression]:
        split = resolve_split(self.data, split)
        root = Path(self.data.root)
        return read_refs(root / self.data.refs_file, root / self.data.instances_file, split)

    def store(self, training: bool) -> FeatureStore:
        """Detected boxes; for training, joined with the ground-truth boxes when a GT store is given."""
        if training not in self._stores:
            if not self.data.features:
                raise ConfigError("data.features: name the detected-box feature store file(s)")
            paths = list(self.data.features) + (list(self.data.gt_features) if training else [])
            self._stores[training] = self.open_store(paths)
        return self._stores[training]

    def dataset(self, split: str) -> Dataset:
        split = resolve_split(self.data, split)
        training = split == self.data.train_split
        return RefExpDataset(self.expressions(split), self.store(training), self.tokenizer(),
                             self.data.max_text_length, self.data.max_regions, training,
                             f"{Path(self.data.root) / self.data.refs_file} ({split})", self.data.strict)

    def collate(self, samples: list) -> dict:
        return cut_to_longest(collate_refexp(samples), self.padded_keys)

    def training_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> StepOutput:
        ids = self.task_ids(model, batch["input_ids"].shape[0], batch["input_ids"].device)
        logits = model(**model_inputs(batch), task_ids=ids, heads=["region_logits"]).region_logits  # [B, R]
        hit = batch["target"].gather(1, logits.argmax(dim=1, keepdim=True)) > 0  # the reference's train metric
        return StepOutput({"loss": soft_bce_sum(logits, batch["target"])},
                          metrics={"accuracy": hit.float().mean().detach()})

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str, progress: Callable | None = None) -> list[dict]:
        """[{"ref_id", "sent_id", "image_id", "box" (x1 y1 x2 y2), "score", "iou"}] per expression."""
        dataset = self.dataset(split)
        order = length_order(dataset)
        predictions = []
        for batch in eval_batches(model, dataset, self.collate, self.data.eval_batch_size, progress, order):
            device = batch["input_ids"].device
            ids = self.task_ids(model, batch["input_ids"].shape[0], device)
            logits = model(**model_inputs(batch), task_ids=ids, heads=["region_logits"]).region_logits
            best = logits.argmax(dim=1)  # [B]
            chosen = batch["boxes"][torch.arange(len(best), device=device), best]  # [B, 4]
            ious = batch["target"].gather(1, best[:, None]).squeeze(1)  # eval targets are raw IoU
            for k, index in enumerate(batch["index"].tolist()):
                e = dataset.expressions[index]
                predictions.append({"ref_id": e.ref_id, "sent_id": e.sent_id, "image_id": e.image_id,
                                    "box": chosen[k].tolist(), "score": torch.sigmoid(logits[k, best[k]]).item(),
                                    "iou": ious[k].item()})
        return in_dataset_order(predictions, order)

    def score(self, predictions: list[dict], split: str) -> dict[str, float]:
        """Accuracy over every expression of the split: one without features (no prediction) counts as wrong."""
        referred = {(e.ref_id, e.sent_id): e.box for e in self.expressions(split)}
        chosen = {(p["ref_id"], p["sent_id"]): p["box"] for p in predictions}
        keys = list(referred)
        pred = torch.tensor([chosen.get(key, [0.0, 0.0, 0.0, 0.0]) for key in keys])  # an empty box: IoU 0
        gt = torch.tensor([referred[key] for key in keys])
        return {"accuracy": refexp_accuracy(pred, gt), "num_expressions": float(len(keys)),
                "num_without_features": float(len(keys) - len(chosen.keys() & referred.keys()))}

    # ------------------------------------------------------------------ one image

    @torch.no_grad()
    def chance(self, split: str, train: RefExpTask | None = None) -> dict[str, float]:
        """Expected accuracy of a uniformly random region (IMG token included, as the model may pick it)."""
        store = self.store(False)
        hits = []
        for e in self.expressions(split):
            regions = store.read(str(e.image_id))
            boxes = region_boxes(regions.boxes[: self.data.max_regions - 1], regions.image_hw)
            iou = box_iou(boxes, torch.tensor([e.box]))[:, 0]
            hits.append(float((iou >= 0.5).float().mean()))
        return {"accuracy": 100 * float(np.mean(hits))}

    def predict_one(self, model: nn.Module, example: PredictExample) -> dict[str, Any]:
        """{"expression", "box", "score", "top": the 3 best rows [{"box" (x1 y1 x2 y2 pixels), "score", "row"}]}.

        Rows are the IMG token (the whole image) and the regions, scored by sigmoid(region logit).
        """
        device = example.visual["region_features"].device
        text = self.tokenizer().encode([example.text], self.data.max_text_length).tensors(device)
        ids = self.task_ids(model, 1, device, example.task_token)
        logits = model(**text, **example.visual, task_ids=ids, heads=["region_logits"]).region_logits.float()[0]
        rows = region_boxes(example.boxes, example.image.original_hw)  # [R, 4]
        scores, best = torch.sigmoid(logits[: len(rows)]).topk(min(3, len(rows)))
        top = [{"box": [round(float(v), 2) for v in rows[r]], "score": p, "row": r}
               for p, r in zip(scores.tolist(), best.tolist(), strict=True)]
        return {"expression": example.text, "box": top[0]["box"], "score": top[0]["score"], "top": top}

    def headline(self, result: Mapping[str, Any]) -> str:
        return f"{result['expression']} ({result['score']:.2f})"

    def draw(self, example: PredictExample, result: Mapping[str, Any]) -> Image.Image:
        return draw_boxes(example.image, example.boxes, result["box"], self.headline(result))

    def summary_lines(self, result: Mapping[str, Any]) -> list[str]:
        box = " ".join(f"{v:.1f}" for v in result["box"])
        lines = [f"expression: {result['expression']}", f"chosen box (x1 y1 x2 y2): {box}  score {result['score']:.3f}"]
        for i, candidate in enumerate(result["top"]):
            whole = "  (whole image)" if candidate["row"] == 0 else ""
            lines.append(f"  {i + 1}. {' '.join(f'{v:.1f}' for v in candidate['box'])}  {candidate['score']:.3f}{whole}")
        return lines


class RefCOCOTask(RefExpTask):
    name = "refcoco"


class RefCOCOPlusTask(RefExpTask):
    name = "refcoco+"


class RefCOCOgTask(RefExpTask):
    name = "refcocog"
