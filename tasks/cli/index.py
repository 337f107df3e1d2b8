"""Build a dual-encoder image index of a feature store, for `vilbert search`.

Example:
  vilbert index build --checkpoint runs/pretrain_embedded/checkpoints/step-1400 --features feats.h5 --out index/
Embeds every image of the store (in chunks of --batch-size, with a progress bar). A build that stops, killed or
not, resumes where it stopped when run again with the same arguments. --faiss also writes a FAISS index
(faiss-cpu, the `faiss` extra); exact search with a torch matrix product needs nothing more.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["build"])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory whose model has a dual encoder")
    parser.add_argument("--features", required=True, nargs="+", help="feature store file(s) (HDF5)")
    parser.add_argument("--out", required=True, help="index directory")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward and per chunk file")
    parser.add_argument("--max-regions", type=int, help="IMG + boxes per image (default: the checkpoint run's)")
    parser.add_argument("--faiss", action="store_true", help="also write a FAISS inner-product index")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tasks.data.annotations import open_feature_store
    from tasks.errors import ConfigError
    from tasks.finetuning import FinetuneTask
    from tasks.ranking.index import build_index
    from tasks.runners import predict
    from tasks.runners.checkpoint import load_dual_model

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_dual_model(args.checkpoint, device)
    store = open_feature_store(args.features, "--features")
    try:
        tokenizer = predict.checkpoint_tokenizer(info)
    except ConfigError:
        tokenizer = None  # vilbert search then needs --tokenizer
    task = predict.checkpoint_task(info, predict.choose_task(info, "captions"), tokenizer or "")
    max_text_length, max_regions = task.config.data.max_text_length, task.max_regions
    settings = {"checkpoint": str(Path(args.checkpoint).resolve()),
                "features": [str(Path(p).resolve()) for p in args.features],
                "tokenizer": tokenizer, "max_text_length": max_text_length,
                "task_token": info.task_token or (task.task_token if isinstance(task, FinetuneTask)
                                                    else "retrieval-flickr30k")}  # a pretraining run
    regions = max_regions if args.max_regions is None else args.max_regions  # 0 is refused, not the default
    out = build_index(model, store, args.out, settings, regions, args.batch_size,
                      args.faiss, progress=lambda items: tqdm(items, desc="index", unit="chunk"))
    print(f"{len(store.ids)} images -> {out}")
    return 0
