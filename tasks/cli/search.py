"""Search a dual-encoder index: images for a text, or captions for an indexed image; optional co-attention re-rank.

Examples:
  vilbert search --index index/ --text "a red circle left of a square" --top 5
  vilbert search --index index/ --text "a red circle left of a square" --rerank 32
  vilbert search --index index/ --image-id 000123 --captions captions.txt --rerank 16
The dual encoder ranks by cosine (exact torch matrix product, or --backend faiss); --rerank K re-orders its top K
by the co-attention pair score of the index's checkpoint.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from tasks.cli.options import text_argument

if TYPE_CHECKING:
    import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="directory written by vilbert index build")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", type=text_argument, help="find the images that match this text")
    query.add_argument("--image-id", help="find the captions (--captions FILE) that match this indexed image")
    parser.add_argument("--captions", metavar="FILE", help="with --image-id: candidate captions, one per line")
    parser.add_argument("--top", type=int, default=10, help="results to print")
    parser.add_argument("--rerank", type=int, metavar="K", help="re-rank the dual encoder's top K by co-attention")
    parser.add_argument("--backend", choices=("torch", "faiss"), default="torch")
    parser.add_argument("--tokenizer", help="local BERT tokenizer directory (default: the one the index recorded)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from tasks.data.annotations import open_feature_store
    from tasks.data.regions import visual_input
    from tasks.data.tokenization import load_tokenizer
    from tasks.errors import ConfigError
    from tasks.finetuning import task_token_id
    from tasks.ranking.index import check_store_identity, load_index
    from tasks.ranking.search import CoattentionScorer, embed_texts, exact_top_k
    from tasks.runners import predict
    from tasks.runners.checkpoint import load_dual_model

    if args.top < 1 or (args.rerank is not None and args.rerank < 1):
        raise ConfigError("--top and --rerank must be >= 1")
    if args.image_id is not None and not args.captions:
        raise ConfigError("--image-id needs --captions FILE (the candidate captions)")
    index = load_index(args.index)
    settings = index.settings
    captions = predict.read_captions(args.captions) if args.image_id is not None else None
    if args.image_id is not None and args.image_id not in index.ids:
        raise ConfigError(f"--image-id {args.image_id}: not in the index {args.index}")
    directory = args.tokenizer or settings.get("tokenizer")
    if not directory:
        raise ConfigError(f"--index {args.index}: no tokenizer recorded; pass --tokenizer DIR")
    tokenizer = load_tokenizer(directory)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_dual_model(settings["checkpoint"], device)
    store = open_feature_store(settings["features"], "features of the index")
    if args.rerank:
        check_store_identity(index, settings["features"])
    max_length, task_id = settings["max_text_length"], task_token_id(model, settings["task_token"])
    wanted = max(args.top, args.rerank or 0)

    if args.text is not None:
        query = embed_texts(model, tokenizer, [args.text], max_length, task_id=task_id).cpu()
        dual, rows = index.search(query, wanted, args.backend)
        names = [index.ids[r] for r in rows[0].tolist()]
        results = [{"image_id": n, "dual_score": s} for n, s in zip(names, dual[0].tolist(), strict=True)]
        if args.rerank:
            visuals = [visual_input(store.read(n), settings["max_regions"]) for n in names[: args.rerank]]
            scorer = CoattentionScorer(model, tokenizer.encode([args.text], max_length), visuals, task_id)
            co = scorer.caption_to_images(0, list(range(len(visuals))))
            results = _rerank(results, co)
    else:
        image = index.embeddings[index.ids.index(args.image_id)][None]  # [1, E]
        texts = embed_texts(model, tokenizer, captions, max_length, task_id=task_id).cpu()
        dual, rows = exact_top_k(image, texts, wanted)
        results = [{"caption": captions[r], "index": r, "dual_score": s}
                   for r, s in zip(rows[0].tolist(), dual[0].tolist(), strict=True)]
        if args.rerank:
            chosen = [r["index"] for r in results[: args.rerank]]
            scorer = CoattentionScorer(model, tokenizer.encode(captions, max_length),
                                       [visual_input(store.read(args.image_id), settings["max_regions"])], task_id)
            results = _rerank(results, scorer.image_to_captions(0, chosen))
    results = results[: args.top]
    if args.json:
        print(json.dumps({"results": results}, indent=1))
    else:
        for i, r in enumerate(results):
            co = f"  co-attention {r['coattention_score']:.3f}" if "coattention_score" in r else ""
            print(f"{i + 1:>3}. {r.get('image_id', r.get('caption'))}  dual {r['dual_score']:.3f}{co}")
    return 0


def _rerank(results: list[dict], coattention: torch.Tensor) -> list[dict]:
    """The first len(coattention) results ordered by their co-attention score, then the rest as they were."""
    head = [{**r, "coattention_score": s} for r, s in zip(results, coattention.tolist(), strict=False)]
    head.sort(key=lambda r: -r["coattention_score"])
    return head + results[len(head):]
