"""The web demo behind `vilbert serve`: choose a task, give its images (upload or shapes-world examples) and text,
see the answer, the regions and the co-attention.

The tasks and their answers are tasks.runners.serving's (every task of every checkpoint, through the task contract
and the one predict path); this module is the HTTP side and request admission:
- Models load once, at start; requests run one at a time under a lock (the models are not re-entrant on CPU).
- Uploads are written only inside a per-request temporary directory and decoded with the limits of
  `features.images.read_image`; too large a body, a file that is not an image, an image with too many pixels, an
  unknown task, or a request that does not give what the task needs (a text, its candidates, its images) get a 4xx
  and a one-line message, never a stack trace.
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

from features.errors import FeaturesError
from features.images import read_image
from tasks.errors import DataError
from tasks.runners.serving import ServedTask, answer

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------- examples


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


@dataclass
class ImageSlot:
    """One image of a request as it arrived: an upload (bytes and file name) or a shapes-world example id."""

    upload: bytes | None = None
    filename: str | None = None
    example: str | None = None


class Demo:
    """The served tasks, the examples, the request limits and the one lock their model calls share."""

    def __init__(self, tasks: list[ServedTask], device: str, examples: ShapesExamples | None = None,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
        self.served = {task.name: task for task in tasks}
        self.device = device
        self.examples = examples or ShapesExamples()
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.lock = threading.Lock()

    def tasks(self) -> list[dict]:
        """What the page lists: each task, the checkpoint answering it and the inputs it needs."""
        return [task.describe() for task in self.served.values()]

    def predict(self, task: str, text: str, candidates: str, slots: list[ImageSlot]) -> dict:
        """One request: validate, decode, run, draw. Returns the JSON result with the PNGs as data URLs."""
        if task not in self.served:
            raise RequestError(f"unknown task {task!r}; choose one of {', '.join(self.served)}", 404)
        served = self.served[task]
        inputs = served.task.example_inputs
        text = (text or "").strip()
        if len(text) + len(candidates or "") > MAX_TEXT_CHARS:
            raise RequestError(f"the text is {len(text) + len(candidates or '')} characters; at most "
                               f"{MAX_TEXT_CHARS}")
        options = [line.strip() for line in (candidates or "").splitlines() if line.strip()]
        given = [slot for slot in slots if slot.upload is not None or slot.example is not None]
        for number, slot in enumerate(slots, start=1):
            if slot.upload is not None and slot.example is not None:
                raise RequestError(f"image {number}: send a file or choose an example, not both")
        problem = inputs.problem(task, text or None, options, len(given))
        if problem:
            raise RequestError(problem)
        with tempfile.TemporaryDirectory(prefix="vilbert-serve-") as tmp:
            images, boxes, shown = [], [], []
            for number, slot in enumerate(given, start=1):
                path, name, given_boxes = self._admit(slot, Path(tmp), number)
                try:
                    images.append(read_image(path, max_pixels=self.max_pixels))
                except FeaturesError as error:
                    raise RequestError(str(error).replace(str(path), name), 400) from error
                boxes.append(given_boxes)
                shown.append(name)
            with self.lock:
                try:
                    result, pictures = answer(served, images, boxes, shown, text or None, options, self.device,
                                              Path(tmp))
                except FeaturesError as error:
                    raise RequestError(f"{', '.join(shown)}: {error}", 422) from error
            return {**result, "images": shown, "drawn": data_url(pictures[0]),
                    "attention": [data_url(path) for path in pictures[1:]]}

    def _admit(self, slot: ImageSlot, tmp: Path, number: int) -> tuple[Path, str, np.ndarray | None]:
        """(file to decode, how messages name it, its given boxes) of one image: an example's file and ground-truth
        boxes, or the upload written inside the request's temporary directory."""
        if slot.example is not None:
            if slot.example not in self.examples.images:
                raise RequestError(f"unknown example {slot.example!r}", 404)
            return (self.examples.images[slot.example], f"example {slot.example}",
                    np.asarray(self.examples.boxes[slot.example], dtype=np.float32))
        if len(slot.upload) > self.max_upload_bytes:
            raise RequestError(f"the upload is larger than the limit of {self.max_upload_bytes} bytes", 413)
        shown = safe_name(slot.filename)
        path = tmp / f"upload-{number}{Path(shown).suffix.lower()[:8]}"
        path.write_bytes(slot.upload)
        return path, shown, None


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
                       candidates: Annotated[str, Form()] = "",
                       image: Annotated[UploadFile | None, File()] = None,
                       example: Annotated[str | None, Form()] = None,
                       image2: Annotated[UploadFile | None, File()] = None,
                       example2: Annotated[str | None, Form()] = None):
        # a sync endpoint: FastAPI runs it in a worker thread, and Demo.predict serialises the model calls
        slots = [read_slot(image, example, demo.max_upload_bytes), read_slot(image2, example2, demo.max_upload_bytes)]
        with torch.inference_mode():
            return demo.predict(task, text, candidates, slots)

    return app


def read_slot(image: UploadFile | None, example: str | None, limit: int) -> ImageSlot:
    """One image's form fields; a form with no file chosen sends an empty, unnamed part (no upload)."""
    upload = image.file.read(limit + 1) if image is not None and image.filename else None
    return ImageSlot(upload, image.filename if upload is not None else None, example or None)


def int_or_text(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 62, key)
