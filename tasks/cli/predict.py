"""Predict on a new image with a fine-tuned checkpoint: answer a question, ground an expression, rank captions.

Examples:
  vilbert predict --checkpoint runs/vqa/checkpoints/step-100 --image cat.jpg --question "what color is the cat"
  vilbert predict --checkpoint CKPT --image cat.jpg --expression "the cat on the left" --out cat-boxes.png
  vilbert predict --checkpoint CKPT --image cat.jpg --captions captions.txt --json
  vilbert predict --checkpoint CKPT --image cat.jpg --question "what color is the cat" --attention maps.png
The image's regions are extracted with the detector the checkpoint's features came from (recorded in the run's
feature store), or --detector/--weights. mobilenet-v2 pools on given boxes: pass --boxes, else a whole-image +
3x3 grid is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from features.detectors import DETECTORS
from features.inputs import BOX_FORMATS
from tasks.finetuning import TASK_TOKEN_IDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--image", required=True, help="the image file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--question", help="VQA: print the top-k answers with scores")
    what.add_argument("--expression", help="referring expression: print the chosen box and the top 3")
    what.add_argument("--captions", metavar="FILE", help="retrieval: rank the captions in FILE (one per line)")
    parser.add_argument("--detector", choices=sorted(DETECTORS),
                        help="default: the detector of the checkpoint's training features")
    parser.add_argument("--weights", help="detector weight file (default: the detector's packaged weights)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a detector option, e.g. short_side=224 or max_boxes=36 (repeatable)")
    parser.add_argument("--random-detector", action="store_true",
                        help="allow a detector without trained weights (smoke runs and tests)")
    parser.add_argument("--boxes", help="given boxes: JSON list of boxes, or {image_id or \"boxes\": [...]}")
    parser.add_argument("--box-format", choices=BOX_FORMATS, help="coordinates in --boxes (required with it)")
    parser.add_argument("--tokenizer", help="local BERT tokenizer directory (default: the run's)")
    parser.add_argument("--answers", metavar="FILE", help="VQA answer list, one per line (default: config id2label)")
    parser.add_argument("--task-token", choices=sorted(TASK_TOKEN_IDS),
                        help="12-in-1 task token for models with task tokens (default: from the mode / run)")
    parser.add_argument("--top-k", type=int, default=5, help="answers to show for --question")
    parser.add_argument("--out", metavar="FILE.png", help="draw the boxes and the result on the image")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    maps = parser.add_argument_group("co-attention maps (the text: the question, expression or best caption)")
    maps.add_argument("--attention", metavar="FILE.png", help="figure: the regions each word attends to, and the "
                      "words each region attends to, in the last co-attention layer")
    maps.add_argument("--attention-json", metavar="FILE.json", help="every layer's raw attention maps")
    maps.add_argument("--words", nargs="+", metavar="WORD", help="the words to draw (default: all)")
    maps.add_argument("--head", type=int, help="one co-attention head (default: the mean of all heads)")
    maps.add_argument("--rollout", action="store_true", help="attention rollout across all layers instead")


def run(args: argparse.Namespace) -> int:
    import torch

    from features.detectors import build_detector
    from features.images import read_image
    from tasks.cli.extract import parse_options
    from tasks.data.feature_provenance import feature_mismatch
    from tasks.data.tokenization import load_tokenizer
    from tasks.errors import ConfigError
    from tasks.runners import predict

    if args.boxes and not args.box_format:
        raise ConfigError("--boxes needs --box-format xyxy or xywh (coordinates are never guessed)")
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if (args.words or args.head is not None or args.rollout) and not (args.attention or args.attention_json):
        raise ConfigError("--words, --head and --rollout shape the attention maps: add --attention FILE.png")
    if args.head is not None and args.rollout:
        raise ConfigError("--rollout averages the heads of every layer; it takes no --head")
    mode = "question" if args.question is not None else "expression" if args.expression is not None else "captions"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # everything cheap to check comes first: a bad path fails before any weights load
    info = predict.read_checkpoint(args.checkpoint)
    captions = predict.read_captions(args.captions) if mode == "captions" else None
    answers = None
    if mode == "question":
        answers = predict.read_answers(args.answers) if args.answers else info.answers()
        if answers is None:
            raise ConfigError(f"--checkpoint {args.checkpoint}: config.json has no VQA answer list (id2label); "
                              "pass --answers FILE (or convert with --answers trainval_label2ans.pkl)")
    image = read_image(args.image)
    boxes = predict.boxes_for_image(args.boxes, args.box_format, args.image) if args.boxes else None
    feature_size = info.feature_size
    name = predict.detector_name(info, args.detector, feature_size)
    mismatch = feature_mismatch(info.config.get("visual_features"), name, f"detector {name}")
    if mismatch:
        print(f"warning: {mismatch}", file=sys.stderr)
    detector = build_detector(name, weights=args.weights, **parse_options(args.option))
    predict.check_detector(detector, feature_size, args.random_detector)
    tokenizer = load_tokenizer(predict.tokenizer_directory(info, args.tokenizer))
    with _quiet_weight_loading():
        model = predict.load_model(info, mode, device)

    if boxes is None and predict.needs_given_boxes(detector):
        boxes = predict.grid_boxes(image.original_hw)
        print(f"note: {name} pools features on given boxes and --boxes was not given; using the whole image and "
              f"a {predict.GRID}x{predict.GRID} grid", file=sys.stderr)
    regions = predict.detect_regions(detector, image, boxes, device, image_id=Path(args.image).stem)
    max_text_length, max_regions = predict.text_settings(info, mode)
    inputs = predict.model_input(regions, max_regions, device)
    task = predict.token_task(info, mode, args.task_token)

    result = {"mode": mode, "image": args.image, "image_hw": list(regions.image_hw), "detector": name,
              "boxes": [[round(float(v), 2) for v in box] for box in inputs.row_boxes[1:]]}
    chosen = None
    if mode == "question":
        result["question"] = args.question
        result["answers"] = predict.answer_question(model, tokenizer, inputs, args.question, answers,
                                                    max_text_length, args.top_k, task)
    elif mode == "expression":
        top = predict.ground_expression(model, tokenizer, inputs, args.expression, max_text_length, 3, task)
        chosen = top[0]["box"]
        result.update(expression=args.expression, box=chosen, score=top[0]["score"], top=top)
    else:
        result["captions"] = predict.rank_captions(model, tokenizer, inputs, captions, max_text_length, task)
    if args.out:
        predict.draw_prediction(image, inputs.row_boxes[1:], chosen, predict.describe(result), args.out)
        result["out"] = args.out
    if args.attention or args.attention_json:
        from tasks.figures.attention import explain_prediction
        from tasks.finetuning import task_ids_for
        from tasks.retrieval import is_pretraining_model

        text = result.get("question") or result.get("expression") or result["captions"][0]["caption"]
        task_ids = None if is_pretraining_model(model) else task_ids_for(model, task, 1, device)
        result.update(explain_prediction(model, tokenizer, inputs, image, text, max_text_length, task_ids,
                                         args.words, args.head, args.rollout, args.attention, args.attention_json))

    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for line in summary_lines(result):
            print(line)
    return 0


@contextlib.contextmanager
def _quiet_weight_loading():
    """No "Loading weights" progress bar for a checkpoint that loads in a blink (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def summary_lines(result: dict) -> list[str]:
    """The one-screen text output."""
    height, width = result["image_hw"]
    lines = [f"{result['image']} ({width}x{height}), {len(result['boxes'])} regions from {result['detector']}"]
    if result["mode"] == "question":
        lines.append(f"Q: {result['question']}")
        lines += [f"  {i + 1}. {a['answer']:<24} {a['score']:.3f}" for i, a in enumerate(result["answers"])]
    elif result["mode"] == "expression":
        lines.append(f"expression: {result['expression']}")
        box = " ".join(f"{v:.1f}" for v in result["box"])
        lines.append(f"chosen box (x1 y1 x2 y2): {box}  score {result['score']:.3f}")
        for i, candidate in enumerate(result["top"]):
            whole = "  (whole image)" if candidate["row"] == 0 else ""
            lines.append(f"  {i + 1}. {' '.join(f'{v:.1f}' for v in candidate['box'])}  "
                         f"{candidate['score']:.3f}{whole}")
    else:
        lines.append("captions, best first (score, share among these captions):")
        lines += [f"  {i + 1}. {c['score']:8.3f} {c['probability']:6.1%}  {c['caption']}"
                  for i, c in enumerate(result["captions"])]
    if result.get("out"):
        lines.append(f"drawn -> {result['out']}")
    for key in ("attention", "attention_json"):
        if result.get(key):
            lines.append(f"{key.replace('_', ' ')} -> {result[key]}")
    return lines
