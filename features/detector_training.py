"""Training and scoring a `MobileNetRCNN` on a detection data set (images, boxes, class ids), offline, on a CPU.

The trunk is frozen, so each training image's trunk map is computed once and kept in memory; a step then runs only
torchvision's RPN and RoI heads. Steps are a pure function of (seed, step): the images of a step come from a
seeded permutation per epoch and the samplers' randomness from a generator seeded per step. A run directory keeps
`settings.json`, `log.jsonl` and the latest `state.pt` (head weights, optimizer, step), written atomically every
`checkpoint_every` steps, so rerunning a killed run continues from there and ends with the same weights as an
uninterrupted one. Held-out scoring is PASCAL VOC's all-point average precision at IoU 0.5, averaged over classes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from features.atomic import atomic_path, write_json_atomic
from features.detector import pad_batch
from features.errors import FeaturesError
from features.images import read_image
from features.mobilenet_rcnn import MobileNetRCNN
from features.selection import SelectionRule

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SETTINGS_FILE = "settings.json"
LOG_FILE = "log.jsonl"
RUN_LOCK = "run.lock"  # the command's lock inside the run directory
SCORING_THRESHOLD = 0.05  # detections kept for average precision (the usual floor), not the operating threshold


@dataclass(frozen=True)
class DetectionSample:
    """One training or held-out image: boxes [K, 4] x1 y1 x2 y2 in original pixels, class ids [K] (1..C-1)."""

    image_id: str
    path: str
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class TrainingSettings:
    """Everything a run's result depends on besides the data; a resumed run must have the same."""

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 100

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to zero."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * self.learning_rate * (1 + math.cos(math.pi * progress))


@dataclass
class TrunkMap:
    """A training image at detection scale: its frozen trunk map [96, h, w] and its targets (detection pixels)."""

    maps: torch.Tensor
    size: tuple[int, int]
    boxes: torch.Tensor
    labels: torch.Tensor


def trunk_maps(detector: MobileNetRCNN, samples: Sequence[DetectionSample], batch_size: int = 32,
               progress: bool = True) -> list[TrunkMap]:
    """Decode every sample and run the frozen trunk once (the only image work training needs)."""
    out: list[TrunkMap] = []
    bar = tqdm(total=len(samples), desc="trunk maps", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            prepared = [detector.prepare(read_image(s.path).pixels) for s in chunk]
            maps, sizes = detector.trunk_maps(pad_batch(prepared), prepared)
            for sample, image, size, m in zip(chunk, prepared, sizes, maps, strict=True):
                h, w = image.image_hw
                scale = torch.tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h])
                valid = (-(-size[0] // 16), -(-size[1] // 16))
                out.append(TrunkMap(m[:, : valid[0], : valid[1]].clone(), size,
                                    torch.from_numpy(np.asarray(sample.boxes, np.float32)).reshape(-1, 4) * scale,
                                    torch.from_numpy(np.asarray(sample.labels, np.int64)).reshape(-1)))
            bar.update(len(chunk))
    return out


def _batch(items: list[TrunkMap]) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict]]:
    height = max(i.maps.shape[1] for i in items)
    width = max(i.maps.shape[2] for i in items)
    maps = items[0].maps.new_zeros(len(items), items[0].maps.shape[0], height, width)
    for k, item in enumerate(items):
        maps[k, :, : item.maps.shape[1], : item.maps.shape[2]] = item.maps
    targets = [{"boxes": i.boxes, "labels": i.labels} for i in items]
    return maps, [i.size for i in items], targets


def step_images(settings: TrainingSettings, step: int, count: int) -> list[int]:
    """The training images of `step`: consecutive slices of a seeded permutation per epoch (wrapping)."""
    per_epoch = max(1, count // settings.batch_size)
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(settings.seed * 7919 + epoch))
    return order[slot * settings.batch_size:(slot + 1) * settings.batch_size].tolist()


def train_detector(detector: MobileNetRCNN, train: Sequence[DetectionSample], run_dir: str | os.PathLike,
                   settings: TrainingSettings, progress: bool = True) -> dict:
    """Train the detector's heads in place; resumes from `run_dir/state.pt`. Returns {"steps", "final_loss"}."""
    run_dir = Path(run_dir)
    if len(train) < settings.batch_size:
        raise FeaturesError(f"{len(train)} training images for a batch of {settings.batch_size}")
    _check_settings(run_dir, settings, detector)
    heads = detector.heads
    optimizer = torch.optim.SGD(heads.parameters(), lr=settings.learning_rate, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    start = 0
    state_path = run_dir / STATE_FILE
    if state_path.is_file():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            heads.load_state_dict(state["heads"])
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["step"])
        except Exception as error:  # noqa: BLE001 - any unreadable or foreign state is the same user error
            raise FeaturesError(f"{state_path}: not a readable training state ({type(error).__name__}: "
                                f"{str(error)[:200]}); remove {run_dir} to start over") from error
        logger.info("%s: resuming at step %d of %d", run_dir, start, settings.steps)
    if start >= settings.steps:
        return {"steps": start, "final_loss": None}
    cached = trunk_maps(detector, train, progress=progress)
    detector.train()
    loss_value = None
    bar = tqdm(total=settings.steps, initial=start, desc="detector", unit="step", disable=not progress,
               dynamic_ncols=True)
    with bar:
        for step in range(start, settings.steps):
            torch.manual_seed(settings.seed * 1_000_003 + step)  # the RPN's and RoI heads' samplers
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate_at(step)
            maps, sizes, targets = _batch([cached[i] for i in step_images(settings, step, len(cached))])
            losses = heads(maps, sizes, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FeaturesError(f"{run_dir}: the detector's loss became {loss.item()} at step {step}; "
                                    f"lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 10.0)
            optimizer.step()
            loss_value = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            done = step + 1
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                _log(run_dir, {"step": done, "loss": round(loss_value, 5),
                               **{k: round(float(v.detach()), 5) for k, v in losses.items()}})
                _save_state(state_path, heads, optimizer, done)
    detector.eval()
    return {"steps": settings.steps, "final_loss": loss_value}


def _check_settings(run_dir: Path, settings: TrainingSettings, detector: MobileNetRCNN) -> None:
    """A new run writes its settings; a resumed one must match them (else its steps would mix two runs)."""
    recorded = {"training": asdict(settings), "detector": detector.config.to_dict()}
    recorded = json.loads(json.dumps(recorded))  # tuples as lists, as read back
    path = run_dir / SETTINGS_FILE
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_LOCK) if run_dir.is_dir() else []
    if others and not path.is_file():
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise FeaturesError(f"{run_dir}: is not empty and holds no detector run ({shown}); nothing there is touched: "
                            "choose a new or empty --run-dir")
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise FeaturesError(f"{path}: not readable ({error}); remove {run_dir} to start over") from error
        if found != recorded:
            raise FeaturesError(f"{path}: this run directory was started with other settings; remove {run_dir} to "
                                f"start over, or rerun with the same settings to resume")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, recorded)


def _save_state(path: Path, heads: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    with atomic_path(path) as tmp:
        torch.save({"heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)


def _log(run_dir: Path, record: dict) -> None:
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def detect(detector: MobileNetRCNN, samples: Sequence[DetectionSample], rule: SelectionRule | None = None,
           batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Detections per sample under `rule` (default: the detector's own): boxes, labels, scores (numpy)."""
    saved = detector.config.selection
    if rule is not None:
        detector.config.selection = rule.as_dict()
    try:
        out = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            prepared = [detector.prepare(read_image(s.path).pixels) for s in chunk]
            for regions in detector(pad_batch(prepared), prepared):
                out.append({"boxes": regions.boxes.numpy(), "labels": regions.objects_id.numpy(),
                            "scores": regions.objects_conf.numpy()})
        return out
    finally:
        detector.config.selection = saved


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] against b [M, 4] -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def average_precision(detections: list[dict], samples: Sequence[DetectionSample], iou: float = 0.5) -> dict:
    """PASCAL VOC all-point AP at `iou` per class present in the ground truth, and their mean (`map`)."""
    classes = sorted({int(c) for s in samples for c in s.labels})
    per_class = {}
    for cls in classes:
        gt = {i: s.boxes[s.labels == cls] for i, s in enumerate(samples)}
        total = sum(len(b) for b in gt.values())
        found = [(float(score), i, box) for i, d in enumerate(detections)
                 for box, label, score in zip(d["boxes"], d["labels"], d["scores"], strict=True) if label == cls]
        found.sort(key=lambda f: -f[0])
        used = {i: np.zeros(len(b), bool) for i, b in gt.items()}
        hits = np.zeros(len(found))
        for k, (_, i, box) in enumerate(found):
            if len(gt[i]):
                overlaps = box_iou(box[None], gt[i])[0]
                best = int(overlaps.argmax())
                if overlaps[best] >= iou and not used[i][best]:
                    used[i][best] = True
                    hits[k] = 1
        per_class[cls] = _voc_ap(hits, total)
    return {"map": float(np.mean(list(per_class.values()))) if per_class else 0.0, "per_class": per_class}


def _voc_ap(hits: np.ndarray, total: int) -> float:
    if total == 0:
        return 0.0
    tp = np.cumsum(hits)
    recall = np.concatenate([[0.0], tp / total, [1.0]])
    precision = np.concatenate([[0.0], tp / np.arange(1, len(hits) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    changes = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[changes + 1] - recall[changes]) * precision[changes + 1]))


def precision_recall(detections: list[dict], samples: Sequence[DetectionSample], iou: float = 0.5) -> dict:
    """At the operating selection: share of kept boxes matching an unmatched ground-truth box of their class
    (precision), share of ground-truth boxes found (recall), and share of images whose boxes all match one to one."""
    kept = matched = exact = 0
    for d, s in zip(detections, samples, strict=True):
        used = np.zeros(len(s.boxes), bool)
        hit = 0
        for box, label in zip(d["boxes"], d["labels"], strict=True):
            overlaps = box_iou(box[None], s.boxes)[0] * (s.labels == label) * ~used if len(s.boxes) else []
            if len(overlaps) and overlaps.max() >= iou:
                used[int(np.argmax(overlaps))] = True
                hit += 1
        kept += len(d["boxes"])
        matched += hit
        exact += int(hit == len(s.boxes) == len(d["boxes"]))
    total = sum(len(s.boxes) for s in samples)
    return {"precision": matched / max(kept, 1), "recall": matched / max(total, 1),
            "images_exact": exact / max(len(samples), 1)}


def score_detector(detector: MobileNetRCNN, held_out: Sequence[DetectionSample]) -> dict:
    """mAP@0.5 (detections scoring >= 0.05) and the operating rule's precision / recall on held-out samples."""
    scoring = SelectionRule(**{**detector.config.selection, "conf_threshold": SCORING_THRESHOLD, "max_boxes": 100})
    ap = average_precision(detect(detector, held_out, scoring), held_out)
    operating = precision_recall(detect(detector, held_out), held_out)
    return {"map50": round(ap["map"], 4), "images": len(held_out),
            "boxes": int(sum(len(s.boxes) for s in held_out)),
            **{k: round(v, 4) for k, v in operating.items()},
            "ap50_per_class": {str(k): round(v, 4) for k, v in ap["per_class"].items()}}
