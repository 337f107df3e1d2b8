"""The input side alone: our training loader against vilbert-multi-task's, on the same images, in one run.

    git -C <vilbert-multi-task git dir> archive HEAD vilbert/datasets/_image_features_reader.py \\
        vilbert/datasets/vqa_dataset.py | tar -x -C /tmp/ref
    python -m venv /tmp/lmdb-venv && /tmp/lmdb-venv/bin/pip install lmdb      # the reference's reader needs it
    PYTHONPATH=.:/tmp/lmdb-venv/lib/python3.11/site-packages python bench/input_pipeline.py --reference /tmp/ref

Synthetic images at the reference's widths (2048-d features, 1,601 detector classes), written twice: as our HDF5
store (float16, as `vilbert extract` writes it) and as the reference's LMDB (a pickled dict per image, float32
features and boxes, as its released feature files hold). Two workloads at the reference's shapes:
- `pretrain`: 36 boxes per image (37 rows with the IMG token), batch 64; ours also reads each box's 1,601-class
  distribution (the masked-region targets), which the reference's VQA reader below does not;
- `vqa`: 100 boxes (101 rows), batch 128, 23-token questions and 3,129-answer soft targets on both sides.
Ours: `FeatureStore.read` as stored → `visual_input` (IMG mean) → `collate_visual`, cut to the longest item,
float16 all the way (the model casts on the device). Reference: its `ImageFeaturesH5Reader` (LMDB) and
`VQAClassificationDataset.__getitem__` (padding to `max_region_num` in float64, then float32), run from the
fetched checkout, never copied here. Both through a `torch.utils.data.DataLoader` with 0, 1 and 2 workers
(persistent, prefetch 4, pinned memory when CUDA is present), timed blocks alternating between the two.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from features.store import FeatureStore, FeatureStoreWriter
from tasks.data.regions import batch_zeros, collate_visual, visual_input
from tasks.engine.padding import MODEL_PADDED_KEYS, REGIONS, cut_to_longest

WIDTH, CLASSES, ANSWERS, TEXT = 2048, 1601, 3129, 23
WORKLOADS = {"pretrain": dict(boxes=36, batch=64, targets=True), "vqa": dict(boxes=100, batch=128, targets=False)}
PADDED = {**MODEL_PADDED_KEYS, "region_targets": (REGIONS, 0)}


def import_reference_datasets(reference_dir: Path) -> types.ModuleType:
    """REFERENCE_DIR/vilbert/datasets/vqa_dataset.py as `ref_datasets.vqa_dataset` (its package __init__, which
    imports every dataset and their tokenizers, is not run)."""
    package = types.ModuleType("ref_datasets")
    package.__path__ = [str(reference_dir / "vilbert" / "datasets")]
    sys.modules["ref_datasets"] = package
    return importlib.import_module("ref_datasets.vqa_dataset")


def write_images(folder: Path, images: int, boxes: int, seed: int = 0) -> tuple[Path, Path]:
    """The same random images as our HDF5 store and as the reference's LMDB."""
    import lmdb  # the reference's reader needs it; not a dependency of this project

    rng = np.random.default_rng(seed)
    store_path, lmdb_path = folder / f"features_{boxes}.h5", folder / f"features_{boxes}.lmdb"
    env = lmdb.open(str(lmdb_path), map_size=images * boxes * WIDTH * 4 * 2 + (1 << 26))
    keys = []
    with FeatureStoreWriter(store_path, feature_dim=WIDTH, cls_prob_dim=CLASSES,
                            extractor={"detector": "synthetic"}) as writer, env.begin(write=True) as txn:
        for i in range(images):
            features = rng.random((boxes, WIDTH), dtype=np.float32) * 4  # ReLU-like, as pooled detector features
            xy = rng.random((boxes, 2), dtype=np.float32) * 400
            wh = rng.random((boxes, 2), dtype=np.float32) * 200 + 8
            box = np.concatenate([xy, xy + wh], axis=1)
            cls_prob = rng.dirichlet(np.full(CLASSES, 0.05), boxes).astype(np.float32)
            writer.add(str(i), (600, 800), features, box, cls_prob=cls_prob)
            item = {"image_id": i, "image_h": 600, "image_w": 800, "num_boxes": boxes,
                    "boxes": box, "features": features.astype(np.float16).astype(np.float32)}  # the same values
            txn.put(str(i).encode(), pickle.dumps(item))
            keys.append(str(i).encode())
        txn.put(b"keys", pickle.dumps(keys))
    env.close()
    return store_path, lmdb_path


class OurItems(Dataset):
    """What our VQA / pretraining datasets do per item on the visual side, plus text and a soft target."""

    def __init__(self, store_path: Path, images: int, samples: int, max_regions: int, targets: bool):
        self.store, self.images, self.samples = FeatureStore(store_path), images, samples
        self.max_regions, self.targets = max_regions, targets
        rng = np.random.default_rng(1)
        self.text = torch.from_numpy(rng.integers(1000, 2000, (samples, TEXT)))
        self.lengths = rng.integers(6, 16, samples)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict:
        regions = self.store.read(str(index % self.images), float32=False,
                                  optional=("cls_prob",) if self.targets else ())
        visual = visual_input(regions, self.max_regions)
        item = {"visual": visual, "input_ids": self.text[index],
                "attention_mask": (torch.arange(TEXT) < self.lengths[index]).long()}
        if self.targets:  # the masked-region targets: each kept box's class distribution, IMG row 0
            item["region_targets"] = np.concatenate([np.zeros((1, CLASSES), regions.cls_prob.dtype),
                                                     regions.cls_prob[: visual.num_boxes]])
        else:
            target = torch.zeros(ANSWERS)
            target[index % ANSWERS] = 1.0
            item["target"] = target
        return item


def our_collate(samples: list[dict]) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("input_ids", "attention_mask")}
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    batch.update(collate_visual([s["visual"] for s in samples]))
    if "target" in samples[0]:
        batch["target"] = torch.stack([s["target"] for s in samples])
    else:
        rows = batch["region_mask"].shape[1]
        batch["region_targets"] = batch_zeros((len(samples), rows, CLASSES), torch.float16)
        targets = batch["region_targets"].numpy()
        for i, s in enumerate(samples):
            targets[i, : len(s["region_targets"])] = s["region_targets"]
    return cut_to_longest(batch, PADDED)


def reference_items(ref, lmdb_path: Path, images: int, samples: int, max_regions: int) -> Dataset:
    """The reference's VQA dataset over `samples` entries of the LMDB's images, its constructor's files skipped
    (tokenised questions and answer labels are given as its cache holds them)."""
    reader_module = importlib.import_module("ref_datasets._image_features_reader")
    dataset = ref.VQAClassificationDataset.__new__(ref.VQAClassificationDataset)
    dataset._image_features_reader = reader_module.ImageFeaturesH5Reader(str(lmdb_path))
    dataset._max_region_num, dataset._max_seq_length = max_regions, TEXT
    dataset.num_labels, dataset.split = ANSWERS, "trainval"
    rng = np.random.default_rng(1)
    dataset.entries = []
    for index in range(samples):
        length = int(rng.integers(6, 16))
        dataset.entries.append({
            "image_id": index % images, "question_id": index,
            "q_token": torch.from_numpy(rng.integers(1000, 2000, TEXT)),
            "q_input_mask": (torch.arange(TEXT) < length).long(), "q_segment_ids": torch.zeros(TEXT, dtype=torch.long),
            "answer": {"labels": torch.tensor([index % ANSWERS]), "scores": torch.tensor([1.0])},
        })
    return dataset


def batch_bytes(batch) -> int:
    values = batch.values() if isinstance(batch, dict) else batch
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def loader(dataset: Dataset, batch: int, workers: int, collate=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def timed_pass(data: DataLoader) -> tuple[float, int, int]:
    """Seconds to read one epoch, samples read, bytes of one batch."""
    start = time.perf_counter()
    count = size = 0
    for batch in data:
        values = batch.values() if isinstance(batch, dict) else batch
        count += next(v for v in values if isinstance(v, torch.Tensor)).shape[0]
        size = batch_bytes(batch)
    return time.perf_counter() - start, count, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="holds vilbert/datasets/ of vilbert-multi-task")
    parser.add_argument("--images", type=int, default=256, help="distinct images per workload")
    parser.add_argument("--samples", type=int, default=1024, help="samples per timed pass")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed passes per side")
    parser.add_argument("--workloads", default="pretrain,vqa")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = import_reference_datasets(args.reference)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.workloads.split(","):
            shape = WORKLOADS[name]
            store_path, lmdb_path = write_images(Path(folder), args.images, shape["boxes"])
            regions = shape["boxes"] + 1
            sides = {"reference": (reference_items(ref, lmdb_path, args.images, args.samples, regions), None),
                     "ours": (OurItems(store_path, args.images, args.samples, regions, shape["targets"]), our_collate)}
            for workers in (int(w) for w in args.workers.split(",")):
                loaders = {side: loader(dataset, shape["batch"], workers, collate)
                           for side, (dataset, collate) in sides.items()}
                seconds = {side: 0.0 for side in sides}
                samples = {side: 0 for side in sides}
                sizes = {}
                for side in sides:  # warm-up: workers started, files opened, page cache filled
                    timed_pass(loaders[side])
                for round_ in range(args.rounds):
                    for side in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
                        took, count, sizes[side] = timed_pass(loaders[side])
                        seconds[side] += took
                        samples[side] += count
                rates = {side: samples[side] / seconds[side] for side in sides}
                rows.append((name, regions, shape["batch"], workers, rates["reference"], rates["ours"],
                             sizes["reference"] / 2**20, sizes["ours"] / 2**20))
                print(f"{name} ({regions} rows, batch {shape['batch']}), {workers} workers: reference "
                      f"{rates['reference']:.0f} samples/s ({sizes['reference'] / 2**20:.1f} MiB/batch), ours "
                      f"{rates['ours']:.0f} ({sizes['ours'] / 2**20:.1f} MiB/batch): "
                      f"{rates['ours'] / rates['reference']:.2f}x", flush=True)
                del loaders
    print("\n| workload | rows | batch | workers | reference samples/s | ours samples/s | ours / reference "
          "| MiB per batch (reference / ours) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, regions, batch, workers, ref_rate, our_rate, ref_mib, our_mib in rows:
        print(f"| {name} | {regions} | {batch} | {workers} | {ref_rate:.0f} | {our_rate:.0f} | "
              f"**{our_rate / ref_rate:.2f}×** | {ref_mib:.1f} / {our_mib:.1f} |")


if __name__ == "__main__":
    main()
