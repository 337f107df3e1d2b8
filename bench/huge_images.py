"""Peak memory of extracting a folder of very large JPEGs, with and without the pixel budgets (issue 11 item 4).

    python bench/huge_images.py                          # 3 images of 9000 x 6000, CPU
    python bench/huge_images.py --count 2 --size 6000x4000

Each measurement runs `features.extract.extract` in a fresh process (one decode in the main process, workers 0, so
that process's peak RSS is the extraction's) and prints its peak RSS and time. "before" switches the budgets off:
the detector reports no resize (`input_scale` 1.0, so images are decoded at up to `max_side` 4096) and a batch has
no pixel limit, as the extraction worked before; "after" is the default. Two detectors: `mobilenet-v2` with
`short_side=600` (resizes anyway: the decode budget matters) and at its original size (the batch budget matters).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int, width: int, height: int) -> dict:
    """`count` large JPEGs (a gradient, so they compress like photos) and one given box per image."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    for i in range(count):
        pixels = np.empty((height, width, 3), np.uint8)
        pixels[...] = ramp[None, :, None]
        pixels[..., i % 3] = 255 - pixels[..., i % 3]
        Image.fromarray(pixels).save(folder / f"huge{i}.jpg", quality=85)
    return {f"huge{i}": [[width * 0.1, height * 0.1, width * 0.6, height * 0.7]] for i in range(count)}


def measure(images: Path, boxes: Path, mode: str, short_side: int | None, batch_size: int) -> dict:
    """Run in a child process: extract `images` and report peak RSS (MiB) and seconds."""
    import torch

    from features.detectors import build_detector
    from features.extract import extract
    from features.inputs import list_images, load_boxes

    torch.set_num_threads(1)
    detector = build_detector("mobilenet-v2", **({"short_side": short_side} if short_side else {}))
    budgets = {}
    if mode == "before":
        detector.input_scale = lambda height, width: 1.0
        budgets["batch_pixels"] = None
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = extract(list_images(images), Path(out) / "f.h5", detector, boxes=load_boxes(boxes, "xyxy"),
                          batch_size=batch_size, workers=0, progress=False, **budgets)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"mode": mode, "short_side": short_side, "images": summary.images_written, "peak_rss_mib": round(peak),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--size", default="9000x6000", help="WIDTHxHEIGHT")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", nargs=4, metavar=("IMAGES", "BOXES", "MODE", "SHORT_SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        images, boxes, mode, short_side = args.child
        print(json.dumps(measure(Path(images), Path(boxes), mode, int(short_side) or None, args.batch_size)))
        return
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        boxes = make_images(folder, args.count, width, height)
        (Path(tmp) / "boxes.json").write_text(json.dumps(boxes))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        print(f"{args.count} JPEGs of {width}x{height}, mobilenet-v2, batch {args.batch_size}, workers 0, CPU")
        print(f"{'short_side':>10} {'mode':>7} {'peak RSS MiB':>13} {'seconds':>8}")
        for short_side in (600, 0):
            for mode in ("before", "after"):
                done = subprocess.run(
                    [sys.executable, __file__, "--batch-size", str(args.batch_size), "--child", str(folder),
                     str(Path(tmp) / "boxes.json"), mode, str(short_side)],
                    capture_output=True, text=True, env=env, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{short_side or 'original':>10} {mode:>7} {result['peak_rss_mib']:>13} {result['seconds']:>8}")


if __name__ == "__main__":
    main()
