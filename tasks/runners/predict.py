"""Predict on one new image: a fine-tuned checkpoint answers a question, grounds an expression, or ranks captions.

The image's regions are extracted in-process with a registered detector, then built into the model's visual input
exactly as the tasks build it (`tasks.data.regions.visual_input`: IMG token, then up to `max_regions - 1` boxes) and
paired with the text tokenised as in training (`tasks.data.tokenization`). What the checkpoint was trained with comes
from its directory: `config.json` (the model, the VQA answer list in `id2label`) and, when the trainer wrote it,
`run_config.yaml` (tokenizer, text length, regions per image, the feature store and hence the detector).

Scores: VQA answers are sigmoid(answer_logits) (the loss is BCE per answer); a referring expression picks the
region (IMG row = the whole image, then the boxes) with the highest region logit, scored by its sigmoid; captions
are ranked by `pair_logit` (a pretraining checkpoint: by P(aligned) from its alignment head, zero-shot), with the
softmax over the given captions beside it (retrieval trains a softmax over candidates).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from features.detector import RegionDetector, pad_batch
from features.errors import FeaturesError
from features.images import LoadedImage
from features.inputs import BOX_FORMATS, clip_boxes, load_boxes
from features.store import FeatureStore, Regions
from tasks.data.annotations import load_json
from tasks.data.regions import collate_visual, visual_input
from tasks.errors import ConfigError
from tasks.finetuning import TASK_TOKEN_IDS, task_ids_for

logger = logging.getLogger(__name__)

MODES = ("question", "expression", "captions")
# the head each mode reads, and the task (12-in-1 token) it uses when the checkpoint does not say
MODE_HEADS = {"question": "answer_head", "expression": "region_score_head", "captions": "pair_head"}
DEFAULT_TOKEN_TASK = {"question": "vqa", "expression": "refcoco", "captions": "retrieval-flickr30k"}
# when neither --detector nor the checkpoint's feature store names one: the detector that gives this feature size
DETECTOR_BY_FEATURE_SIZE = {96: "mobilenet-v2", 2048: "butd-r101-c4"}
VMB_DETECTOR = "vmb-x152-fpn"  # the detector of the released vilbert-multi-task (12-in-1) models
GRID = 3  # fallback boxes for detectors that need given boxes: the whole image and a GRID x GRID grid


# --------------------------------------------------------------------------------------------------- checkpoint


@dataclass
class CheckpointInfo:
    """What a checkpoint directory says about its model and how it was trained."""

    directory: Path
    config: dict  # config.json
    run_config: dict = field(default_factory=dict)  # run_config.yaml (the trainer's merged config), if present

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def is_pretraining(self) -> bool:
        return "ViLBertForPreTraining" in self.architectures

    @property
    def feature_size(self) -> int:
        """The region feature size the model takes (v_feature_size)."""
        from vilbert import ViLBertConfig

        return int(self.config.get("v_feature_size", ViLBertConfig().v_feature_size))

    @property
    def data(self) -> dict:
        return dict(self.run_config.get("data") or {})

    @property
    def trained_task(self) -> str | None:
        """The fine-tuning task of the run (as a 12-in-1 token name), read from the run config's data keys."""
        data = self.data
        if "min_answer_count" in data:
            return "vqa"
        if "dataset" in data and "annotations" in data:
            return f"retrieval-{data['dataset']}"
        if "refs_file" in data:
            if "umd" in str(data["refs_file"]):
                return "refcocog"
            return "refcoco+" if "+" in str(data.get("root", "")) else "refcoco"
        return None

    def answers(self) -> list[str] | None:
        """The VQA answer list (config.json id2label), or None when the labels are the default LABEL_i."""
        id2label = self.config.get("id2label") or {}
        answers = [id2label[k] for k in sorted(id2label, key=int)]
        return answers if answers and not all(a == f"LABEL_{i}" for i, a in enumerate(answers)) else None

    def feature_extractor(self) -> dict | None:
        """The extractor description of the feature store the run trained on, when that file is still there."""
        stores = self.data.get("features") or []
        for path in stores[:1]:
            if Path(path).is_file():
                try:
                    return FeatureStore(path).extractor
                except FeaturesError as error:
                    logger.warning("cannot read the training feature store %s: %s", path, error)
        return None


def read_checkpoint(directory: str | os.PathLike) -> CheckpointInfo:
    """Read `config.json` (required) and `run_config.yaml` (optional) of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--checkpoint {directory}: no such directory")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"--checkpoint {directory}: no config.json (a save_pretrained directory)")
    config = load_json(directory / "config.json")
    run_config = {}
    run_file = directory / "run_config.yaml"
    if run_file.is_file():
        try:
            run_config = yaml.safe_load(run_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{run_file}: not readable YAML ({error})") from error
    return CheckpointInfo(directory, config, run_config if isinstance(run_config, dict) else {})


def load_model(info: CheckpointInfo, mode: str, device: str | torch.device) -> nn.Module:
    """The checkpoint's model in eval mode. Fails when the mode's head is not in the checkpoint.

    A pretraining checkpoint serves `captions` only (zero-shot, alignment head); task checkpoints must hold the
    mode's head weights (a head missing from the file would start random).
    """
    from vilbert import ViLBertForPreTraining, ViLBertForVLTasks

    if info.is_pretraining and mode != "captions":
        raise ConfigError(f"--checkpoint {info.directory}: a pretraining checkpoint has no "
                          f"{MODE_HEADS[mode]}; fine-tune it first (vilbert finetune --init {info.directory})")
    cls = ViLBertForPreTraining if info.is_pretraining else ViLBertForVLTasks
    try:
        model, loading = cls.from_pretrained(str(info.directory), output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"--checkpoint {info.directory}: cannot load the weights ({error})") from error
    if not info.is_pretraining:
        head = MODE_HEADS[mode]
        if any(key.startswith(f"{head}.") for key in loading.get("missing_keys", [])):
            raise ConfigError(f"--checkpoint {info.directory}: model.safetensors has no {head} weights "
                              f"(needed for --{mode})")
    trained = info.trained_task
    if trained and not info.is_pretraining and not _serves(trained, mode):
        logger.warning("%s was fine-tuned for %s; its %s was not trained", info.directory, trained, MODE_HEADS[mode])
    return model.to(device).eval()


def _serves(task: str, mode: str) -> bool:
    return {"question": task == "vqa", "expression": task.startswith("refcoco"),
            "captions": task.startswith("retrieval")}[mode]


def token_task(info: CheckpointInfo, mode: str, override: str | None = None) -> str:
    """The 12-in-1 task whose token the model gets (used only by models with task tokens)."""
    if override:
        if override not in TASK_TOKEN_IDS:
            raise ConfigError(f"--task-token {override!r}: choose one of {', '.join(TASK_TOKEN_IDS)}")
        return override
    trained = info.trained_task
    return trained if trained and _serves(trained, mode) else DEFAULT_TOKEN_TASK[mode]


def text_settings(info: CheckpointInfo, mode: str) -> tuple[int, int]:
    """(max_text_length, max_regions): the run's, else the task config defaults."""
    from tasks.refexp import RefExpDataConfig
    from tasks.retrieval import RetrievalDataConfig
    from tasks.vqa import VQADataConfig

    defaults = {"question": VQADataConfig, "expression": RefExpDataConfig, "captions": RetrievalDataConfig}[mode]()
    data = info.data if info.trained_task is None or _serves(info.trained_task, mode) else {}
    return int(data.get("max_text_length", defaults.max_text_length)), int(data.get("max_regions", defaults.max_regions))


def tokenizer_directory(info: CheckpointInfo, override: str | None = None) -> str:
    """--tokenizer, else the run's data.tokenizer or model.text_init, else the checkpoint dir if it has a vocab."""
    model = info.run_config.get("model") or {}
    for candidate in (override, info.data.get("tokenizer"), model.get("text_init")):
        if candidate:
            return str(candidate)
    if (info.directory / "vocab.txt").is_file() or (info.directory / "tokenizer.json").is_file():
        return str(info.directory)
    raise ConfigError(f"--checkpoint {info.directory}: no tokenizer recorded (run_config.yaml data.tokenizer); "
                      "pass --tokenizer DIR (a local BERT directory with vocab.txt)")


def detector_name(info: CheckpointInfo, requested: str | None, feature_size: int) -> str:
    """--detector, else the detector of the run's feature store, else the one config.json's `visual_features`
    records (`vilbert convert`), else for a converted vilbert-multi-task checkpoint (2048-d, no run config, not
    the beta answer head) the VMB X-152 FPN its features came from, else the one giving the model's feature size."""
    if requested:
        return requested
    extractor = info.feature_extractor() or {}
    if extractor.get("detector"):
        return str(extractor["detector"])
    recorded = info.config.get("visual_features")
    if isinstance(recorded, dict) and recorded.get("detector"):
        return str(recorded["detector"])
    if not info.run_config and feature_size == 2048 and info.config.get("answer_head_type") != "beta":
        return VMB_DETECTOR
    if feature_size in DETECTOR_BY_FEATURE_SIZE:
        return DETECTOR_BY_FEATURE_SIZE[feature_size]
    raise ConfigError(f"--checkpoint {info.directory}: no detector recorded for its {feature_size}-d features; "
                      "pass --detector NAME")


def check_detector(detector: RegionDetector, feature_size: int, allow_random: bool) -> None:
    """The detector must give the model's feature size, and have real weights unless `allow_random`."""
    if detector.feature_dim != feature_size:
        raise ConfigError(f"detector {detector.name} gives {detector.feature_dim}-d region features but the "
                          f"checkpoint expects {feature_size}-d (v_feature_size); pass the detector it was trained on")
    info = detector.extractor_info()
    if not allow_random and info.get("weights") in (None, "random") and not info.get("weights_sha256"):
        hint = getattr(detector, "weights_hint", None)
        raise ConfigError(f"detector {detector.name} has random weights; pass --weights "
                          f"{hint or 'FILE'} (or --random-detector for a smoke run)")


# ------------------------------------------------------------------------------------------------------ regions


def needs_given_boxes(detector: RegionDetector) -> bool:
    """Detectors that pool features on given boxes (MobileNetV2) and detect none themselves."""
    return detector.extractor_info().get("boxes") == "given"


def grid_boxes(image_hw: tuple[int, int], cells: int = GRID) -> np.ndarray:
    """The whole image, then a `cells` x `cells` grid, row by row: float32 [1 + cells², 4] x1 y1 x2 y2."""
    height, width = image_hw
    xs, ys = np.linspace(0, width, cells + 1), np.linspace(0, height, cells + 1)
    grid = [[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(cells) for c in range(cells)]
    return np.asarray([[0, 0, width, height], *grid], dtype=np.float32)


def boxes_for_image(path: str | os.PathLike, box_format: str, image_path: str | os.PathLike) -> np.ndarray:
    """Given boxes for one image from a JSON file: a plain list of boxes, or {image_id or "boxes": [...]}.

    The image id is the image file's name without extension (as `vilbert extract` names folder images).
    Returns float32 [K, 4] x1 y1 x2 y2 in original pixels.
    """
    path = Path(path)
    data = load_json(path)
    if isinstance(data, list):  # a plain list: the boxes of this image
        return _boxes_array(data, box_format, path)
    if not isinstance(data, dict):
        raise FeaturesError(f"{path}: expected a list of boxes or {{image_id: [[x1, y1, x2, y2], ...]}}")
    image_id = Path(image_path).stem
    boxes = load_boxes(path, box_format)
    for key in (image_id, Path(image_path).name, "boxes"):
        if key in boxes:
            return boxes[key]
    raise FeaturesError(f"{path}: no boxes for image {image_id!r} (nor a \"boxes\" entry); "
                        f"it has {', '.join(sorted(boxes)[:5]) or 'no entries'}")


def _boxes_array(entries: list, box_format: str, path: Path) -> np.ndarray:
    """A plain JSON list of boxes in `box_format` -> float32 [K, 4] x1 y1 x2 y2 (validated like load_boxes)."""
    from tasks.metrics import xywh_to_xyxy

    if box_format not in BOX_FORMATS:
        raise FeaturesError(f"box format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")
    valid = all(isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in b) for b in entries)
    array = np.asarray(entries, dtype=np.float64).reshape(-1, 4) if valid else None
    if array is None or not len(array) or not np.isfinite(array).all():
        raise FeaturesError(f"{path}: expected a non-empty list of boxes of 4 finite numbers each")
    if box_format == "xywh":
        if (array[:, 2:] < 0).any():
            raise FeaturesError(f"{path}: negative width or height in xywh boxes")
        array = xywh_to_xyxy(array).numpy()
    return array.astype(np.float32)


@torch.no_grad()
def detect_regions(
    detector: RegionDetector,
    loaded: LoadedImage,
    boxes: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    image_id: str = "image",
) -> Regions:
    """One decoded image (`features.images.read_image`) through a detector as `vilbert extract` runs it.

    `boxes` (float32 [K, 4], original pixels) are clipped to the image and pooled on; without them the detector
    detects its own. The returned regions' boxes are in original pixels.
    """
    prepared = detector.prepare(loaded.pixels)
    if loaded.scale != 1.0:  # decoded downscaled: the detector maps boxes back to original pixels
        prepared.scale *= loaded.scale
        prepared.image_hw = loaded.original_hw
    given = None
    if boxes is not None:
        clipped = clip_boxes(np.asarray(boxes, dtype=np.float32), loaded.original_hw)
        if clipped.clipped:
            logger.warning("%s: %d given box(es) reached outside the image and were clipped", image_id,
                           clipped.clipped)
        given = [torch.from_numpy(clipped.boxes).to(device)]
    detector = detector.to(device).eval()
    pixels = pad_batch([prepared], getattr(detector, "size_divisible", 1)).to(device)
    (result,) = detector(pixels, [prepared], given)
    if len(result.boxes) == 0:
        raise FeaturesError(f"{image_id}: the detector {detector.name} found no regions")
    return Regions(
        image_id=image_id,
        image_hw=tuple(int(v) for v in loaded.original_hw),
        features=result.features.detach().float().cpu().numpy(),
        boxes=result.boxes.detach().float().cpu().numpy(),
    )


# ------------------------------------------------------------------------------------------------------ models


@dataclass
class ModelInput:
    """One image's model input: the visual rows and the pixel box of each row (the IMG row = whole image)."""

    visual: dict[str, torch.Tensor]  # region_features [1, R, D], region_locations [1, R, 5], region_mask [1, R]
    row_boxes: np.ndarray  # [R, 4] float32


def model_input(regions: Regions, max_regions: int, device: str | torch.device) -> ModelInput:
    from tasks.refexp import region_boxes

    visual = visual_input(regions, max_regions)
    rows = region_boxes(regions.boxes[: visual.num_boxes], regions.image_hw).numpy()
    return ModelInput({k: v.to(device) for k, v in collate_visual([visual]).items()}, rows)


def encode_text(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    text = tokenizer.encode(texts, max_length)
    return {"input_ids": torch.from_numpy(text.input_ids).to(device),
            "attention_mask": torch.from_numpy(text.attention_mask).to(device),
            "token_type_ids": torch.from_numpy(text.token_type_ids).to(device)}


@torch.no_grad()
def answer_question(model: nn.Module, tokenizer, inputs: ModelInput, question: str, answers: list[str],
                    max_text_length: int, top_k: int = 5, task: str = "vqa") -> list[dict]:
    """The top-k answers [{"answer", "score"}] by sigmoid(answer_logits), best first."""
    if len(answers) != model.config.num_labels:
        raise ConfigError(f"the answer list has {len(answers)} answers but the answer head has "
                          f"{model.config.num_labels} outputs")
    device = inputs.visual["region_features"].device
    text = encode_text(tokenizer, [question], max_text_length, device)
    out = model(**text, **inputs.visual, task_ids=task_ids_for(model, task, 1, device), heads=["answer_logits"])
    scores, labels = torch.sigmoid(out.answer_logits.float()[0]).topk(min(top_k, len(answers)))
    return [{"answer": answers[i], "score": s} for s, i in zip(scores.tolist(), labels.tolist(), strict=True)]


@torch.no_grad()
def ground_expression(model: nn.Module, tokenizer, inputs: ModelInput, expression: str, max_text_length: int,
                      top_k: int = 3, task: str = "refcoco") -> list[dict]:
    """The top-k regions [{"box" (x1 y1 x2 y2 pixels), "score", "row"}] by region logit, best first."""
    device = inputs.visual["region_features"].device
    text = encode_text(tokenizer, [expression], max_text_length, device)
    out = model(**text, **inputs.visual, task_ids=task_ids_for(model, task, 1, device), heads=["region_logits"])
    logits = out.region_logits.float()[0]  # [R]; padded rows are -10000 (none here: batch of one)
    scores, rows = torch.sigmoid(logits).topk(min(top_k, len(inputs.row_boxes)))
    return [{"box": [round(float(v), 2) for v in inputs.row_boxes[r]], "score": s, "row": r}
            for s, r in zip(scores.tolist(), rows.tolist(), strict=True)]


@torch.no_grad()
def rank_captions(model: nn.Module, tokenizer, inputs: ModelInput, captions: list[str], max_text_length: int,
                  task: str = "retrieval-flickr30k") -> list[dict]:
    """Every caption [{"caption", "index", "score", "probability"}], best first.

    `score` is pair_logit (P(aligned) for a pretraining model, as zero-shot retrieval); `probability` is the
    softmax of the scores over the given captions (for a pretraining model: the scores renormalised).
    """
    from tasks.retrieval import is_pretraining_model, pair_scores

    device = inputs.visual["region_features"].device
    text = encode_text(tokenizer, captions, max_text_length, device)
    task_ids = None if is_pretraining_model(model) else task_ids_for(model, task, 1, device)
    scores = []
    for c in range(len(captions)):  # one text prefix per caption, as retrieval evaluation computes it
        prefix = model.vilbert.encode_text_prefix(*(text[k][c: c + 1] for k in
                                                    ("input_ids", "attention_mask", "token_type_ids")),
                                                  task_ids=task_ids)
        scores.append(pair_scores(model, task, prefix, inputs.visual)[0])
    scores = torch.stack(scores).cpu()  # [C]
    probabilities = scores / scores.sum() if is_pretraining_model(model) else torch.softmax(scores, dim=0)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [{"caption": captions[i], "index": i, "score": scores[i].item(), "probability": probabilities[i].item()}
            for i in order]


def read_captions(path: str | os.PathLike) -> list[str]:
    """One caption per line; blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"--captions {path}: cannot read ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"--captions {path}: not UTF-8 text ({error})") from error
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise ConfigError(f"--captions {path}: no captions (one per line)")
    return captions


def read_answers(path: str | os.PathLike) -> list[str]:
    """An answer list for checkpoints without id2label: one answer per line, in label order."""
    path = Path(path)
    try:
        answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--answers {path}: cannot read ({error})") from error
    if not answers:
        raise ConfigError(f"--answers {path}: no answers (one per line)")
    return answers


# ------------------------------------------------------------------------------------------------------ drawing


def draw_prediction(loaded: LoadedImage, boxes: np.ndarray, chosen: list[float] | None, caption: str,
                    out: str | os.PathLike) -> Path:
    """Draw `boxes` thin, `chosen` thick and highlighted, and `caption` on the image; write a PNG atomically.

    The PNG has the image's original size; boxes are in original pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    height, width = loaded.original_hw
    image = Image.fromarray(loaded.pixels)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    thin = max(1, round(min(width, height) / 400))
    for box in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        draw.rectangle([float(v) for v in box], outline=(0, 200, 255), width=thin)
    if chosen is not None:
        draw.rectangle([float(v) for v in chosen], outline=(255, 40, 40), width=4 * thin)
    if caption:
        font = ImageFont.load_default()
        left, top, right, bottom = draw.textbbox((4, 4), caption, font=font)
        draw.rectangle([left - 3, top - 3, right + 3, bottom + 3], fill=(0, 0, 0))
        draw.text((4, 4), caption, fill=(255, 255, 0), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def describe(result: dict[str, Any]) -> str:
    """The one-line text drawn on the image for a prediction result."""
    if result["mode"] == "question":
        best = result["answers"][0]
        return f"Q: {result['question']}  A: {best['answer']} ({best['score']:.2f})"
    if result["mode"] == "expression":
        return f"{result['expression']} ({result['score']:.2f})"
    best = result["captions"][0]
    return f"{best['caption']} ({best['score']:.2f})"
