"""Benchmark `vilbert features import` (images/s) beside a bare read-and-decode loop over the same source.

    python bench/features_import.py                    # 300 images x 100 boxes x 2048-d float32, LMDB and TSV
    python bench/features_import.py --images 1000 --formats vilbert-lmdb

For each format a source is generated with the test writers (tests/fixtures/published_sources.py), then, in the
same run and in alternating order, timed twice: the bare loop (the format's reader: read each row and decode its arrays, nothing
kept) and the full import into a float16 store (--float32: a float32 store, no cast). The ratio import / bare is what
the store writes cost on top of decoding. The store's size is compared with what its float16 features alone need.

By default the source sits in the page cache, so an LMDB "read" is a memory copy. --cold evicts the source's pages
(fsync, then posix_fadvise DONTNEED) before every timed pass, so both loops read it from disk, as an import of a
real 60 GB feature file does.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lmdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.importing import import_features  # noqa: E402
from features.published import open_published  # noqa: E402
from features.safe_pickle import safe_load  # noqa: E402
from tests.fixtures.published_sources import WRITERS, make_rows  # noqa: E402


def evict(source: Path) -> None:
    """Drop the source's pages from the page cache (clean pages only, hence the fsync first)."""
    for path in ([p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source]):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bare_loop(source: Path, format: str) -> float:
    """Seconds to read and decode every row, keeping nothing."""
    started = time.perf_counter()
    reader = open_published(source, format)
    for source_id, raw in reader.entries():
        reader.decode(source_id, raw)
    reader.close()
    return time.perf_counter() - started


def import_once(source: Path, format: str, out: Path, float32: bool, workers: int = 1) -> float:
    if out.exists():
        out.unlink()
    summary = import_features(source, format, out, progress=False, float32=float32, workers=workers)
    return summary.seconds


def bench(format: str, args, folder: Path) -> dict:
    writer, name = WRITERS[format]
    source = folder / name
    for start in range(0, args.images, 100):  # write in slices to keep the generator's memory small
        rows = make_rows(min(100, args.images - start), k=args.boxes, dim=args.dim, seed=start)
        for i, row in enumerate(rows):
            row["id"] = str(start + i + 1)
        part = writer(folder / f"part-{start}", rows)
        _append(format, part, source)
    bare, full = [], []
    out = folder / "feats.h5"
    for _ in range(args.repeats):
        if args.cold:
            evict(source)
        bare.append(bare_loop(source, format))
        if args.cold:
            evict(source)
        full.append(import_once(source, format, out, args.float32, args.workers))
    store_bytes = out.stat().st_size
    feature_bytes = args.images * args.boxes * args.dim * 2  # what float16 features need
    best_bare, best_full = min(bare), min(full)
    return {"format": format, "store": "float32" if args.float32 else "float16", "source": "cold" if args.cold else "cached",
            "workers": args.workers,
            "images": args.images, "boxes": args.boxes, "dim": args.dim,
            "bare_images_per_s": round(args.images / best_bare, 1),
            "import_images_per_s": round(args.images / best_full, 1),
            "ratio_import_over_bare": round(best_bare / best_full, 2),
            "store_mib": round(store_bytes / 2**20, 1), "float16_features_mib": round(feature_bytes / 2**20, 1),
            "store_over_float16_features": round(store_bytes / feature_bytes, 3)}


def _append(format: str, part: Path, source: Path) -> None:
    """Join generated slices into one source (TSV: concatenate lines; LMDB: copy entries and merge keys)."""
    if format.endswith("tsv"):
        with open(source, "ab") as f:
            f.write(part.read_bytes())
        part.unlink()
        return
    src = lmdb.open(str(part), readonly=True, lock=False)
    dst = lmdb.open(str(source), map_size=1 << 36, subdir=True)
    with src.begin() as rtxn, dst.begin(write=True) as wtxn:
        old = wtxn.get(b"keys")
        keys = safe_load(io.BytesIO(old)) if old else []
        for key, value in rtxn.cursor():
            if key != b"keys":
                wtxn.put(key, value)
                keys.append(key)
        wtxn.put(b"keys", pickle.dumps(keys))
    src.close()
    dst.close()
    shutil.rmtree(part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--formats", nargs="+", default=["vilbert-lmdb", "butd-tsv"], choices=sorted(WRITERS))
    parser.add_argument("--float32", action="store_true", help="float32 store (no cast): the write cost alone")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes for the import (--workers)")
    parser.add_argument("--cold", action="store_true", help="evict the source from the page cache before each pass")
    parser.add_argument("--tmp", help="folder for the generated sources (default: a temporary folder)")
    args = parser.parse_args()
    results = []
    for format in args.formats:
        with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
            results.append(bench(format, args, Path(folder)))
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
