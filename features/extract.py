"""The extraction pipeline: images -> any RegionDetector -> a feature store, resumable and shardable.

Images are decoded and prepared in DataLoader worker processes, grouped into batches of similar aspect ratio, run
through the detector on the device (optionally under bf16/fp16 autocast) and appended to a `ResumableStoreWriter`.
A failing image (undecodable, or one in which the detector finds nothing) is logged to `<out>.errors.jsonl` and
skipped; the run goes on. Rerunning the same command after an interruption (even SIGKILL) skips what is already
written and finishes the store. Under torchrun each rank writes its own shard `<out>.rank<k>-of-<n>` and rank 0
merges the shards into `<out>`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from features.checksum import sha256_file
from features.detector import DetectedRegions, PreparedImage, RegionDetector, pad_batch
from features.errors import FeaturesError, ImageError
from features.images import DECODE_MARGIN, MAX_SIDE, read_image
from features.inputs import ImageInput, clip_boxes
from features.store import FeatureStore, ResumableStoreWriter, merge_stores

logger = logging.getLogger(__name__)
PART_SECONDS = 10.0  # a part is sealed at least this often: a kill redoes at most this much work

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCH_PIXELS = 16_000_000  # padded input pixels per detector batch; a larger image runs alone
REGION_FIELDS = ("cls_prob", "objects_id", "objects_conf", "attrs_id", "attrs_conf")


@dataclass
class ExtractionSummary:
    """What one run did; `images_per_second` counts images written in this run."""

    out: str
    images_written: int = 0
    images_skipped: int = 0  # already in the store from an earlier (interrupted) run
    images_failed: int = 0
    boxes_written: int = 0
    boxes_clipped: int = 0
    boxes_degenerate: int = 0
    seconds: float = 0.0
    errors_file: str | None = None
    shard: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


@dataclass
class _Item:
    """One decoded image (or the reason it failed), as returned by a DataLoader worker."""

    index: int
    image_id: str
    path: str
    prepared: PreparedImage | None = None
    error: str | None = None
    boxes: np.ndarray | None = None
    clipped: int = 0
    degenerate: int = 0


class _ImageDataset(Dataset):
    """Decodes and prepares one image per item; failures come back as items with `error` set."""

    def __init__(self, images: list[ImageInput], prepare: Callable, boxes: dict | None, max_side: int | None,
                 input_scale: Callable[[int, int], float] | None = None):
        self.images, self.prepare, self.boxes, self.max_side = images, prepare, boxes, max_side
        self.input_scale = input_scale

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> _Item:
        image = self.images[index]
        item = _Item(index, image.image_id, image.path)
        try:
            loaded = read_image(image.path, self.max_side, input_scale=self.input_scale)
            prepared = self.prepare(loaded.pixels)
        except ImageError as error:
            item.error = str(error)
            return item
        except Exception as error:  # a detector's prepare failing on one image must not stop the run
            item.error = f"{image.path}: cannot prepare the image ({type(error).__name__}: {error})"
            return item
        if loaded.scale != 1.0:  # decoded downscaled: keep boxes in original pixels
            prepared.scale *= loaded.scale
            prepared.image_hw = loaded.original_hw
        item.prepared = prepared
        if self.boxes is not None:
            clipped = clip_boxes(self.boxes[image.image_id], loaded.original_hw)
            item.boxes, item.clipped, item.degenerate = clipped.boxes, clipped.clipped, clipped.degenerate
        return item


def _identity(item):
    return item


def _aspect_group(item: _Item) -> int:
    _, height, width = item.prepared.pixels.shape
    return int(width >= height)


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}")


@dataclass
class _Run:
    """The state of one extraction run: writer, error log, counters."""

    writer: ResumableStoreWriter
    errors_path: Path
    summary: ExtractionSummary

    def log(self, item: _Item, reason: str, level: str = "error") -> None:
        record = {"path": item.path, "image_id": item.image_id, "reason": reason, "level": level}
        with open(self.errors_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        (logger.warning if level == "warning" else logger.error)("%s", reason)


def extract(
    images: list[ImageInput],
    out: str | os.PathLike,
    detector: RegionDetector,
    boxes: dict[str, np.ndarray] | None = None,
    boxes_info: dict | None = None,
    batch_size: int = 8,
    workers: int = 2,
    device: str = "cpu",
    precision: str = "fp32",
    float32: bool = False,
    max_side: int | None = MAX_SIDE,
    batch_pixels: int | None = BATCH_PIXELS,
    rank: int = 0,
    world_size: int = 1,
    part_images: int = 2048,
    part_seconds: float = PART_SECONDS,
    progress: bool = True,
) -> ExtractionSummary:
    """Extract region features for `images` into the store `out`; returns what was done.

    `boxes` (given-box mode) maps image id -> float32 [K, 4] x1 y1 x2 y2 in original pixels; an image without an
    entry fails. Memory stays bounded whatever the images: each is decoded no larger than the detector needs
    (`RegionDetector.input_scale`), and a batch holds at most `batch_pixels` padded input pixels (None: no limit).
    With `world_size` > 1 only every `world_size`-th image (from `rank`) is extracted into a shard;
    rank 0 then waits for the other shards and merges them into `out`.
    """
    if precision not in PRECISIONS:
        raise FeaturesError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 0 <= rank < world_size:
        raise FeaturesError(f"rank {rank} is outside world size {world_size}")
    out = Path(out)
    started = time.monotonic()
    extractor = {**detector.extractor_info(), "precision": precision, "max_side": max_side,
                 "decoding": {"max_side": max_side, "margin_over_input_scale": DECODE_MARGIN,
                              "jpeg_draft": True}}  # how huge images were reduced before the detector saw them
    if boxes_info:
        extractor["given_boxes"] = boxes_info
    target = out if world_size == 1 else shard_path(out, rank, world_size)
    finished = set(_complete_ids(out)) if world_size > 1 else set()
    assigned = [im for i, im in enumerate(images) if i % world_size == rank]
    writer = ResumableStoreWriter(
        target, detector.feature_dim, detector.cls_prob_dim, extractor, float32, part_images, part_seconds
    )
    summary = ExtractionSummary(out=str(out), shard=str(target) if world_size > 1 else None)
    run = _Run(writer, Path(f"{target}.errors.jsonl"), summary)
    run.errors_path.unlink(missing_ok=True)  # failures are retried, so the log describes this run only
    todo = [im for im in assigned if im.image_id not in writer.done_ids and im.image_id not in finished]
    summary.images_skipped = len(assigned) - len(todo)
    if writer.resumed:
        logger.info("%s: resuming, %d images already written", target, writer.resumed)
    if boxes is not None:
        todo = _drop_images_without_boxes(todo, boxes, run)

    try:
        detector = detector.to(device).eval()
        if todo:
            _run_batches(todo, detector, boxes, run, batch_size, workers, device, precision, max_side, progress,
                         batch_pixels)
        if summary.images_failed and not writer.done_ids:
            raise FeaturesError(f"{out}: none of the {summary.images_failed} images could be extracted (nothing "
                                f"written; the reasons are in {run.errors_path})")
        writer.finish()
    except BaseException:
        writer.abort()  # sealed parts stay for the rerun
        raise
    summary.seconds = time.monotonic() - started
    if run.errors_path.exists():
        summary.errors_file = str(run.errors_path)
    if world_size > 1 and rank == 0:
        _merge_shards(out, world_size)
    return summary


def _complete_ids(out: Path) -> list[str]:
    """Ids in an already complete `out` (a sharded rerun after the merge skips them)."""
    return FeatureStore(out).ids if out.exists() else []


def _drop_images_without_boxes(todo: list[ImageInput], boxes: dict, run: _Run) -> list[ImageInput]:
    kept = []
    for im in todo:
        if im.image_id in boxes:
            kept.append(im)
        else:
            run.summary.images_failed += 1
            run.log(_Item(-1, im.image_id, im.path), f"{im.path}: no boxes for image id {im.image_id!r} in the boxes file")
    return kept


def _padded_pixels(items: list[_Item]) -> int:
    """Pixels of the zero-padded batch these prepared images make."""
    height = max(item.prepared.pixels.shape[1] for item in items)
    width = max(item.prepared.pixels.shape[2] for item in items)
    return len(items) * height * width


def _run_batches(todo, detector, boxes, run, batch_size, workers, device, precision, max_side, progress,
                 batch_pixels=BATCH_PIXELS) -> None:
    dataset = _ImageDataset(todo, detector.prepare, boxes, max_side, detector.input_scale)
    loader = DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
        prefetch_factor=2 * batch_size if workers else None,
        persistent_workers=False,
    )
    groups: dict[int, list[_Item]] = {}
    bar = tqdm(total=len(todo), desc="extract", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for item in loader:
            if item.error is not None:
                run.summary.images_failed += 1
                run.log(item, item.error)
                bar.update(1)
                continue
            group = groups.setdefault(_aspect_group(item), [])
            if group and batch_pixels and _padded_pixels([*group, item]) > batch_pixels:  # the budget: run first
                _run_batch(group, detector, boxes is not None, run, device, precision)
                bar.update(len(group))
                group.clear()
            group.append(item)
            if len(group) >= batch_size:
                _run_batch(group, detector, boxes is not None, run, device, precision)
                bar.update(len(group))
                group.clear()
        for group in groups.values():
            if group:
                _run_batch(group, detector, boxes is not None, run, device, precision)
                bar.update(len(group))


def _run_batch(items: list[_Item], detector, given: bool, run: _Run, device: str, precision: str) -> None:
    prepared = [item.prepared for item in items]
    pixels = pad_batch(prepared, detector.size_divisible)
    if torch.device(device).type == "cuda":
        pixels = pixels.pin_memory()
    pixels = pixels.to(device, non_blocking=True)
    boxes = [torch.from_numpy(item.boxes).to(device) for item in items] if given else None
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        results = detector(pixels, prepared, boxes)
    if len(results) != len(items):
        raise FeaturesError(f"detector {detector.name} returned {len(results)} results for {len(items)} images")
    for item, regions in zip(items, _to_numpy(results), strict=True):
        if not given and len(regions["boxes"]) == 0:  # a blank image: nothing to store, a failure like the others
            run.summary.images_failed += 1
            run.log(item, f"{item.path}: the detector {detector.name} found nothing in the image")
            continue
        if given and len(regions["boxes"]) != len(item.boxes):
            raise FeaturesError(f"detector {detector.name} returned {len(regions['boxes'])} regions for "
                                f"{len(item.boxes)} given boxes of image {item.image_id!r}")
        run.writer.add(item.image_id, item.prepared.image_hw, **regions)
        run.summary.images_written += 1
        run.summary.boxes_written += len(regions["boxes"])
        if item.clipped or item.degenerate:
            run.summary.boxes_clipped += item.clipped
            run.summary.boxes_degenerate += item.degenerate
            run.log(item, f"{item.path}: {item.clipped} box(es) reached outside the {item.prepared.image_hw[1]}x"
                          f"{item.prepared.image_hw[0]} image and were clipped; {item.degenerate} have no area",
                    level="warning")
    run.writer.checkpoint()


def _to_numpy(results: list[DetectedRegions]) -> list[dict]:
    """Move a batch's regions to host memory in one transfer per field."""
    counts = [len(r.boxes) for r in results]
    fields = {"features": [r.features for r in results], "boxes": [r.boxes for r in results]}
    for name in REGION_FIELDS:
        values = [getattr(r, name) for r in results]
        if any(v is not None for v in values):
            if any(v is None for v in values):
                raise FeaturesError(f"detector returned {name} for some images of a batch but not others")
            fields[name] = values
    host = {}
    for name, values in fields.items():
        joined = torch.cat([v.detach() for v in values])
        joined = joined.float() if joined.is_floating_point() else joined
        host[name] = np.split(joined.cpu().numpy(), np.cumsum(counts)[:-1])
    return [{name: host[name][i] for name in host} for i in range(len(results))]


def _merge_shards(out: Path, world_size: int, poll_seconds: float = 2.0) -> None:
    """Rank 0: wait until every shard is complete (barrier if a process group exists), then merge into `out`."""
    shards = [shard_path(out, k, world_size) for k in range(world_size)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    waited = 0.0
    while not all(s.exists() for s in shards):
        if waited % 60 < poll_seconds:
            logger.info("waiting for shards: %s", ", ".join(s.name for s in shards if not s.exists()))
        time.sleep(poll_seconds)
        waited += poll_seconds
    sources = ([out] if out.exists() else []) + shards
    merge_stores(sources, out)
    for shard in shards:
        shard.unlink()
    logger.info("merged %d shards into %s", world_size, out)


def boxes_file_info(path: str | os.PathLike, box_format: str) -> dict:
    """How given boxes are recorded in the store's extractor attribute."""
    return {"file": Path(path).name, "sha256": sha256_file(path), "format": box_format}
