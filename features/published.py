"""Published region-feature files (vilbert-multi-task, vilbert_beta, BUTD, LXMERT, volta, MMF) read and written.

Each format has one reader class in `READERS`. A reader streams `(source_id, raw)` pairs cheaply (one LMDB value,
one TSV line, one npy pair) and `decode(source_id, raw)` turns one pair into a `PublishedRegions`, checking shapes
and values; every problem is a `FeatureStoreError` naming the source, the id and the problem. Pickles are opened
only through `features.safe_pickle`. The layouts: docs/features.md (importing published features).

`EXPORTERS` write a store back as a vilbert-multi-task LMDB or a BUTD TSV, so the original code can read it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from features.atomic import atomic_path
from features.errors import FeatureStoreError, WeightsError
from features.inputs import clip_boxes
from features.npy import ArrayFileError, load_array, read_header
from features.safe_pickle import safe_load
from features.store import INT32_MAX

logger = logging.getLogger(__name__)

BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")
ID_RULES = ("image", "stem", "int")

# the detector family each published format's features come from (docs/features.md, importing
# published features), recorded as the
# store's extractor "detector" so a model trained on other features can warn
FORMAT_DETECTORS = {
    "vilbert-lmdb": "vmb-x152-fpn", "mmf-npy": "vmb-x152-fpn",
    "vilbert-beta-lmdb": "butd-r101-c4", "butd-tsv": "butd-r101-c4", "lxmert-tsv": "butd-r101-c4",
    "volta-lmdb": "butd-r101-c4",
}


@dataclass
class PublishedRegions:
    """One image's regions as a published file holds them; optional fields are None when the format lacks them."""

    source_id: str
    image_hw: tuple[int, int]
    features: np.ndarray  # [K, D] float32
    boxes: np.ndarray  # [K, 4] float32, x1 y1 x2 y2 original pixels
    cls_prob: np.ndarray | None = None  # [K, C] float32, background first
    objects_id: np.ndarray | None = None  # [K] int64
    objects_conf: np.ndarray | None = None  # [K] float32
    attrs_id: np.ndarray | None = None  # [K] int64
    attrs_conf: np.ndarray | None = None  # [K] float32

    def optional(self) -> dict[str, np.ndarray]:
        names = ("cls_prob", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def store_id(source_id: str, rule: str) -> str:
    """The store's id for a source id: as written (`image`), its file stem (`stem`) or its trailing integer (`int`).

    `int` turns `COCO_train2014_000000000009` (or `9`) into `9`, the id COCO annotations use.
    """
    if rule == "image":
        return source_id
    stem = Path(source_id).name.split(".")[0]
    if rule == "stem":
        return stem
    if rule == "int":
        tail = stem.rsplit("_", 1)[-1]
        if not tail.isdigit():
            raise ValueError(f"id {source_id!r} does not end in an integer (--ids-from int)")
        return str(int(tail))
    raise ValueError(f"unknown id rule {rule!r}; choose one of {', '.join(ID_RULES)}")


# -------------------------------------------------------------------------------------------------- field decoding


class _RowChecker:
    """Decodes and checks the fields of one row; `fail` builds the one-line error for this source and id."""

    def __init__(self, source: str, source_id: str):
        self.source, self.source_id = source, source_id

    def fail(self, problem: str) -> FeatureStoreError:
        return FeatureStoreError(f"{self.source}: image {self.source_id!r}: {problem}")

    def integer(self, row: dict, *names: str) -> int:
        """A count or size field as a non-negative integer that fits int32; floats with a fraction, booleans,
        infinities and huge values are errors rather than truncated or wrapped."""
        for name in names:
            if name in row:
                value = row[name]
                if isinstance(value, bytes):
                    value = value.decode("ascii", errors="replace")
                try:
                    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (float, np.floating))
                                                               and not float(value).is_integer()):
                        raise ValueError
                    number = int(value)
                except (TypeError, ValueError, OverflowError):
                    raise self.fail(f"{name} is {row[name]!r}, not an integer") from None
                if not 0 <= number <= INT32_MAX:
                    raise self.fail(f"{name} is {number}, outside 0..{INT32_MAX}")
                return number
        raise self.fail(f"missing field {names[0]}")

    def array(self, row: dict, name: str, dtype, width: int | None, rows: int | None) -> np.ndarray:
        """Field `name` as a [rows, width] array of `dtype` ([rows] when `width` is 0), from base64 or numpy.

        `width` None means "any width" (found from `rows`, which must then be known); `rows` None means "any".
        """
        if name not in row:
            raise self.fail(f"missing field {name}")
        value = row[name]
        if isinstance(value, (str, bytes)):
            array = self._from_base64(name, value, dtype, width, rows)
        elif isinstance(value, np.ndarray):
            array = value
        else:
            raise self.fail(f"{name} is a {type(value).__name__}, expected base64 text or a numpy array")
        ndim = 1 if width == 0 else 2
        if array.ndim != ndim or (rows is not None and array.shape[0] != rows) or (width and array.shape[1] != width):
            want = f"[{'K' if rows is None else rows}" + ("]" if width == 0 else f", {width or 'D'}]")
            raise self.fail(f"{name} has shape {list(array.shape)}, expected {want}")
        if array.dtype.kind not in "biuf":
            raise self.fail(f"{name} holds {array.dtype} values, not numbers")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise self.fail(f"{name} holds NaN or infinite values")
        return np.ascontiguousarray(array, dtype=dtype)

    def _from_base64(self, name: str, value: str | bytes, dtype, width: int | None, rows: int | None) -> np.ndarray:
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(f"{name} is not valid base64") from None
        if len(data) % np.dtype(dtype).itemsize:
            raise self.fail(f"{name}: {len(data)} bytes is not a whole number of {np.dtype(dtype).name} values")
        flat = np.frombuffer(data, dtype=dtype)
        if width == 0:
            return flat
        if width is None:
            if rows is None or (flat.size % rows if rows else flat.size):
                raise self.fail(f"{name}: {flat.size} values do not split into {rows} rows")
            width = flat.size // rows if rows else 0
            return flat.reshape(rows, width)
        if flat.size % width:
            raise self.fail(f"{name}: {flat.size} values do not form rows of {width}")
        return flat.reshape(-1, width)

    def regions(self, image_hw: tuple[int, int], row: dict, feature_key: str = "features",
                box_key: str = "boxes", num_boxes: int | None = None) -> PublishedRegions:
        """Features [K, D] and boxes [K, 4] with K = `num_boxes` when the format states it."""
        if min(image_hw) <= 0:
            raise self.fail(f"image size {image_hw[1]}x{image_hw[0]} is not positive")
        boxes = self.array(row, box_key, np.float32, 4, num_boxes)
        features = self.array(row, feature_key, np.float32, None, len(boxes))
        clipped = clip_boxes(boxes, image_hw)  # as extraction does with given boxes
        if clipped.clipped or clipped.degenerate:
            logger.warning("%s: image %r: %d box(es) reached outside the %dx%d image and were clipped; %d have no "
                           "area", self.source, self.source_id, clipped.clipped, image_hw[1], image_hw[0],
                           clipped.degenerate)
        return PublishedRegions(self.source_id, image_hw, features, clipped.boxes)

    def labels(self, regions: PublishedRegions, row: dict) -> None:
        """Class and attribute ids and confidences, `cls_prob`, where the row has them (each [K] / [K, C]).

        The sources count classes and attributes from 0 without background / "no attribute"; the store counts
        them as `cls_prob` columns (background 0), so ids are shifted by one.
        """
        k = len(regions.boxes)
        for name, dtype, shift in (("objects_id", np.int64, 1), ("objects_conf", np.float32, 0),
                                   ("attrs_id", np.int64, 1), ("attrs_conf", np.float32, 0)):
            if name in row:
                setattr(regions, name, self.array(row, name, dtype, 0, k) + shift)
        if "cls_prob" in row:
            regions.cls_prob = self.array(row, "cls_prob", np.float32, None, k)


# ----------------------------------------------------------------------------------------------------------- readers


class PublishedReader:
    """A published feature source: `entries()` streams raw rows; `decode()` turns one into regions."""

    format = ""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FeatureStoreError(f"{self.path}: no such {self.format} source")

    def count(self) -> int | None:
        """The number of entries when known without reading them (LMDB keys, npy files), else None."""
        return None

    def entries(self) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def decode(self, source_id: str, raw) -> PublishedRegions:
        raise NotImplementedError

    def close(self) -> None:
        """Release the source's handles."""


class _LmdbReader(PublishedReader):
    """An LMDB with a pickled `keys` list and one pickled row per key (vilbert-multi-task's layout)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        data = self.path / "data.mdb" if self.path.is_dir() else self.path
        try:
            self.env = lmdb.open(str(self.path), subdir=self.path.is_dir(), readonly=True, lock=False,
                                 readahead=False, meminit=False, max_readers=1)
        except lmdb.Error as error:
            raise FeatureStoreError(f"{self.path}: not a readable LMDB ({error})") from None
        # a truncated data file would crash the process (SIGBUS) on the first read past its end: refuse it here
        pages = self.env.info()["last_pgno"] + 1
        needed = pages * self.env.stat()["psize"]
        if data.stat().st_size < needed:
            self.env.close()
            raise FeatureStoreError(f"{data}: truncated LMDB ({data.stat().st_size} bytes, its index needs {needed})")
        try:
            self.keys = self._read_keys()
        except FeatureStoreError:
            self.env.close()
            raise

    def _read_keys(self) -> list[str]:
        raw_keys = self._get(b"keys")
        if raw_keys is None:
            raise FeatureStoreError(f"{self.path}: no 'keys' entry (not a vilbert-style feature LMDB)")
        keys = self._unpickle(raw_keys, "keys")
        if not isinstance(keys, (list, tuple)):
            raise FeatureStoreError(f"{self.path}: 'keys' holds a {type(keys).__name__}, expected a list of ids")
        return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]

    def _get(self, key: bytes) -> bytes | None:
        try:
            with self.env.begin(write=False) as txn:
                return txn.get(key)
        except lmdb.Error as error:
            raise FeatureStoreError(f"{self.path}: cannot read key {key.decode(errors='replace')!r} ({error})") from None

    def _unpickle(self, data: bytes, source_id: str):
        try:
            return safe_load(io.BytesIO(data), encoding="latin1")
        except WeightsError as error:
            problem = str(error).split(": ", 1)[-1]
            raise FeatureStoreError(f"{self.path}: image {source_id!r}: {problem}") from None

    def count(self) -> int:
        return len(self.keys)

    def entries(self) -> Iterator[tuple[str, object]]:
        for key in self.keys:
            yield key, self._get(key.encode())

    def decode(self, source_id: str, raw) -> PublishedRegions:
        check = _RowChecker(str(self.path), source_id)
        if raw is None:
            raise check.fail("listed in 'keys' but has no entry")
        row = self._unpickle(raw, source_id)
        if not isinstance(row, dict):
            raise check.fail(f"entry is a {type(row).__name__}, expected a dict")
        return self.decode_row(check, {(k.decode() if isinstance(k, bytes) else k): v for k, v in row.items()})

    def decode_row(self, check: _RowChecker, row: dict) -> PublishedRegions:
        raise NotImplementedError

    def close(self) -> None:
        self.env.close()


class VilbertLmdbReader(_LmdbReader):
    """vilbert-multi-task: numpy `features` [K, 2048] and `boxes` [K, 4], `image_h`, `image_w` per entry."""

    format = "vilbert-lmdb"

    def decode_row(self, check: _RowChecker, row: dict) -> PublishedRegions:
        hw = (check.integer(row, "image_h"), check.integer(row, "image_w"))
        return check.regions(hw, row)


class VilbertBetaLmdbReader(_LmdbReader):
    """vilbert_beta: each entry the BUTD TSV row (strings; base64 `boxes` and `features` of `num_boxes` rows)."""

    format = "vilbert-beta-lmdb"

    def decode_row(self, check: _RowChecker, row: dict) -> PublishedRegions:
        hw = (check.integer(row, "image_h"), check.integer(row, "image_w"))
        return check.regions(hw, row, num_boxes=check.integer(row, "num_boxes"))


class VoltaLmdbReader(_LmdbReader):
    """volta: the LXMERT row as a dict (base64 text or numpy arrays), `cls_prob` [K, 1601] where present."""

    format = "volta-lmdb"

    def decode_row(self, check: _RowChecker, row: dict) -> PublishedRegions:
        hw = (check.integer(row, "img_h", "image_h"), check.integer(row, "img_w", "image_w"))
        num_boxes = check.integer(row, "num_boxes") if "num_boxes" in row else None
        regions = check.regions(hw, row, num_boxes=num_boxes)
        check.labels(regions, row)
        return regions


class _TsvReader(PublishedReader):
    """Tab-separated rows without a header, base64 arrays; one line per image (lines are megabytes long)."""

    fields: tuple[str, ...] = ()
    id_field = ""

    def entries(self) -> Iterator[tuple[str, object]]:
        with open(self.path, "rb") as f:  # no quoting in these files: a plain split is exact and fast
            for line_number, line in enumerate(f, start=1):
                values = line.rstrip(b"\r\n").split(b"\t")
                if values == [b""]:
                    continue
                if len(values) != len(self.fields):
                    yield f"line {line_number}", (line_number, values)
                else:
                    yield values[0].decode("utf-8", "replace"), dict(zip(self.fields, values, strict=True))

    def decode(self, source_id: str, raw) -> PublishedRegions:
        check = _RowChecker(str(self.path), source_id)
        if isinstance(raw, tuple):
            line_number, values = raw
            raise check.fail(f"line {line_number} has {len(values)} fields, expected {len(self.fields)} "
                             f"({', '.join(self.fields)}); a truncated file?")
        return self.decode_row(check, raw)

    def decode_row(self, check: _RowChecker, row: dict) -> PublishedRegions:
        raise NotImplementedError


class ButdTsvReader(_TsvReader):
    """bottom-up-attention `generate_tsv.py`: image_id, image_w, image_h, num_boxes, boxes, features."""

    format = "butd-tsv"
    fields = BUTD_FIELDS

    def decode_row(self, check: _RowChecker, row: dict) -> PublishedRegions:
        hw = (check.integer(row, "image_h"), check.integer(row, "image_w"))
        return check.regions(hw, row, num_boxes=check.integer(row, "num_boxes"))


class LxmertTsvReader(_TsvReader):
    """airsplay/LXMERT: img_id, img_h, img_w, objects and attributes (ids, conf), num_boxes, boxes, features."""

    format = "lxmert-tsv"
    fields = LXMERT_FIELDS

    def decode_row(self, check: _RowChecker, row: dict) -> PublishedRegions:
        hw = (check.integer(row, "img_h"), check.integer(row, "img_w"))
        regions = check.regions(hw, row, num_boxes=check.integer(row, "num_boxes"))
        check.labels(regions, row)
        return regions


class MmfNpyReader(PublishedReader):
    """MMF: a folder of `<id>.npy` features [K, D] with `<id>_info.npy` (pickled dict: bbox, objects, cls_prob...)."""

    format = "mmf-npy"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        if not self.path.is_dir():
            raise FeatureStoreError(f"{self.path}: mmf-npy expects a folder of <id>.npy and <id>_info.npy files")
        self.files = sorted(p for p in self.path.glob("*.npy") if not p.name.endswith("_info.npy"))

    def count(self) -> int:
        return len(self.files)

    def entries(self) -> Iterator[tuple[str, object]]:
        for path in self.files:
            yield path.stem, path

    def _info(self, check: _RowChecker, path: Path) -> dict:
        """The info dict of an object-dtype npy file, unpickled through the safe unpickler."""
        if not path.exists():
            raise check.fail(f"{path.name} is missing")
        with open(path, "rb") as f:
            try:
                _, _, dtype = read_header(f)
            except ValueError as error:
                raise check.fail(f"{path.name} is not a numpy file ({error})") from None
            if dtype != np.dtype(object):
                raise check.fail(f"{path.name} holds {dtype} data, expected a pickled info dict")
            try:
                info = safe_load(f, encoding="latin1")
            except WeightsError as error:
                raise check.fail(f"{path.name}: {str(error).split(': ', 1)[-1]}") from None
        if isinstance(info, np.ndarray) and info.dtype == object and info.size == 1:
            info = info.reshape(()).item()
        if not isinstance(info, dict):
            raise check.fail(f"{path.name} holds a {type(info).__name__}, expected a dict")
        return info

    def decode(self, source_id: str, raw) -> PublishedRegions:
        check = _RowChecker(str(self.path), source_id)
        path: Path = raw
        try:
            features = load_array(path)
        except ArrayFileError as error:
            raise check.fail(f"{path.name} is not a readable feature array ({str(error).split(': ', 1)[-1]})") from None
        info = self._info(check, path.with_name(f"{path.stem}_info.npy"))
        hw = (check.integer(info, "image_height", "image_h"), check.integer(info, "image_width", "image_w"))
        num_boxes = check.integer(info, "num_boxes") if "num_boxes" in info else None
        row = {"features": features, "bbox": info.get("bbox")}
        if row["bbox"] is None:
            raise check.fail(f"{path.stem}_info.npy has no bbox")
        regions = check.regions(hw, row, box_key="bbox", num_boxes=num_boxes)
        if "objects" in info:
            # MMF's objects are the arg-max over the foreground columns (0-based): as cls_prob columns, + 1
            regions.objects_id = check.array(info, "objects", np.int64, 0, len(regions.boxes)) + 1
        if "cls_prob" in info:
            regions.cls_prob = check.array(info, "cls_prob", np.float32, None, len(regions.boxes))
        return regions


READERS: dict[str, type[PublishedReader]] = {
    reader.format: reader
    for reader in (VilbertLmdbReader, VilbertBetaLmdbReader, ButdTsvReader, LxmertTsvReader, VoltaLmdbReader,
                   MmfNpyReader)
}


def open_published(source: str | os.PathLike, format: str) -> PublishedReader:
    """The reader for `format` on `source`; an unknown format is a FeatureStoreError listing the known ones."""
    if format not in READERS:
        raise FeatureStoreError(f"{source}: unknown feature format {format!r}; known: {', '.join(READERS)}")
    return READERS[format](source)


# --------------------------------------------------------------------------------------------------------- exporters


def _b64(array: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _check_export_ids(ids: list[str], out: Path, format: str) -> None:
    """Refuse ids the format cannot hold faithfully: `keys` (the LMDB's key list) and, in a TSV, tabs, line breaks
    or non-ASCII text (its reader would split or reject the line)."""
    for image_id in ids:
        if format == "vilbert-lmdb" and image_id == "keys":
            problem = "is the LMDB's reserved key holding the key list"
        elif format == "butd-tsv" and (not image_id.isascii() or any(c in image_id for c in "\t\r\n")):
            problem = "holds a tab, a line break or non-ASCII text, which a TSV row cannot"
        else:
            continue
        raise FeatureStoreError(f"--out {out}: image id {image_id!r} {problem}; nothing was written")


def export_vilbert_lmdb(store, out: str | os.PathLike, ids: list[str] | None = None) -> Path:
    """Write `store` as a vilbert-multi-task feature LMDB (folder with data.mdb); the folder appears when complete."""
    out = Path(out)
    ids = list(store.ids if ids is None else ids)
    _check_export_ids(ids, out, "vilbert-lmdb")
    row_bytes = 4 * (store.feature_dim + 4) + 256
    map_size = max(1 << 24, 2 * sum(store.num_boxes(i) * row_bytes + 4096 for i in ids) + (1 << 20))
    with atomic_path(out, store.paths, folder=True) as tmp, contextlib.closing(lmdb.open(str(tmp), map_size=map_size, subdir=True,
                                                              lock=False)) as env:
        keys = []
        with env.begin(write=True) as txn:
            for image_id in ids:
                regions = store.read(image_id)
                value = {
                    "image_id": image_id, "image_h": regions.image_hw[0], "image_w": regions.image_hw[1],
                    "num_boxes": len(regions.boxes),
                    "boxes": np.ascontiguousarray(regions.boxes, np.float32),
                    "features": np.ascontiguousarray(regions.features, np.float32),
                }
                key = str(image_id).encode()
                txn.put(key, pickle.dumps(value, protocol=4))
                keys.append(key)
            txn.put(b"keys", pickle.dumps(keys, protocol=4))
    return out


def export_butd_tsv(store, out: str | os.PathLike, ids: list[str] | None = None) -> Path:
    """Write `store` as a bottom-up-attention TSV (image_id, image_w, image_h, num_boxes, boxes, features)."""
    out = Path(out)
    ids = list(store.ids if ids is None else ids)
    _check_export_ids(ids, out, "butd-tsv")
    with atomic_path(out, store.paths) as tmp, open(tmp, "w", encoding="ascii", newline="") as f:
        for image_id in ids:
            regions = store.read(image_id)
            h, w = regions.image_hw
            fields = (image_id, w, h, len(regions.boxes), _b64(regions.boxes, np.float32),
                      _b64(regions.features, np.float32))
            f.write("\t".join(str(v) for v in fields) + "\n")
    return out


EXPORTERS = {"vilbert-lmdb": export_vilbert_lmdb, "butd-tsv": export_butd_tsv}
