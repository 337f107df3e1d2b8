"""Predict one example on new images: what every task shares; the task answers through `predict_one` and `draw`.

The one single-example path of `vilbert predict`, `vilbert predict-task` and `vilbert serve`: read the checkpoint
(tasks.runners.checkpoint: config.json, run_config.yaml, run.json), build the task from the run's config
(`build_task`), check that the checkpoint holds its head and what its predictions need, and load the model once.
Then per request (`predict_example`): check the request against the task's `example_inputs`, extract each image's
regions in-process with the detector the run record names (the `extractor` attributes of the run's feature
stores), build them into the model's visual input exactly as the tasks build it (`tasks.data.regions.visual_input`:
IMG token, then up to `max_regions - 1` boxes), and let the task answer (`Task.predict_one`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from features.atomic import atomic_path
from features.detector import RegionDetector, pad_batch
from features.detectors import box_detector_for, build_detector
from features.errors import FeaturesError
from features.images import LoadedImage
from features.inputs import BOX_FORMATS, clip_boxes, load_boxes
from features.mobilenet_rcnn import world_mismatch
from features.store import Regions
from tasks.data.annotations import load_json
from tasks.data.feature_provenance import feature_mismatch
from tasks.data.regions import collate_visual, visual_input
from tasks.data.tokenization import load_tokenizer
from tasks.engine.run_record import PRETRAINING, architecture
from tasks.engine.task import ExampleImage, PredictExample, Task
from tasks.errors import ConfigError
from tasks.figures.attention import explain_prediction
from tasks.finetuning import FinetuneTask
from tasks.metrics import xywh_to_xyxy
from tasks.registry import TASKS, build_task, task_class
from tasks.runners.checkpoint import CheckpointInfo

logger = logging.getLogger(__name__)

MODES = ("question", "expression", "captions")
DEFAULT_TASK = {"question": "vqa", "expression": "refcoco", "captions": "retrieval"}  # when the run does not say
# only for checkpoints without a run record: the detector usually behind a feature size
DETECTOR_BY_FEATURE_SIZE = {96: "mobilenet-v2", 2048: "butd-r101-c4"}
VMB_DETECTOR = "vmb-x152-fpn"  # the detector of the released vilbert-multi-task (12-in-1) models
GRID = 3  # fallback boxes for detectors that need given boxes: the whole image and a GRID x GRID grid


# ------------------------------------------------------------------------------------------------ task, tokenizer


def choose_task(info: CheckpointInfo, mode: str, requested: str | None = None) -> str:
    """--task, else the checkpoint's recorded task when it serves `mode`, else the mode's default task."""
    if requested:
        modes = task_class(requested).predict_modes
        if mode not in modes:
            raise ConfigError(f"--task {requested} does not answer --{mode} "
                              f"(it answers {', '.join(f'--{m}' for m in modes) or 'nothing'})")
        return requested
    if info.task in TASKS and mode in task_class(info.task).predict_modes:
        return info.task
    return DEFAULT_TASK[mode]


def run_settings(info: CheckpointInfo, name: str) -> dict:
    """The config the checkpoint's run gave task `name`: the run's own when it trained that task, a multi-task
    run's member config (each member keeps its whole config), else {} (the task's defaults)."""
    if info.task == "multi":
        return next((member.get("resolved") or {} for member in info.run_config.get("tasks") or []
                     if member.get("name") == name), {})
    return info.run_config if info.task == name else {}


def checkpoint_tokenizer(info: CheckpointInfo, override: str | None = None, task: str | None = None) -> str:
    """--tokenizer, else the run's data.tokenizer or model.text_init (a multi-task member `task`'s own first), else
    the checkpoint dir if it has a vocab."""
    candidates = [override]
    for settings in (run_settings(info, task) if task else {}, info.run_config):
        candidates += [(settings.get("data") or {}).get("tokenizer"), (settings.get("model") or {}).get("text_init")]
    for candidate in candidates:
        if candidate:
            return str(candidate)
    if (info.directory / "vocab.txt").is_file() or (info.directory / "tokenizer.json").is_file():
        return str(info.directory)
    raise ConfigError(f"--checkpoint {info.directory}: no tokenizer recorded (run_config.yaml data.tokenizer); "
                      "pass --tokenizer DIR (a local BERT directory with vocab.txt)")


def checkpoint_task(info: CheckpointInfo, name: str, tokenizer: str) -> Task:
    """Task `name` with the run's config when this checkpoint's run trained it (a multi-task run's member config),
    else its defaults; `data.tokenizer` is `tokenizer` and `model.init` the checkpoint (answer lists come from it).

    Its data is never read: prediction needs only the text and region settings and the tokenizer.
    """
    settings = run_settings(info, name)
    settings = {**settings, "data": {**(settings.get("data") or {}), "tokenizer": tokenizer},
                "model": {**(settings.get("model") or {}), "init": str(info.directory)}}
    return build_task(name, settings, source=str(info.directory / "run_config.yaml"))


# ------------------------------------------------------------------------------------------------------ detector


def detector_name(info: CheckpointInfo, requested: str | None = None) -> str:
    """--detector, else the run record's extractor, else the one config.json's `visual_features` records
    (`vilbert convert`), else for a converted vilbert-multi-task checkpoint (2048-d, no run config, not the beta
    answer head) the VMB X-152 FPN its features came from, else (with a warning) the usual one of the feature size."""
    if requested:
        return requested
    extractor = info.feature_extractor or {}
    if extractor.get("detector"):
        return str(extractor["detector"])
    recorded = info.config.get("visual_features")
    if isinstance(recorded, dict) and recorded.get("detector"):
        return str(recorded["detector"])
    if not info.run_config and info.feature_size == 2048 and info.config.get("answer_head_type") != "beta":
        return VMB_DETECTOR
    guess = DETECTOR_BY_FEATURE_SIZE.get(info.feature_size)
    if guess is None:
        raise ConfigError(f"--checkpoint {info.directory}: no detector recorded for its {info.feature_size}-d "
                          "features; pass --detector NAME")
    logger.warning("%s records no feature extractor (no run.json); assuming %s for its %d-d features "
                   "(pass --detector to choose)", info.directory, guess, info.feature_size)
    return guess


def check_detector(detector: RegionDetector, feature_size: int, allow_random: bool) -> None:
    """The detector must give the model's feature size, and have real weights unless `allow_random`."""
    if detector.feature_dim != feature_size:
        raise ConfigError(f"detector {detector.name} gives {detector.feature_dim}-d region features but the "
                          f"checkpoint expects {feature_size}-d (v_feature_size); pass the detector it was trained on")
    info = detector.extractor_info()
    if not allow_random and info.get("weights") in (None, "random") and not info.get("weights_sha256"):
        hint = detector.weights_hint
        raise ConfigError(f"detector {detector.name} has random weights; pass --weights "
                          f"{hint or 'FILE'} (or --random-detector for a smoke run)")


def prepare_detector(info: CheckpointInfo, requested: str | None = None, weights: str | None = None,
                     options: Mapping[str, Any] | None = None, allow_random: bool = False,
                     warn: Callable[[str], None] = logger.warning,
                     boxes_given: bool = False) -> tuple[str, RegionDetector]:
    """(name, detector) for this checkpoint's images: `detector_name`, built and checked against the model's feature
    size (and for real weights unless `allow_random`); `warn` gets a line when it is not the run's detector.

    When the run's features were pooled on given boxes, no --detector is asked for and `boxes_given` is False, the
    detector that finds such boxes (`features.detectors.box_detector_for` on the run record's extractor: the
    shapes-world detector for ground-truth-box shapes-world features) is chosen when one is trained; the web demo
    and every predicting command call this one function."""
    name = detector_name(info, requested)
    mismatch = feature_mismatch(info.config.get("visual_features"), name, f"detector {name}")
    if mismatch:
        warn(f"warning: {mismatch}")
    extractor = info.feature_extractor or {}
    finder = None if requested or boxes_given else box_detector_for(extractor, weights, **dict(options or {}))
    detector = finder or build_detector(name, weights=weights, **dict(options or {}))
    check_detector(detector, info.feature_size, allow_random)
    check_world(detector, extractor)
    return (finder.name if finder else name), detector


def check_world(detector: RegionDetector, extractor: Mapping[str, Any]) -> None:
    """A detector trained on a synthetic world must be of the world the model's features came from."""
    trained_on = detector.extractor_info().get("world")
    if trained_on is not None:
        problem = world_mismatch(trained_on, extractor.get("world"), str(detector.extractor_info().get("weights")))
        if problem:
            raise ConfigError(problem)


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
        if clipped.clipped or clipped.degenerate:  # the same words as extraction's
            logger.warning("%s: %d given box(es) reached outside the %dx%d image and were clipped; %d have no area",
                           image_id, clipped.clipped, loaded.original_hw[1], loaded.original_hw[0],
                           clipped.degenerate)
        given = [torch.from_numpy(clipped.boxes).to(device)]
    detector = detector.to(device).eval()
    pixels = pad_batch([prepared], detector.size_divisible).to(device)
    (result,) = detector(pixels, [prepared], given)
    if len(result.boxes) == 0:
        raise FeaturesError(f"{image_id}: the detector {detector.name} found no regions")
    return Regions(
        image_id=image_id,
        image_hw=tuple(int(v) for v in loaded.original_hw),
        features=result.features.detach().float().cpu().numpy(),
        boxes=result.boxes.detach().float().cpu().numpy(),
    )


def image_regions(detector: RegionDetector, name: str, loaded: LoadedImage, boxes: np.ndarray | None,
                  device: str | torch.device, image_id: str,
                  note: Callable[[str], None] = logger.info) -> Regions:
    """The image's regions as `vilbert predict` gets them: on the given boxes, else the detector's own, else (a
    detector that only pools on given boxes) the whole image and a GRID x GRID grid, said through `note`."""
    if boxes is None and needs_given_boxes(detector):
        boxes = grid_boxes(loaded.original_hw)
        note(f"note: {name} pools features on given boxes, --boxes was not given and no detector for these features "
             f"is trained (`make detector`); using the whole image and a {GRID}x{GRID} grid")
    return detect_regions(detector, loaded, boxes, device, image_id=image_id)


# ------------------------------------------------------------------------------------------------------ example


def build_example(images: Sequence[tuple[LoadedImage, Regions]], max_regions: int, device: str | torch.device,
                  **request: Any) -> PredictExample:
    """The task's view of one example: per image, up to `max_regions` visual rows (IMG token first), as the tasks
    build them. `request` fills the rest of the example (text, candidates, options, task_token)."""
    built = []
    for loaded, regions in images:
        visual = visual_input(regions, max_regions)
        inputs = {key: value.to(device) for key, value in collate_visual([visual]).items()}
        built.append(ExampleImage(loaded, regions, np.asarray(regions.boxes[: visual.num_boxes], dtype=np.float32),
                                  inputs))
    return PredictExample(built, **request)


def check_request(task: Task, text: str | None, candidates: Sequence[str], images: int) -> None:
    """Refuse, in one line, a request that does not give what one example of `task` needs (its `example_inputs`)."""
    if task.example_inputs is None:
        raise ConfigError(f"task {task.name} has no single-example prediction")
    problem = task.example_inputs.problem(task.name, text, candidates, images)
    if problem:
        raise ConfigError(problem)


def predict_example(task: Task, model: nn.Module, detector: RegionDetector, detector_name: str,
                    images: Sequence[LoadedImage], boxes: Sequence[np.ndarray | None], names: Sequence[str],
                    device: str | torch.device, note: Callable[[str], None] = logger.info,
                    **request: Any) -> tuple[PredictExample, dict]:
    """(example, result) of one request: the request checked against the task, each image's regions (`boxes[i]`
    given, else detected, else a grid, said through `note`; messages call the image `names[i]`), the example
    built and answered by `predict_one`."""
    check_request(task, request.get("text"), request.get("candidates", ()), len(images))
    regions = [image_regions(detector, detector_name, image, given, device, name, note=note)
               for image, given, name in zip(images, boxes, names, strict=True)]
    example = build_example(list(zip(images, regions, strict=True)), task.max_regions, device, **request)
    with torch.no_grad():
        return example, task.predict_one(model, example)


def write_attention(model: nn.Module, task: Task, example: PredictExample, result: Mapping[str, Any],
                    image: int = 0, **figure: Any) -> dict[str, str]:
    """The co-attention figure and/or JSON (tasks.figures.attention) of the text the task explains
    (`Task.explained_text`) with image `image` of the example. `figure`: words, head, rollout, out, json_out."""
    text = task.explained_text(example, result)
    device = example.visual["region_features"].device
    task_ids = None
    if isinstance(task, FinetuneTask) and architecture(model) != PRETRAINING:
        task_ids = task.task_ids(model, 1, device, example.task_token)
    tokenizer = load_tokenizer(task.config.data.tokenizer)
    return explain_prediction(model, tokenizer, example.images[image], text, task.config.data.max_text_length,
                              task_ids, **figure)


def check_output_files(**paths: str | os.PathLike | None) -> None:
    """Refuse, before any work, an output file option (`--out` ...) that names a directory."""
    for option, path in paths.items():
        if path is not None and Path(path).is_dir():
            raise ConfigError(f"--{option.replace('_', '-')} {path}: is a directory; give a file name such as "
                              f"{Path(path) / 'out.png'}")


def save_picture(picture: Any, out: str | os.PathLike) -> Path:
    """Write a task's drawing (a PIL image) as a PNG, atomically."""
    with atomic_path(out) as tmp:
        picture.save(tmp, format="PNG")
    return Path(out)


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
