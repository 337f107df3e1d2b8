"""Caption->image retrieval at scale: co-attention, the dual encoder, and dual + co-attention re-ranking, one run.

    PYTHONPATH=. OMP_NUM_THREADS=2 python bench/retrieval_scale.py                 # 10,000 images, 1,000 captions
    PYTHONPATH=. python bench/retrieval_scale.py --images 500 --captions 50 --co-captions 1 --rerank-captions 10

A synthetic feature store (HDF5, --images images of 5 random 96-d boxes, the embedded preset's features) and
--captions random shapes-world captions are ranked by a randomly initialised embedded-preset model with a dual
encoder (timing needs no trained weights) through the same code as `vilbert evaluate --mode` (tasks.ranking.search):
- dual: the gallery is embedded once (the index; its time is reported apart and in the total), then every caption
  is embedded and ranks all images by one matrix product: measured on all captions;
- dual+rerank: the dual top K of each caption re-ranked by the co-attention pair score: measured on
  --rerank-captions captions, extrapolated to all;
- coattention: one co-attention forward per (caption, image) pair, the caption's text prefix computed once:
  measured on --co-captions captions against --co-images images, extrapolated to all pairs (printed as such).
Queries/s is captions ranked per second (all images each); the totals rank every image for every caption.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from features.store import FeatureStore, FeatureStoreWriter
from tasks.data.regions import visual_input
from tasks.data.tokenization import load_tokenizer
from tasks.ranking.search import CoattentionScorer, embed_images, embed_texts, exact_top_k
from tasks.shapes.world import COLOURS, KINDS, SIZES
from vilbert import ViLBertConfig, ViLBertForVLTasks

BOXES = 5  # the shapes world's most shapes per image; IMG + 5 = the embedded default's max_regions
MAX_REGIONS = BOXES + 1
MAX_TEXT_LENGTH = 32
TASK_ID = None  # the random-weight model has no 12-in-1 task tokens


def write_store(path: Path, images: int, feature_dim: int, seed: int = 0) -> FeatureStore:
    """`images` images of BOXES random boxes with random features (float16 on disk, as extraction writes them)."""
    rng = np.random.default_rng(seed)
    with FeatureStoreWriter(path, feature_dim=feature_dim) as writer:
        for i in range(images):
            corner = rng.uniform(0, 96, (BOXES, 2))
            boxes = np.concatenate([corner, corner + rng.uniform(8, 32, (BOXES, 2))], 1).astype(np.float32)
            writer.add(f"{i:06d}", (128, 128), rng.normal(size=(BOXES, feature_dim)).astype(np.float32), boxes)
    return FeatureStore(path)


def captions(count: int, seed: int = 0) -> list[str]:
    """Shapes-world-like captions: "a small red circle to the left of a large blue square." and the like."""
    rng = np.random.default_rng(seed)

    def shape() -> str:
        return f"a {rng.choice(SIZES)} {rng.choice(list(COLOURS))} {rng.choice(KINDS)}"

    relations = ("to the left of", "to the right of", "above", "below")
    return [f"{shape()} {rng.choice(relations)} {shape()}." for _ in range(count)]


def write_vocab(directory: Path) -> Path:
    words = sorted({w.strip(".") for c in captions(200) for w in c.split()})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--captions", type=int, default=1_000)
    parser.add_argument("--rerank-k", type=int, default=32)
    parser.add_argument("--co-captions", type=int, default=2, help="captions timed by pure co-attention")
    parser.add_argument("--co-images", type=int, default=2_048, help="images each of those captions is scored on")
    parser.add_argument("--rerank-captions", type=int, default=100, help="captions timed by dual+rerank")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs / images / texts per forward")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ViLBertForVLTasks(ViLBertConfig.from_preset("embedded", dual_embedding_size=256)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = write_store(Path(tmp) / "store.h5", args.images, model.config.v_feature_size)
        visuals = [visual_input(store.read(i), MAX_REGIONS) for i in store.ids]
        print(f"synthetic store: {args.images} images x {BOXES} boxes x {model.config.v_feature_size}-d, written and "
              f"read in {time.perf_counter() - start:.1f} s (not counted below)")
        tokenizer = load_tokenizer(write_vocab(Path(tmp) / "tok"))
    texts = captions(args.captions)
    threads = torch.get_num_threads()
    print(f"model: embedded preset, random weights, dual embedding 256; {threads} torch thread(s); "
          f"{args.captions} captions, up to {MAX_TEXT_LENGTH} tokens")

    with torch.no_grad():
        # dual encoder: the index once, then every caption against every image
        start = time.perf_counter()
        gallery = embed_images(model, visuals, args.batch_size)
        index_seconds = time.perf_counter() - start
        start = time.perf_counter()
        queries = embed_texts(model, tokenizer, texts, MAX_TEXT_LENGTH, args.batch_size, TASK_ID)
        _, top = exact_top_k(queries, gallery, args.images)  # the full ranking of every image for every caption
        dual_seconds = time.perf_counter() - start
        assert top.shape == (args.captions, args.images)

        # dual + rerank: the dual top K of a subset of the captions, re-ranked by co-attention
        subset = list(range(min(args.rerank_captions, args.captions)))
        scorer = CoattentionScorer(model, tokenizer.encode(texts, MAX_TEXT_LENGTH), visuals, TASK_ID, args.batch_size)
        start = time.perf_counter()
        query = embed_texts(model, tokenizer, [texts[c] for c in subset], MAX_TEXT_LENGTH, args.batch_size, TASK_ID)
        _, candidates = exact_top_k(query, gallery, args.rerank_k)
        for row, caption in enumerate(subset):
            scorer.caption_to_images(caption, candidates[row].tolist())
        rerank_per_query = (time.perf_counter() - start) / len(subset)

        # co-attention: a few captions against a slice of the gallery, extrapolated to every pair
        co_images = list(range(min(args.co_images, args.images)))
        start = time.perf_counter()
        for caption in range(min(args.co_captions, args.captions)):
            scorer.caption_to_images(caption, co_images)
        pair_seconds = (time.perf_counter() - start) / (min(args.co_captions, args.captions) * len(co_images))

    co_per_query = pair_seconds * args.images
    dual_per_query = dual_seconds / args.captions
    rows = [
        ("coattention", 1 / co_per_query, co_per_query * args.captions,
         f"extrapolated: {args.co_captions} caption(s) x {len(co_images)} images timed "
         f"({1 / pair_seconds:.0f} pairs/s)"),
        ("dual", 1 / dual_per_query, index_seconds + dual_seconds,
         f"measured on all; index {index_seconds:.1f} s ({args.images / index_seconds:.0f} images/s) + queries "
         f"{dual_seconds:.2f} s"),
        (f"dual+rerank K={args.rerank_k}", 1 / rerank_per_query, index_seconds + rerank_per_query * args.captions,
         f"extrapolated from {len(subset)} captions; index included"),
    ]
    print(f"\n{args.images} images x {args.captions} captions, caption->image, every image ranked for every caption")
    print(f"  {'mode':<20} {'queries/s':>11} {'vs co-attention':>16} {'total (all captions)':>21}   how")
    for name, speed, total, how in rows:
        print(f"  {name:<20} {speed:11.4g} {speed / rows[0][1]:15.0f}x {_duration(total):>21}   {how}")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()
