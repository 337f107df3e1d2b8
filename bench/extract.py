"""Benchmark feature extraction (images/s) and feature-store reads (images/s) on generated data.

    python bench/extract.py                              # both, CPU defaults
    python bench/extract.py --only extract --device cuda --batch-size 64 --workers 8 --precision bf16
    python bench/extract.py --only store --store-images 2000
    python bench/extract.py --only extract --detector vmb-x152-fpn --option preset=tiny --batch-size 8
    python bench/extract.py --only extract --detector vmb-x152-fpn --weights detectron_model.pth --device cuda \
        --precision bf16 --batch-size 8 --workers 8 --size 640

Extraction: solid-background PNGs with a few boxes each, through `features.extract.extract` (decode in workers,
detector, HDF5 writes), timed end to end excluding image generation, beside the detector's forward alone on the
first batch (decoded and padded beforehand) in the same run. Store reads: a synthetic store of `--store-images`
images x 36 boxes x 2048-d float16, read in random order one image at a time, then through a DataLoader (0 and 2
workers) with batches of 64 padded to [64, 36, 2048].
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.detector import pad_batch  # noqa: E402
from features.detectors import (
    build_detector,  # noqa: E402
    detector_options,  # noqa: E402
)
from features.extract import PRECISIONS, extract  # noqa: E402
from features.images import read_image  # noqa: E402
from features.inputs import list_images  # noqa: E402
from features.store import FeatureStore, FeatureStoreWriter  # noqa: E402


def bench_extract(args, folder: Path) -> dict:
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    boxes = {}
    for i in range(args.images):
        pixels = np.full((args.size, args.size, 3), rng.integers(150, 250, 3), np.uint8)
        corners = rng.uniform(0, args.size * 0.6, (args.boxes_per_image, 2))
        sides = rng.uniform(args.size * 0.1, args.size * 0.4, (args.boxes_per_image, 2))
        given = np.concatenate([corners, corners + sides], axis=1).round()
        for x1, y1, x2, y2 in given.astype(int):
            pixels[y1:y2, x1:x2] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(images / f"{i:05d}.png")
        boxes[f"{i:05d}"] = given.astype(np.float32)
    options = detector_options(args.option)
    if args.random_weights:
        options["random_init"] = True
    detector = build_detector(args.detector, weights=args.weights, **options)
    given = boxes if args.detector == "mobilenet-v2" else None
    extract(list_images(images)[: args.batch_size], folder / "warmup.h5", detector, boxes=given,
            batch_size=args.batch_size, workers=0, device=args.device, precision=args.precision, progress=False)
    summary = extract(list_images(images), folder / "feats.h5", detector, boxes=given, batch_size=args.batch_size,
                      workers=args.workers, device=args.device, precision=args.precision, progress=False)
    forward = bench_forward(detector, list_images(images)[: args.batch_size], given, args)
    pipeline = summary.images_per_second
    return {"detector": args.detector, "options": options, "images": summary.images_written, "size": args.size,
            "boxes_per_image": args.boxes_per_image, "batch_size": args.batch_size, "workers": args.workers,
            "device": args.device, "precision": args.precision, "seconds": round(summary.seconds, 2),
            "images_per_s": round(pipeline, 2), "forward_images_per_s": round(forward, 2),
            "pipeline_over_forward": round(pipeline / forward, 2)}


def bench_forward(detector, images, boxes, args) -> float:
    """images/s of the detector's forward alone (network and box selection on the device) on one batch, decoded,
    prepared and padded beforehand: what the pipeline would reach if decoding and writing cost nothing."""
    prepared = [detector.prepare(read_image(im.path).pixels) for im in images]
    pixels = pad_batch(prepared, getattr(detector, "size_divisible", 1)).to(args.device)
    given = [torch.from_numpy(boxes[im.image_id]).to(args.device) for im in images] if boxes else None
    dtype = PRECISIONS[args.precision]
    autocast = torch.autocast(torch.device(args.device).type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        detector(pixels, prepared, given)  # warm-up
        _synchronize(args.device)
        started = time.perf_counter()
        for _ in range(args.forward_repeats):
            detector(pixels, prepared, given)
        _synchronize(args.device)
    return len(images) * args.forward_repeats / (time.perf_counter() - started)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _Batches(torch.utils.data.Dataset):
    """Reads a whole batch per item (a list of ids) and pads it: [B, R, D] features and a [B, R] mask."""

    def __init__(self, store: FeatureStore, batches: list[list[str]], max_regions: int):
        self.store, self.batches, self.max_regions = store, batches, max_regions

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        ids = self.batches[i]
        features = torch.zeros(len(ids), self.max_regions, self.store.feature_dim)
        mask = torch.zeros(len(ids), self.max_regions, dtype=torch.bool)
        for j, image_id in enumerate(ids):
            regions = self.store.read(image_id)
            k = min(len(regions), self.max_regions)
            features[j, :k] = torch.from_numpy(regions.features[:k])
            mask[j, :k] = True
        return features, mask


def bench_store(args, folder: Path) -> dict:
    rng = np.random.default_rng(0)
    path, boxes, dim = folder / "store.h5", 36, 2048
    started = time.perf_counter()
    with FeatureStoreWriter(path, feature_dim=dim, extractor={"detector": "synthetic"}) as writer:
        for i in range(args.store_images):
            features = np.maximum(rng.standard_normal((boxes, dim), dtype=np.float32), 0)
            writer.add(f"{i:06d}", (480, 640), features, rng.uniform(0, 400, (boxes, 4)))
    write_s = time.perf_counter() - started
    store = FeatureStore(path)
    order = list(rng.permutation(store.ids))
    store.read(order[0])
    started = time.perf_counter()
    for image_id in order:
        store.read(image_id)
    random_access = len(order) / (time.perf_counter() - started)
    batches = [order[i : i + 64] for i in range(0, len(order), 64)]
    loaders = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(_Batches(store, batches, boxes), batch_size=None, shuffle=False,
                                             num_workers=workers)
        started = time.perf_counter()
        count = sum(len(features) for features, _ in loader)
        loaders[f"dataloader_{workers}_workers_images_per_s"] = round(count / (time.perf_counter() - started))
    return {"images": args.store_images, "boxes_per_image": boxes, "feature_dim": dim, "dtype": "float16",
            "file_mib": round(os.path.getsize(path) / 2**20), "write_s": round(write_s, 1),
            "random_access_images_per_s": round(random_access), **loaders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["extract", "store"])
    parser.add_argument("--detector", default="mobilenet-v2")
    parser.add_argument("--weights")
    parser.add_argument("--random-weights", action="store_true", help="mobilenet-v2 with random weights")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a detector option, as for vilbert extract (e.g. preset=tiny)")
    parser.add_argument("--forward-repeats", type=int, default=3, help="timed forwards of the first batch")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--boxes-per-image", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--store-images", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "extract"):
            print(json.dumps({"extract": bench_extract(args, Path(tmp))}))
        if args.only in (None, "store"):
            print(json.dumps({"store_reads": bench_store(args, Path(tmp))}))


if __name__ == "__main__":
    main()
