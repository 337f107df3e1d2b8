"""Import a published feature file (LMDB, TSV, npy folder) into the HDF5 store, streaming and resumable.

Rows are read and decoded one at a time by the format's reader (`features.published`) and appended to a
`ResumableStoreWriter`, the writer `vilbert extract` uses: memory does not grow with the source, and a run killed at
any moment (SIGKILL included) continues where it stopped when rerun with the same arguments. A bad row (bad base64,
wrong shapes, NaN, duplicate id) stops the import with one line naming the source, the id and the problem, or with
`skip_bad` is recorded in `<out>.errors.jsonl` and skipped. Where decoding is the bottleneck (base64 in TSV files),
`workers` processes decode rows in parallel; rows still reach the store in source order, so the result is the same
file as with one process.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from features.atomic import check_output
from features.errors import FeatureStoreError
from features.locks import OutputLock
from features.published import FORMAT_DETECTORS, PublishedReader, PublishedRegions, open_published, store_id
from features.store import ResumableStoreWriter, store_lock

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY = 32  # images between checks whether to seal the open part (each check flushes the file)


@dataclass
class ImportSummary:
    out: str
    format: str
    source: str
    images_written: int = 0
    images_resumed: int = 0  # already in the store from an earlier, interrupted run
    images_bad: int = 0
    images_excluded: int = 0  # listed in `exclude`
    seconds: float = 0.0
    errors_file: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0


def import_features(
    source: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    ids_from: str = "image",
    limit: int | None = None,
    skip_bad: bool = False,
    float32: bool = False,
    progress: bool = True,
    part_images: int = 2048,
    part_seconds: float = 60.0,
    exclude: set[str] | None = None,
    workers: int = 1,
) -> ImportSummary:
    """Import the first `limit` (all when None) rows of `source`, a published file in `format`, into store `out`.

    Store ids come from the source's ids by `ids_from` (`features.published.store_id`); ids in `exclude` (e.g. the
    reference's coco_test_ids.npy, to keep test images out of a training store) are left out. The store's `extractor`
    attribute records the format, the source's file name and the id rule, so a rerun with other settings refuses
    to mix its rows with the earlier ones. `workers` > 1 decodes on that many processes.
    """
    if workers < 1:
        raise FeatureStoreError(f"{source}: workers must be at least 1, got {workers}")
    out = check_output(out, [source])
    started = time.monotonic()
    reader = open_published(source, format)
    extractor = {"name": "imported", "format": format, "detector": FORMAT_DETECTORS[format],
                 "source": Path(source).name, "ids_from": ids_from}
    summary = ImportSummary(out=str(out), format=format, source=str(source))
    errors_path = Path(f"{out}.errors.jsonl")
    lock = store_lock(out)
    try:  # the lock first: a second import on `out`, refused, must not touch the first one's error log
        lock.acquire()
    except BaseException:
        reader.close()
        raise
    errors_path.unlink(missing_ok=True)  # the log describes this run only

    def bad(source_id: str, image_id: str | None, error: FeatureStoreError) -> None:
        if not skip_bad:
            raise error
        summary.images_bad += 1
        record = {"source": str(source), "source_id": source_id, "image_id": image_id, "problem": str(error)}
        with open(errors_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        logger.warning("skipped: %s", error)

    total = reader.count()
    if limit is not None and total is not None:
        total = min(total, limit)
    bar = tqdm(total=total, desc=f"import {format}", unit="img", disable=not progress, dynamic_ncols=True)
    writer: _WriterThread | None = None
    empty: list[tuple[str, PublishedRegions]] = []  # images without regions met before the writer exists
    seen: dict[str, str] = {}

    def to_decode() -> Iterator[tuple[str, str, object]]:
        """The rows to decode: within `limit`, with a valid new id, not excluded, not written by an earlier run."""
        for n, (source_id, raw) in enumerate(reader.entries()):
            if limit is not None and n >= limit:
                break
            bar.update(1)
            try:
                image_id = store_id(source_id, ids_from)
            except ValueError as error:
                bad(source_id, None, FeatureStoreError(f"{source}: image {source_id!r}: {error}"))
                continue
            if image_id in seen:
                bad(source_id, image_id, FeatureStoreError(
                    f"{source}: image {source_id!r}: duplicate id {image_id!r} (also from {seen[image_id]!r})"))
                continue
            seen[image_id] = source_id
            if exclude and image_id in exclude:
                summary.images_excluded += 1
                continue
            if writer is not None and image_id in writer.store.done_ids:
                summary.images_resumed += 1
                continue
            yield source_id, image_id, raw

    try:
        for source_id, image_id, regions in _decoded(reader, to_decode(), workers, source, format):
            if isinstance(regions, FeatureStoreError):
                bad(source_id, image_id, regions)
                continue
            if writer is None:
                if not len(regions.boxes):  # says nothing about widths: wait for an image with regions
                    empty.append((image_id, regions))
                    continue
                # the first image with regions fixes the widths and the optional fields
                store = _open_writer(out, regions, extractor, float32, part_images, part_seconds, lock)
                if store.resumed:
                    logger.info("%s: resuming, %d images already written", out, store.resumed)
                writer = _WriterThread(store, set(regions.optional()), min(CHECKPOINT_EVERY, part_images))
                for waiting_id, waiting in empty:
                    summary.images_resumed += waiting_id in store.done_ids
                    summary.images_written += _put(writer, waiting_id, waiting)
                if image_id in store.done_ids:
                    summary.images_resumed += 1
                    continue
            problem = writer.mismatch(regions)
            if problem:
                bad(source_id, image_id, FeatureStoreError(f"{source}: image {source_id!r}: {problem}"))
                continue
            summary.images_written += _put(writer, image_id, regions)
            if progress:
                bar.set_postfix_str(f"{summary.images_written / max(time.monotonic() - started, 1e-9):.1f} img/s")
        if writer is None:
            raise FeatureStoreError(f"{source}: no importable images with regions in this {format} source")
        writer.close()
        writer.store.finish()
    except BaseException:
        if writer is not None:
            writer.close(raise_error=False)
            writer.store.abort()  # sealed parts stay for the rerun; `out` is not touched
        raise
    finally:
        lock.release()
        bar.close()
        reader.close()
    summary.seconds = time.monotonic() - started
    if errors_path.exists():
        summary.errors_file = str(errors_path)
    return summary


def _decoded(reader: PublishedReader, rows: Iterable[tuple[str, str, object]], workers: int, source, format: str,
             ) -> Iterator[tuple[str, str, PublishedRegions | FeatureStoreError]]:
    """Each row decoded (or the reason it cannot be), in the order of `rows`; on `workers` processes when > 1.

    At most 4 rows per worker are in flight, so memory stays bounded however fast the source reads.
    """
    if workers == 1:
        for source_id, image_id, raw in rows:
            yield source_id, image_id, _decode(reader, source_id, raw)
        return
    # fork where there is one: the pool starts before the store writer's thread, and a forked worker only decodes
    # (numpy, base64, its own LMDB handle), so it inherits no lock it could need; spawn re-imports torch per worker
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(workers, initializer=_open_worker_reader, initargs=(str(source), format)) as pool:
        pending: deque = deque()
        for source_id, image_id, raw in rows:
            pending.append((source_id, image_id, pool.apply_async(_decode_in_worker, (source_id, raw))))
            if len(pending) >= 4 * workers:
                source_id, image_id, result = pending.popleft()
                yield source_id, image_id, result.get()
        while pending:
            source_id, image_id, result = pending.popleft()
            yield source_id, image_id, result.get()


def _decode(reader: PublishedReader, source_id: str, raw) -> PublishedRegions | FeatureStoreError:
    try:
        return reader.decode(source_id, raw)
    except FeatureStoreError as error:
        return error


_worker_reader: PublishedReader | None = None  # one per decoding process


def _open_worker_reader(source: str, format: str) -> None:
    global _worker_reader
    _worker_reader = open_published(source, format)


def _decode_in_worker(source_id: str, raw) -> PublishedRegions | FeatureStoreError:
    return _decode(_worker_reader, source_id, raw)


def _put(writer: _WriterThread, image_id: str, regions: PublishedRegions) -> int:
    """Queue one image unless an earlier run already wrote it; returns 1 when queued."""
    if image_id in writer.store.done_ids:
        return 0
    writer.put(image_id, regions)
    return 1


def _open_writer(out: Path, regions: PublishedRegions, extractor: dict, float32: bool, part_images: int,
                 part_seconds: float, lock: OutputLock) -> ResumableStoreWriter:
    cls_prob_dim = regions.cls_prob.shape[1] if regions.cls_prob is not None else None
    return ResumableStoreWriter(out, regions.features.shape[1], cls_prob_dim, extractor, float32,
                                part_images, part_seconds, lock=lock)


class _WriterThread:
    """Appends decoded rows to the store on a second thread, so store writes overlap reading the next rows.

    Rows are checked (`mismatch`) before they are queued, so the store refuses none; any error on the writing
    thread stops the import at the next `put` or at `close`.
    """

    def __init__(self, store: ResumableStoreWriter, optional: set[str], checkpoint_every: int, depth: int = 8):
        self.store, self.optional, self.checkpoint_every = store, optional, checkpoint_every
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        written = 0
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain until close()
            image_id, regions = item
            try:
                optional = {k: v for k, v in regions.optional().items() if k in self.optional}  # (K = 0 rows)
                self.store.add(image_id, regions.image_hw, regions.features, regions.boxes, **optional)
                written += 1
                if written % self.checkpoint_every == 0:
                    self.store.checkpoint()  # seals a part when it is big or old enough
            except BaseException as error:  # handed to the reading thread
                self.error = error

    def mismatch(self, regions: PublishedRegions) -> str | None:
        """Why this row cannot join the rows already written (other widths or optional fields), or None."""
        options = self.store.options
        if not len(regions.boxes):
            return None
        width = regions.features.shape[1]
        if width != options["feature_dim"]:
            return f"features are {width} wide but earlier images' are {options['feature_dim']}"
        cls_prob_dim = regions.cls_prob.shape[1] if regions.cls_prob is not None else None
        if cls_prob_dim != options["cls_prob_dim"]:
            return f"cls_prob width {cls_prob_dim} differs from earlier images' ({options['cls_prob_dim']})"
        fields = set(regions.optional())
        if fields != self.optional:
            return (f"has fields {sorted(fields) or 'none'} besides features and boxes, earlier images had "
                    f"{sorted(self.optional) or 'none'}")
        return None

    def put(self, image_id: str, regions: PublishedRegions) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((image_id, regions))

    def close(self, raise_error: bool = True) -> None:
        """Wait until every queued row is written; re-raise the writing thread's error."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error and self.error is not None:
            raise self.error
