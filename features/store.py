"""The HDF5 feature store, schema version 1: a flat layout of regions with per-image offsets.

One file holds N images and M boxes:

    image_id  [N] UTF-8        image_hw [N, 2] int32        offsets [N + 1] int64
    features  [M, D] float16 (float32 on request), uncompressed, chunked by rows
    boxes     [M, 4] float32, x1 y1 x2 y2 in original pixels
    cls_prob  [M, C] float16 (optional), objects_id / attrs_id [M] int32, objects_conf / attrs_conf [M] float32

Attributes: schema = "vilbert-features", version = 1, feature_dim, extractor (JSON).

Writers never leave a half-written file: `FeatureStoreWriter` writes to a temporary name and renames on success;
`ResumableStoreWriter` keeps finished, immutable part files beside the output so a killed run resumes where it
stopped. The reader opens files lazily in each process and never carries an HDF5 handle across a fork.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from features.atomic import check_output, disk_full_as_error, remove_stale_temporaries, temporary_path
from features.errors import FeatureStoreError
from features.locks import OutputLock

logger = logging.getLogger(__name__)

SCHEMA = "vilbert-features"
VERSION = 1
REQUIRED = ("image_id", "image_hw", "offsets", "features", "boxes")
LABELS = ("objects_id", "objects_conf", "attrs_id", "attrs_conf")
OPTIONAL = ("cls_prob", *LABELS)
INT32_MAX = 2**31 - 1
_LABEL_DTYPES = {"objects_id": np.int32, "objects_conf": np.float32, "attrs_id": np.int32, "attrs_conf": np.float32}
_STRING = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # about 1 MiB of feature rows per chunk


@dataclass
class Regions:
    """The regions of one image, read from a store. Arrays are numpy; `image_hw` is (H, W) in pixels."""

    image_id: str
    image_hw: tuple[int, int]
    features: np.ndarray  # [K, D] float32
    boxes: np.ndarray  # [K, 4] float32, x1 y1 x2 y2 original pixels
    cls_prob: np.ndarray | None = None  # [K, C] float32, background at index 0
    objects_id: np.ndarray | None = None  # [K] int
    objects_conf: np.ndarray | None = None  # [K] float32
    attrs_id: np.ndarray | None = None  # [K] int
    attrs_conf: np.ndarray | None = None  # [K] float32

    def __len__(self) -> int:
        return len(self.boxes)


# ----------------------------------------------------------------------------------------------------------- writer


class FeatureStoreWriter:
    """Write one store file, appending image by image; the file appears at `path` only when `close()` succeeds.

    Data goes to `.<name>.tmp-<pid>@<host>` beside `path` first, in batches (`flush()` or automatically every `flush_rows` rows);
    `close()` renames it into place. An exception inside a `with` block discards the temporary file.
    Optional label datasets (objects_id, ...) are created by the first image that carries them, which must come
    before any image with boxes but without them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        feature_dim: int,
        cls_prob_dim: int | None = None,
        extractor: dict | None = None,
        float32: bool = False,
        flush_rows: int = 4096,
    ):
        if int(feature_dim) <= 0:
            raise FeatureStoreError(f"{path}: feature_dim must be positive, got {feature_dim}")
        self.path = Path(path)
        self.feature_dim = int(feature_dim)
        self.cls_prob_dim = int(cls_prob_dim) if cls_prob_dim else None
        self.extractor = dict(extractor or {})
        self.feature_dtype = np.float32 if float32 else np.float16
        self.flush_rows = flush_rows
        self.ids: set[str] = set()
        self.num_images = 0
        self.num_rows = 0
        self._buffer: list[dict] = []
        self._buffered_rows = 0
        self._labels: tuple[str, ...] | None = None
        self._datasets: dict[str, h5py.Dataset] = {}  # held open: their cached writes fail in a call, not a dealloc
        check_output(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path.parent)
        self._tmp = temporary_path(self.path)
        try:
            self._file = h5py.File(self._tmp, "w")
        except OSError as error:
            raise FeatureStoreError(f"{self.path}: cannot create the feature file ({error})") from error
        try:
            with _hdf5_writes(self.path):
                self._create_datasets()
        except BaseException:
            self.abort()
            raise

    # datasets -------------------------------------------------------------------------------------------------

    def _rows_dataset(self, name: str, width: int | None, dtype) -> None:
        row_bytes = np.dtype(dtype).itemsize * (width or 1)
        chunk_rows = max(1, min(65536, _CHUNK_BYTES // row_bytes))
        shape = (0, width) if width else (0,)
        self._datasets[name] = self._file.create_dataset(
            name, shape=shape, maxshape=(None, width) if width else (None,), dtype=dtype,
            chunks=(chunk_rows, width) if width else (chunk_rows,),
        )

    def _create_datasets(self) -> None:
        f = self._file
        f.attrs["schema"] = SCHEMA
        f.attrs["version"] = VERSION
        f.attrs["feature_dim"] = self.feature_dim
        f.attrs["extractor"] = json.dumps(self.extractor, sort_keys=True)
        d = self._datasets
        d["image_id"] = f.create_dataset("image_id", shape=(0,), maxshape=(None,), dtype=_STRING, chunks=(4096,))
        d["image_hw"] = f.create_dataset("image_hw", shape=(0, 2), maxshape=(None, 2), dtype=np.int32, chunks=(4096, 2))
        d["offsets"] = f.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,))
        self._rows_dataset("features", self.feature_dim, self.feature_dtype)
        self._rows_dataset("boxes", 4, np.float32)
        if self.cls_prob_dim:
            self._rows_dataset("cls_prob", self.cls_prob_dim, np.float16)

    # appending ------------------------------------------------------------------------------------------------

    def add(
        self,
        image_id: str,
        image_hw: tuple[int, int],
        features,
        boxes,
        cls_prob=None,
        objects_id=None,
        objects_conf=None,
        attrs_id=None,
        attrs_conf=None,
    ) -> None:
        """Queue one image's regions: `features` [K, D], `boxes` [K, 4]; optional per-box arrays of length K."""
        image_id = str(image_id)
        if image_id in self.ids:
            raise FeatureStoreError(f"{self.path}: image id {image_id!r} is written twice")
        features, boxes = _numpy(features), _numpy(boxes)
        if boxes.size == 0:  # an image without regions
            features, boxes = features.reshape(0, self.feature_dim), boxes.reshape(0, 4)
        k = len(boxes)
        if features.ndim != 2 or features.shape != (k, self.feature_dim) or boxes.shape != (k, 4):
            raise FeatureStoreError(
                f"{self.path}: image {image_id!r}: expected features [K, {self.feature_dim}] and boxes [K, 4], "
                f"got {tuple(features.shape)} and {tuple(boxes.shape)}"
            )
        where = f"{self.path}: image {image_id!r}"
        record = {"image_id": image_id, "image_hw": _image_size(image_hw, where),
                  "features": _checked_cast(features, self.feature_dtype, f"{where}: features"),
                  "boxes": _checked_cast(boxes, np.float32, f"{where}: boxes")}
        if self.cls_prob_dim:
            if cls_prob is None:
                if k:
                    raise FeatureStoreError(f"{self.path}: image {image_id!r} has no cls_prob but the store has one")
                cls_prob = np.zeros((0, self.cls_prob_dim), np.float16)
            cls_prob = _numpy(cls_prob).reshape(-1, self.cls_prob_dim) if k == 0 else _numpy(cls_prob)
            if cls_prob.shape != (k, self.cls_prob_dim):
                raise FeatureStoreError(
                    f"{self.path}: image {image_id!r}: expected cls_prob [{k}, {self.cls_prob_dim}], "
                    f"got {tuple(cls_prob.shape)}"
                )
            record["cls_prob"] = _checked_cast(cls_prob, np.float16, f"{where}: cls_prob")
        elif cls_prob is not None:
            raise FeatureStoreError(f"{self.path}: image {image_id!r} has cls_prob but the writer has no cls_prob_dim")
        given = {"objects_id": objects_id, "objects_conf": objects_conf, "attrs_id": attrs_id, "attrs_conf": attrs_conf}
        present = tuple(name for name in LABELS if given[name] is not None)
        if present and self._labels is None:
            if self.num_rows + self._buffered_rows:
                raise FeatureStoreError(
                    f"{self.path}: image {image_id!r} brings {', '.join(present)} but earlier images had none"
                )
            self._labels = present
        for name in self._labels or ():
            value = given[name]
            if value is None:
                if k:
                    raise FeatureStoreError(f"{self.path}: image {image_id!r} has no {name} but the store has one")
                value = np.zeros(0)
            value = _numpy(value).reshape(-1)
            if value.shape != (k,):
                raise FeatureStoreError(f"{self.path}: image {image_id!r}: expected {name} [{k}], got {value.shape}")
            record[name] = _checked_cast(value, _LABEL_DTYPES[name], f"{where}: {name}")
        extra = set(present) - set(self._labels or ())
        if extra:
            raise FeatureStoreError(f"{self.path}: image {image_id!r} brings {', '.join(sorted(extra))} "
                                    "that earlier images did not have")
        self.ids.add(image_id)
        self._buffer.append(record)
        self._buffered_rows += k
        if self._buffered_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write the queued images to the temporary file (a full disk is a `DiskFullError` naming `path`)."""
        if not self._buffer:
            return
        with _hdf5_writes(self.path):
            self._flush()
            self._file.flush()

    def _flush(self) -> None:
        f, records = self._datasets, self._buffer
        n0, n1 = self.num_images, self.num_images + len(records)
        m0, m1 = self.num_rows, self.num_rows + self._buffered_rows
        counts = np.array([len(r["boxes"]) for r in records], np.int64)
        _append(f["image_id"], n0, n1, np.array([r["image_id"] for r in records], dtype=object))
        _append(f["image_hw"], n0, n1, np.array([r["image_hw"] for r in records], np.int32).reshape(-1, 2))
        _append(f["offsets"], n0 + 1, n1 + 1, m0 + np.cumsum(counts))
        _append(f["features"], m0, m1, np.concatenate([r["features"] for r in records]))
        _append(f["boxes"], m0, m1, np.concatenate([r["boxes"] for r in records]).astype(np.float32))
        if self.cls_prob_dim:
            _append(f["cls_prob"], m0, m1, np.concatenate([r["cls_prob"] for r in records]))
        for name in self._labels or ():
            if name not in f:
                self._rows_dataset(name, None, _LABEL_DTYPES[name])
            _append(f[name], m0, m1, np.concatenate([r[name] for r in records]).astype(_LABEL_DTYPES[name]))
        self.num_images, self.num_rows = n1, m1
        self._buffer, self._buffered_rows = [], 0

    def close(self) -> Path:
        """Flush, close and move the finished file to `path`; returns that path."""
        if self._file is None:
            return self.path
        self.flush()
        with _hdf5_writes(self.path):
            self._file.flush()
        with _hdf5_writes(self.path):
            self._datasets = {}
            self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; `path` is left as it was.

        HDF5 closes the file with its descriptor pointed at the null device: after a failed write (a full disk)
        closing flushes the dirty caches again, and HDF5 does not survive a second failed write (a segfault).
        """
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                os.truncate(self._tmp, 0)
            _discard_writes(file)
            self._datasets = {}
            try:
                with _hdf5_writes(self.path):
                    file.close()
            except Exception as error:  # noqa: BLE001 - the data is being dropped; only its removal matters
                logger.debug("%s: closing the discarded file failed (%s)", self._tmp, error)
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextlib.contextmanager
def _hdf5_writes(path: Path) -> Iterator[None]:
    """Writes to an HDF5 file: a failure HDF5 reports while h5py frees an object (printed as "Exception ignored"
    and otherwise lost) is raised here, and a full disk becomes one `DiskFullError` naming `path`."""
    caught: list[BaseException] = []
    previous, previous_excepthook = sys.unraisablehook, sys.excepthook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "h5py" in repr(unraisable.object):
            caught.append(unraisable.exc_value)
        else:
            previous(unraisable)

    def excepthook(kind, value, tb) -> None:  # Cython prints a __dealloc__ failure through here first
        frames = traceback.extract_tb(tb)
        if isinstance(value, RuntimeError) and frames and "h5py" in frames[-1].filename:
            caught.append(value)
        else:
            previous_excepthook(kind, value, tb)

    sys.unraisablehook, sys.excepthook = hook, excepthook
    try:
        with disk_full_as_error(path):
            try:
                yield
            except BaseException as error:
                traceback.clear_frames(error.__traceback__)  # free the failed call's h5py objects while hooked
                raise
            if caught:
                raise caught[0]
    finally:
        sys.unraisablehook, sys.excepthook = previous, previous_excepthook


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _cast(values: np.ndarray, dtype) -> np.ndarray:
    """`values` as `dtype`; float32 -> float16 goes through torch, several times faster than numpy's conversion."""
    if values.dtype == np.float32 and dtype == np.float16:
        with warnings.catch_warnings():  # read-only input (np.frombuffer) is only read here
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(values)).half().numpy()
    return np.asarray(values, dtype=dtype)


def _checked_cast(values: np.ndarray, dtype, where: str) -> np.ndarray:
    """`_cast`, refusing what the stored dtype cannot hold: non-numbers, NaN/inf, values beyond its range (a
    float16 store turns |x| > 65504 into inf; an int32 label wraps) and fractional label ids."""
    if values.dtype.kind not in "biuf":
        raise FeatureStoreError(f"{where} are {values.dtype} values, not numbers")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise FeatureStoreError(f"{where} hold NaN or infinite values")
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise FeatureStoreError(f"{where}: {values.min()}..{values.max()} does not fit {np.dtype(dtype).name}")
        if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
            raise FeatureStoreError(f"{where} hold non-integer values")
        return values.astype(dtype)
    cast = _cast(values, dtype)
    if cast.dtype.kind == "f" and not np.isfinite(cast).all():
        limit = np.finfo(cast.dtype).max
        raise FeatureStoreError(f"{where}: values up to {np.abs(values).max():.4g} exceed {cast.dtype}'s range "
                                f"(|x| <= {limit:.6g}); store float32 features (--float32)")
    return cast


def _image_size(image_hw, where: str) -> tuple[int, int]:
    """(height, width) as positive integers that fit int32; a float, bool or out-of-range size is an error."""
    sizes = []
    for name, value in zip(("height", "width"), image_hw, strict=True):
        integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            integral, value = True, int(value)
        if not integral or not 0 < int(value) <= INT32_MAX:
            raise FeatureStoreError(f"{where}: image {name} {value!r} is not a positive integer up to {INT32_MAX}")
        sizes.append(int(value))
    return sizes[0], sizes[1]


def _discard_writes(file: h5py.File) -> None:
    """Point an open HDF5 file's descriptor at the null device, so that whatever HDF5 still writes succeeds and
    goes nowhere (the file is being dropped)."""
    try:
        descriptor = file.id.get_vfd_handle()
    except Exception:  # noqa: BLE001 - another driver or a closed file: nothing to redirect
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)


def _append(dataset: h5py.Dataset, start: int, stop: int, values: np.ndarray) -> None:
    dataset.resize(stop, axis=0)
    dataset[start:stop] = values


# ----------------------------------------------------------------------------------------------------------- reader


@dataclass
class _FileIndex:
    """What the reader keeps in memory per file: ids, sizes and offsets, plus its open handle (per process)."""

    path: str
    ids: list[str]
    rows: dict[str, int]
    image_hw: np.ndarray  # [N, 2]
    offsets: np.ndarray  # [N + 1]
    feature_dim: int
    feature_dtype: str
    extractor: dict
    optional: dict[str, int]  # optional dataset name -> width (0 for 1-d)


def _fail(path, problem: str) -> FeatureStoreError:
    return FeatureStoreError(f"{path}: {problem}")


def _open_h5(path: str, chunk_cache_bytes: int = 1 << 20) -> h5py.File:
    if not os.path.exists(path):
        raise _fail(path, "feature file not found")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not an HDF5 feature file")
    try:
        return h5py.File(path, "r", rdcc_nbytes=chunk_cache_bytes)
    except OSError as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise _fail(path, f"not a readable HDF5 feature file (truncated or another format?): {reason}") from error


def _index_file(path: str) -> _FileIndex:
    """Open, validate and index one store file; every problem becomes one FeatureStoreError."""
    with _open_h5(path) as f:
        try:
            return _validate(path, f)
        except FeatureStoreError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise _fail(path, f"damaged feature file ({type(error).__name__}: {error})") from error


def _attribute(f: h5py.File, name: str):
    """A file attribute as a plain Python value (None when absent)."""
    value = f.attrs.get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value.item() if isinstance(value, np.generic) else value


def _validate(path: str, f: h5py.File) -> _FileIndex:
    schema = _attribute(f, "schema")
    if schema != SCHEMA:
        raise _fail(path, f"not a vilbert feature file (attribute schema is {schema!r}, expected {SCHEMA!r})")
    version = _attribute(f, "version")
    if version is None or int(version) != VERSION:
        raise _fail(path, f"unsupported feature file version {version!r}; this reader knows version {VERSION}")
    missing = [name for name in REQUIRED if name not in f]
    if missing:
        raise _fail(path, f"missing dataset(s) {', '.join(missing)}")
    n = f["image_id"].shape[0] if f["image_id"].ndim == 1 else -1
    if n < 0:
        raise _fail(path, f"image_id must be 1-d, got shape {f['image_id'].shape}")
    features = f["features"]
    if features.ndim != 2:
        raise _fail(path, f"features must be [M, D], got shape {features.shape}")
    m, d = features.shape
    feature_dim = _attribute(f, "feature_dim")
    if feature_dim is None or int(feature_dim) != d:
        raise _fail(path, f"attribute feature_dim is {feature_dim!r} but features are {d} wide")
    if features.dtype not in (np.float16, np.float32):
        raise _fail(path, f"features must be float16 or float32, got {features.dtype}")
    expected = {"image_hw": (n, 2), "offsets": (n + 1,), "boxes": (m, 4)}
    for name, shape in expected.items():
        if f[name].shape != shape:
            raise _fail(path, f"{name} has shape {f[name].shape}, expected {shape} for {n} images and {m} boxes")
    optional = {}
    for name in OPTIONAL:
        if name in f:
            shape = f[name].shape
            if shape[0] != m or (name == "cls_prob") != (len(shape) == 2) or len(shape) > 2:
                raise _fail(path, f"{name} has shape {shape}, expected {m} rows")
            optional[name] = shape[1] if len(shape) == 2 else 0
    offsets = f["offsets"][:].astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != m or np.any(np.diff(offsets) < 0):
        raise _fail(path, f"offsets must rise from 0 to {m} (the number of boxes); got {offsets[0]} .. {offsets[-1]}"
                          f"{' and a decreasing step' if np.any(np.diff(offsets) < 0) else ''}")
    ids = [str(i) for i in f["image_id"].asstr()[:]]
    rows = {image_id: row for row, image_id in enumerate(ids)}
    if len(rows) != n:
        seen, duplicates = set(), []
        for image_id in ids:
            if image_id in seen:
                duplicates.append(image_id)
            seen.add(image_id)
        raise _fail(path, f"duplicate image ids: {', '.join(duplicates[:5])}")
    try:
        extractor = json.loads(_attribute(f, "extractor") or "{}")
    except (TypeError, ValueError) as error:
        raise _fail(path, f"attribute extractor is not JSON ({error})") from error
    return _FileIndex(
        path=path, ids=ids, rows=rows, image_hw=f["image_hw"][:].astype(np.int64), offsets=offsets,
        feature_dim=int(d), feature_dtype=str(features.dtype), extractor=extractor, optional=optional,
    )


def _float32(values: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch, about 8x faster than numpy's conversion; other dtypes unchanged."""
    if values.dtype != np.float16:
        return values
    return torch.from_numpy(values).float().numpy()


_OPEN_STORES: weakref.WeakSet = weakref.WeakSet()


def _close_before_fork() -> None:
    for store in list(_OPEN_STORES):
        store.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_before_fork)


class FeatureStore:
    """Read regions by image id from one or more store files.

    Files are validated and indexed at construction (offsets and ids stay in memory); data handles open lazily
    in the process that reads, and are closed before any fork, so the store is safe in DataLoader workers.
    Pickling keeps only the paths and the index. With several files, an id present in more than one gets its
    regions concatenated in file order (detected + ground-truth boxes, or shards); feature widths must agree.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not paths:
            raise FeatureStoreError("no feature files given")
        self.paths = [str(p) for p in paths]
        self._files = [_index_file(p) for p in self.paths]
        first = self._files[0]
        for other in self._files[1:]:
            if other.feature_dim != first.feature_dim:
                raise FeatureStoreError(
                    f"cannot join {first.path} (features {first.feature_dim} wide) with {other.path} "
                    f"({other.feature_dim} wide)"
                )
        self.feature_dim = first.feature_dim
        self.optional = self._shared_optional()
        seen: dict[str, None] = {}
        for index in self._files:
            seen.update(dict.fromkeys(index.ids))
        self.ids: list[str] = list(seen)
        self._handles: list[h5py.File | None] = [None] * len(self._files)
        self._datasets: list[dict | None] = [None] * len(self._files)
        self._pid = os.getpid()
        _OPEN_STORES.add(self)

    def _shared_optional(self) -> dict[str, int]:
        shared = dict(self._files[0].optional)
        for index in self._files[1:]:
            for name in list(shared):
                if index.optional.get(name) != shared[name]:
                    logger.warning("%s: %s not in every joined file (or of another width); not read", index.path, name)
                    del shared[name]
        return shared

    # pickling and per-process handles -------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = [None] * len(self._files)
        state["_datasets"] = [None] * len(self._files)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
        _OPEN_STORES.add(self)

    def close(self) -> None:
        """Close this process's handles (they reopen on the next read)."""
        if self._pid == os.getpid():
            for handle in self._handles:
                if handle is not None:
                    handle.close()
        self._handles = [None] * len(self._files)
        self._datasets = [None] * len(self._files)

    def _open(self, i: int) -> dict[str, h5py.Dataset]:
        """This process's datasets of file i, opened on first use."""
        if self._pid != os.getpid():  # forked without our hook: never touch the parent's handles
            self._handles = [None] * len(self._files)
            self._datasets = [None] * len(self._files)
            self._pid = os.getpid()
        datasets = self._datasets[i]
        if datasets is None:
            # no chunk cache: random reads of a few rows then touch only those bytes, not whole chunks
            handle = self._handles[i] = _open_h5(self._files[i].path, chunk_cache_bytes=0)
            names = ("features", "boxes", *self.optional)
            datasets = self._datasets[i] = {name: handle[name] for name in names}
        return datasets

    # queries --------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return any(image_id in index.rows for index in self._files)

    @property
    def extractor(self) -> dict:
        """The extractor description of the first file (what made these features)."""
        return self._files[0].extractor

    @property
    def attrs(self) -> list[dict]:
        """Per file: path, feature dim and dtype, extractor description, optional datasets."""
        return [
            {"path": index.path, "feature_dim": index.feature_dim, "features_dtype": index.feature_dtype,
             "extractor": index.extractor, "optional": sorted(index.optional)}
            for index in self._files
        ]

    def num_boxes(self, image_id: str) -> int:
        return sum(
            int(index.offsets[index.rows[image_id] + 1] - index.offsets[index.rows[image_id]])
            for index in self._files if image_id in index.rows
        )

    def read(self, image_id: str, float32: bool = True, optional: Sequence[str] | None = None) -> Regions:
        """All regions of one image; FeatureStoreError if no file holds the id. Features and class distributions
        come as float32, or with `float32=False` as stored (float16 by default: half the bytes to move; training
        casts them on the device). `optional` names the optional datasets to read (default: every one the store
        has; `()` reads features and boxes alone)."""
        parts, image_hw = [], None
        for i, index in enumerate(self._files):
            row = index.rows.get(image_id)
            if row is None:
                continue
            hw = (int(index.image_hw[row, 0]), int(index.image_hw[row, 1]))
            if image_hw is not None and hw != image_hw:
                raise FeatureStoreError(
                    f"{index.path}: image {image_id!r} is {hw[0]}x{hw[1]} here but {image_hw[0]}x{image_hw[1]} "
                    "in an earlier file"
                )
            image_hw = hw
            parts.append(self._read_rows(i, int(index.offsets[row]), int(index.offsets[row + 1]), image_id, float32,
                                         optional))
        if image_hw is None:
            where = self.paths[0] if len(self.paths) == 1 else ", ".join(self.paths)
            raise FeatureStoreError(f"{where}: no image with id {image_id!r}")
        if len(parts) == 1:
            fields = parts[0]
        else:
            fields = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return Regions(image_id=image_id, image_hw=image_hw, **fields)

    def _read_rows(self, i: int, start: int, stop: int, image_id: str, float32: bool = True,
                   optional: Sequence[str] | None = None) -> dict:
        datasets = self._open(i)
        convert = _float32 if float32 else np.asarray
        wanted = None if optional is None else {"features", "boxes", *optional}
        try:
            fields = {name: convert(dataset[start:stop]) for name, dataset in datasets.items()
                      if wanted is None or name in wanted}
        except (OSError, KeyError, ValueError) as error:
            raise _fail(self._files[i].path, f"cannot read image {image_id!r} ({error})") from error
        return fields

    def summary(self) -> dict:
        """Counts, boxes per image, dtypes, extractor attributes and optional datasets, for `features info`."""
        counts = np.zeros(len(self.ids), np.int64)
        position = {image_id: j for j, image_id in enumerate(self.ids)}
        for index in self._files:
            per_image = np.diff(index.offsets)
            for image_id, row in index.rows.items():
                counts[position[image_id]] += per_image[row]
        return {
            "files": self.attrs,
            "images": len(self.ids),
            "boxes": int(counts.sum()),
            "boxes_per_image": {
                "min": int(counts.min()) if len(counts) else 0,
                "mean": float(counts.mean()) if len(counts) else 0.0,
                "max": int(counts.max()) if len(counts) else 0,
            },
            "feature_dim": self.feature_dim,
            "optional": {name: width for name, width in self.optional.items()},
        }


def is_complete_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a valid store file (never raises)."""
    try:
        _index_file(str(path))
    except FeatureStoreError:
        return False
    return True


# ------------------------------------------------------------------------------------------------------------ merge


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, start: int, block_rows: int) -> None:
    total = src.shape[0]
    dst.resize(start + total, axis=0)
    for a in range(0, total, block_rows):
        b = min(total, a + block_rows)
        dst[start + a : start + b] = src[a:b]


def store_lock(path: str | os.PathLike) -> OutputLock:
    """The lock every writer of store `path` holds (`<path>.lock`), not yet taken."""
    path = Path(path)
    return OutputLock(path.with_name(path.name + ".lock"), f"feature store {path}")


def merge_stores(paths: Iterable[str | os.PathLike], out_path: str | os.PathLike, float32: bool | None = None,
                 lock: OutputLock | None = None) -> Path:
    """Concatenate stores with disjoint ids (shards, resumed parts) into one file, written atomically.

    The inputs must agree on feature width, extractor and optional datasets; a repeated id is an error. `out_path`
    may be one of them (appending to a store). The store's lock is taken for the merge unless the caller holds it
    (`lock`).
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise FeatureStoreError(f"{out_path}: nothing to merge")
    with contextlib.nullcontext() if lock is not None else store_lock(out_path):
        return _merge(paths, out_path, float32)


def _merge(paths: list[str], out_path: str | os.PathLike, float32: bool | None) -> Path:
    indexes = [_index_file(p) for p in paths]
    first = indexes[0]
    # files without boxes say nothing about optional datasets; the others must agree on them
    reference = next((ix for ix in indexes if ix.offsets[-1] > 0), first)
    optional = reference.optional
    seen: dict[str, str] = {}
    for index in indexes:
        if index.feature_dim != first.feature_dim:
            raise FeatureStoreError(f"cannot merge {index.path} ({index.feature_dim}-d) with {first.path} "
                                    f"({first.feature_dim}-d)")
        if index.extractor != first.extractor:
            raise FeatureStoreError(f"cannot merge {index.path}: its extractor differs from {first.path}'s")
        if index.offsets[-1] > 0 and index.optional != optional:
            raise FeatureStoreError(f"cannot merge {index.path}: optional datasets {sorted(index.optional)} differ "
                                    f"from {reference.path}'s {sorted(optional)}")
        for image_id in index.ids:
            if image_id in seen:
                raise FeatureStoreError(f"image id {image_id!r} is in both {seen[image_id]} and {index.path}")
            seen[image_id] = index.path
    if float32 is None:
        float32 = first.feature_dtype == "float32"
    writer = FeatureStoreWriter(out_path, first.feature_dim, optional.get("cls_prob"), first.extractor, float32)
    try:
        out = writer._datasets
        for name in LABELS:
            if name in optional:
                writer._rows_dataset(name, None, _LABEL_DTYPES[name])
        n, m = 0, 0
        with _hdf5_writes(writer.path):  # a full disk: one DiskFullError, raised before anything closes
            for index in indexes:
                with _open_h5(index.path) as f:
                    count, rows = len(index.ids), int(index.offsets[-1])
                    _append(out["image_id"], n, n + count, np.array(index.ids, dtype=object))
                    _append(out["image_hw"], n, n + count, f["image_hw"][:])
                    _append(out["offsets"], n + 1, n + count + 1, m + index.offsets[1:])
                    for name in ("features", "boxes", *(o for o in OPTIONAL if o in optional)):
                        if rows:
                            row_bytes = f[name].dtype.itemsize * (f[name].shape[1:] or (1,))[0]
                            _copy_rows(f[name], out[name], m, max(1, (64 << 20) // max(1, row_bytes)))
                    n, m = n + count, m + rows
            writer._file.flush()
        writer.num_images, writer.num_rows = n, m
        writer._labels = tuple(name for name in LABELS if name in optional) or None
        writer.ids = set(seen)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


# ------------------------------------------------------------------------------------------------- resumable writing


class ResumableStoreWriter:
    """Write a store that survives being killed at any moment: rerunning continues where the last run stopped.

    Finished work lives in immutable part files `<path>.partial/part-NNNNN.h5`, each written atomically by a
    `FeatureStoreWriter`; a part is sealed every `part_images` images or `part_seconds` seconds (`checkpoint()`).
    A kill loses at most the open part, which is redone on the rerun. `finish()` merges an existing `<path>`
    (earlier complete run), the parts and the open part into `<path>` atomically, then removes the part folder.
    `done_ids` are the ids already safely written, so the caller can skip them. One process at a time: the writer
    holds `<path>.lock` (see `features.locks`) from construction to `finish()` / `abort()`, so a second writer on
    the same output refuses instead of deleting the first one's open part.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        feature_dim: int,
        cls_prob_dim: int | None = None,
        extractor: dict | None = None,
        float32: bool = False,
        part_images: int = 2048,
        part_seconds: float = 60.0,
        lock: OutputLock | None = None,
    ):
        """`lock`: the store's lock (`store_lock`) when the caller took it already; it is released like our own."""
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".partial")
        self.options = {"feature_dim": int(feature_dim), "cls_prob_dim": cls_prob_dim,
                        "extractor": json.loads(json.dumps(extractor or {})), "float32": float32}
        self.part_images, self.part_seconds = part_images, part_seconds
        self.lock = (lock or store_lock(self.path)).acquire()
        try:
            self._open_existing()
        except BaseException:
            self.lock.release()
            raise
        self._writer: FeatureStoreWriter | None = None
        self._opened_at = 0.0

    def _open_existing(self) -> None:
        """Read what earlier runs left: a complete store at `path` and sealed parts; drop half-written files."""
        for stale in [*self.parts_dir.glob(".*.tmp-*"), *self.path.parent.glob(f".{self.path.name}.tmp-*")]:
            stale.unlink(missing_ok=True)  # a writer or merge killed half-way
        self.base = [self.path] if self.path.exists() else []
        self.done_ids: set[str] = set()
        for existing in self.base:
            index = _index_file(str(existing))
            self._check_compatible(index)
            self.done_ids.update(index.ids)
        self.parts: list[Path] = []
        found = sorted(self.parts_dir.glob("part-*.h5"))
        self._next_part = 1 + max((int(p.stem.split("-")[1]) for p in found), default=-1)
        for part in found:
            index = _index_file(str(part))
            self._check_compatible(index)
            overlap = self.done_ids.intersection(index.ids)
            if overlap and len(overlap) == len(index.ids) and self.base:
                part.unlink()  # already merged into `path` by a run killed while cleaning up
                continue
            if overlap:
                raise FeatureStoreError(f"{part}: repeats image ids already written ({', '.join(sorted(overlap)[:5])})")
            self.done_ids.update(index.ids)
            self.parts.append(part)
        self.resumed = len(self.done_ids)

    def _check_compatible(self, index: _FileIndex) -> None:
        want = self.options
        dtype = "float32" if want["float32"] else "float16"
        if (index.feature_dim, index.extractor, index.feature_dtype) != (want["feature_dim"], want["extractor"], dtype):
            raise FeatureStoreError(
                f"{index.path}: holds {index.feature_dim}-d {index.feature_dtype} features from another extractor "
                f"or settings ({json.dumps(index.extractor, sort_keys=True)[:200]}); remove it or choose another output"
            )

    def add(self, image_id: str, image_hw: tuple[int, int], features, boxes, **optional) -> None:
        if image_id in self.done_ids:
            raise FeatureStoreError(f"{self.path}: image id {image_id!r} is already written")
        if self._writer is None:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            part = self.parts_dir / f"part-{self._next_part:05d}.h5"
            self._next_part += 1
            self._writer = FeatureStoreWriter(part, **self.options)
            self._opened_at = time.monotonic()
        self._writer.add(image_id, image_hw, features, boxes, **optional)
        self.done_ids.add(image_id)

    def checkpoint(self, force: bool = False) -> None:
        """Seal the open part if it is big or old enough (or `force`); call after each batch."""
        writer = self._writer
        if writer is None:
            return
        due = len(writer.ids) >= self.part_images or time.monotonic() - self._opened_at >= self.part_seconds
        if force or due:
            self.parts.append(writer.close())
            self._writer = None
        else:
            writer.flush()

    def finish(self) -> Path:
        """Seal the open part and merge everything into `path`; returns `path` (and releases the lock)."""
        self.checkpoint(force=True)
        sources = self.base + self.parts
        if len(sources) == 1 and sources != self.base:
            os.replace(sources[0], self.path)
        elif len(sources) > 1:
            merge_stores(sources, self.path, float32=self.options["float32"], lock=self.lock)
        elif not sources:
            FeatureStoreWriter(self.path, **self.options).close()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.lock.release()
        return self.path

    def abort(self) -> None:
        """Stop without merging; sealed parts stay for the next run, the open part is dropped, the lock released.

        An empty part folder is removed, so a refused or fruitless run leaves nothing behind.
        """
        try:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                writer.abort()
            if self.parts_dir.is_dir() and not any(self.parts_dir.iterdir()):
                self.parts_dir.rmdir()
        finally:
            self.lock.release()
