"""The web demo behind `vilbert serve`: upload an image (or pick a shapes-world one), choose a task, see the answer.

A Starlette/FastAPI app around the same steps as `vilbert predict`: regions from the checkpoint's detector, the
model's answer, the boxes drawn on the image and the co-attention figure (`tasks.figures.attention`).
- Models load once, at start; requests run one at a time under a lock (the models are not re-entrant on CPU).
- Uploads are written only inside a per-request temporary directory and decoded with the limits of
  `features.images.read_image`; too large a body, a file that is not an image, an image with too many pixels, an
  empty text or an unknown task get a 4xx and a one-line message, never a stack trace.
Needs the `serve` extra: `pip install 'vilbert[serve]'` (fastapi, uvicorn, python-multipart).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from torch import nn

from features.errors import FeaturesError
from tasks.engine.task import Task
from tasks.errors import ConfigError, DataError
from tasks.registry import TASKS, task_class
from tasks.runners import predict
from tasks.runners.checkpoint import CheckpointInfo, check_serves, load_model, read_checkpoint

logger = logging.getLogger(__name__)

MODE_LABELS = {"question": "VQA: answer a question", "expression": "referring expression: find the box",
               "captions": "retrieval: rank captions (one per line)"}
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000  # far below Pillow's bomb limit: a demo has no use for larger images
MAX_TEXT_CHARS = 2000
EXAMPLES = 24  # shapes-world test images offered on the page
PAGE = Path(__file__).with_name("static") / "demo.html"


class RequestError(Exception):
    """A request the demo refuses: its message is shown on the page, with `status`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------------ models


@dataclass
class LoadedCheckpoint:
    """One checkpoint with everything a request needs: model, detector, and the task answering each mode."""

    name: str
    info: CheckpointInfo
    model: nn.Module
    detector: object
    detector_name: str
    tasks: dict[str, Task]  # mode -> the task that answers it

    @property
    def modes(self) -> list[str]:
        return list(self.tasks)


def checkpoint_modes(info: CheckpointInfo) -> list[str]:
    """The modes a checkpoint serves: pretraining -> captions (zero-shot); a recorded task -> its own modes; a
    checkpoint that does not say (e.g. a converted 12-in-1 model) -> every mode."""
    if info.is_pretraining:
        return ["captions"]
    if info.task in TASKS:
        return [mode for mode in predict.MODES if mode in task_class(info.task).predict_modes]
    return list(predict.MODES)


def load_checkpoint(directory: str | os.PathLike, device: str, detector: str | None = None,
                    allow_random: bool = False) -> LoadedCheckpoint:
    """Load one checkpoint for serving (fails like `vilbert predict` on a bad directory, detector or tokenizer)."""
    from features.detectors import build_detector

    info = read_checkpoint(directory)
    tokenizer = predict.tokenizer_directory(info)
    tasks = {mode: predict.build_task(info, predict.choose_task(info, mode), tokenizer)
             for mode in checkpoint_modes(info)}
    for mode, task in list(tasks.items()):
        problem = task.prediction_problem(info.config)
        if problem:
            del tasks[mode]
            logger.warning("%s: %s; not offering %s", directory, problem, task.name)
    if not tasks:
        raise ConfigError(f"--checkpoint {directory}: nothing to serve (no answer list and no other task)")
    name = predict.detector_name(info, detector)
    region_detector = build_detector(name)
    predict.check_detector(region_detector, info.feature_size, allow_random)
    model = load_model(info, device, next(iter(tasks.values())))
    for task in tasks.values():
        check_serves(info, task)
    label = Path(directory).resolve()
    return LoadedCheckpoint(f"{label.parent.parent.name}/{label.name}" if label.parent.name == "checkpoints"
                            else label.name, info, model, region_detector, name, tasks)


@dataclass
class ShapesExamples:
    """Images of a shapes world's test split, with their ground-truth boxes (what the embedded models saw)."""

    images: dict[str, Path] = field(default_factory=dict)
    boxes: dict[str, list] = field(default_factory=dict)


def load_examples(world: str | os.PathLike, count: int = EXAMPLES) -> ShapesExamples:
    """The first `count` test images of a shapes world directory (`vilbert shapes-world --out`)."""
    world = Path(world)
    try:
        scenes = json.loads((world / "scenes.json").read_text())["images"]
        boxes = json.loads((world / "gt_boxes.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"--examples {world}: not a shapes world (scenes.json, gt_boxes.json): {error}") from error
    chosen = [s for s in scenes if s.get("split") == "test"][:count]
    return ShapesExamples({str(s["image_id"]): world / "images" / s["file_name"] for s in chosen},
                          {str(s["image_id"]): boxes[str(s["image_id"])] for s in chosen})


# ----------------------------------------------------------------------------------------------------- serving


class Demo:
    """The loaded checkpoints and the one lock their requests share."""

    def __init__(self, checkpoints: list[LoadedCheckpoint], device: str, examples: ShapesExamples | None = None,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
        self.checkpoints = checkpoints
        self.device = device
        self.examples = examples or ShapesExamples()
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.lock = threading.Lock()

    def tasks(self) -> list[dict]:
        """[{"id": "K:mode", "label"}] for every checkpoint K and mode it serves."""
        return [{"id": f"{k}:{mode}", "label": f"{c.name}: {MODE_LABELS[mode]}", "mode": mode}
                for k, c in enumerate(self.checkpoints) for mode in c.modes]

    def resolve_task(self, task: str) -> tuple[LoadedCheckpoint, str]:
        known = {t["id"]: t for t in self.tasks()}
        if task not in known:
            raise RequestError(f"unknown task {task!r}; choose one of {', '.join(known)}", 404)
        index, mode = task.split(":")
        return self.checkpoints[int(index)], mode

    def predict(self, task: str, text: str, upload: bytes | None, filename: str | None,
                example: str | None) -> dict:
        """One request: validate, decode, run, draw. Returns the JSON result with the two PNGs as data URLs."""
        from features.images import read_image

        checkpoint, mode = self.resolve_task(task)
        text = (text or "").strip()
        if not text:
            raise RequestError("the text is empty: type a question, an expression or captions")
        if len(text) > MAX_TEXT_CHARS:
            raise RequestError(f"the text is {len(text)} characters; at most {MAX_TEXT_CHARS}")
        captions = [line.strip() for line in text.splitlines() if line.strip()] if mode == "captions" else None
        if (upload is None) == (example is None):
            raise RequestError("send an image file or choose an example, not both or neither")
        boxes = None
        with tempfile.TemporaryDirectory(prefix="vilbert-serve-") as tmp:
            if example is not None:
                if example not in self.examples.images:
                    raise RequestError(f"unknown example {example!r}", 404)
                path, shown = self.examples.images[example], f"example {example}"
                boxes = np.asarray(self.examples.boxes[example], dtype=np.float32)
            else:
                if len(upload) > self.max_upload_bytes:
                    raise RequestError(f"the upload is larger than the limit of {self.max_upload_bytes} bytes", 413)
                shown = safe_name(filename)
                path = Path(tmp) / f"upload{Path(shown).suffix.lower()[:8]}"
                path.write_bytes(upload)
            try:
                image = read_image(path, max_pixels=self.max_pixels)
            except FeaturesError as error:
                raise RequestError(str(error).replace(str(path), shown), 400) from error
            with self.lock:
                return self._run(checkpoint, mode, image, text, captions, boxes, shown, Path(tmp))

    def _run(self, checkpoint: LoadedCheckpoint, mode: str, image, text: str, captions: list[str] | None,
             boxes: np.ndarray | None, shown: str, tmp: Path) -> dict:
        task, model = checkpoint.tasks[mode], checkpoint.model
        notes = []
        if boxes is None and predict.needs_given_boxes(checkpoint.detector):
            boxes = predict.grid_boxes(image.original_hw)
            notes.append(f"{checkpoint.detector_name} pools features on given boxes; used the whole image and a "
                         f"{predict.GRID}x{predict.GRID} grid")
        try:
            example, answer = predict.predict_example(
                task, model, checkpoint.detector, checkpoint.detector_name, [image], [boxes], [shown], self.device,
                text=None if mode == "captions" else text, candidates=captions or ())
        except FeaturesError as error:
            raise RequestError(f"{shown}: {error}", 422) from error
        result: dict = {"mode": mode, "task": task.name, "image": shown, "checkpoint": checkpoint.name,
                        "notes": notes, "boxes": [[round(float(v), 2) for v in box] for box in example.boxes],
                        **answer}
        result["summary"] = task.headline(answer)
        drawn = predict.save_picture(task.draw(example, answer), tmp / "drawn.png")
        result["drawn"] = data_url(drawn)
        try:
            predict.attention_maps(model, task, example, answer, out=tmp / "attention.png")
            result["attention"] = data_url(tmp / "attention.png")
        except ConfigError as error:  # e.g. a text of special tokens only: the answer stands without the figure
            notes.append(f"no attention figure: {error}")
        return result


def safe_name(filename: str | None) -> str:
    """The uploaded file's base name, printable characters only (it is echoed in messages, never used as a path)."""
    name = Path(filename or "upload").name
    return re.sub(r"[^\w.\- ]", "_", name)[:100] or "upload"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# --------------------------------------------------------------------------------------------------------- app


def create_app(demo: Demo) -> FastAPI:
    """The FastAPI app: the page at /, the tasks and examples, and POST /api/predict."""
    app = FastAPI(title="ViLBERT demo", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > demo.max_upload_bytes + 64 * 1024):
            return JSONResponse({"error": f"the request is {length} bytes; uploads are at most "
                                          f"{demo.max_upload_bytes} bytes"}, status_code=413)
        try:
            return await call_next(request)
        except Exception:  # the message stays in the server log; the page gets one line
            logger.exception("request %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal error: the server log has the details"}, status_code=500)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        fields = sorted({str(e.get("loc", ["", "?"])[-1]) for e in error.errors()})
        return JSONResponse({"error": f"missing or malformed form field(s): {', '.join(fields)}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/tasks")
    def tasks():
        return {"tasks": demo.tasks(), "examples": sorted(demo.examples.images, key=int_or_text)}

    @app.get("/api/examples/{example}")
    def example_image(example: str):
        if example not in demo.examples.images:
            raise RequestError(f"unknown example {example!r}", 404)
        return FileResponse(demo.examples.images[example])

    @app.post("/api/predict")
    def run_prediction(task: Annotated[str, Form()], text: Annotated[str, Form()] = "",
                       image: Annotated[UploadFile | None, File()] = None,
                       example: Annotated[str | None, Form()] = None):
        # a sync endpoint: FastAPI runs it in a worker thread, and Demo.predict serialises the model calls
        upload = None
        if image is not None and image.filename:  # a form with no file chosen sends an empty, unnamed part
            upload = image.file.read(demo.max_upload_bytes + 1)
        with torch.inference_mode():
            return demo.predict(task, text, upload, image.filename if upload is not None else None, example or None)

    return app


def int_or_text(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 62, key)
