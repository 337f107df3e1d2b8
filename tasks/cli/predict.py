"""Predict on a new image with a fine-tuned checkpoint: answer a question, ground an expression, rank captions.

Examples:
  vilbert predict --checkpoint runs/vqa/checkpoints/step-100 --image cat.jpg --question "what color is the cat"
  vilbert predict --checkpoint CKPT --image cat.jpg --expression "the cat on the left" --out cat-boxes.png
  vilbert predict --checkpoint CKPT --image cat.jpg --captions captions.txt --json
  vilbert predict --checkpoint CKPT --image cat.jpg --question "what color is the cat" --attention maps.png
The task is --task, else the task the run recorded (run.json) when it answers the request, else vqa for
--question, refcoco for --expression, retrieval for --captions (a pretraining checkpoint ranks captions zero-shot).
The image's regions are extracted with the detector the run recorded (its feature stores' extractor), or
--detector/--weights. A model trained on shapes-world ground-truth boxes (mobilenet-v2 pools on given boxes) gets
its boxes from the shapes-world detector (`make detector`) unless --boxes is given; only without one is a
whole-image + 3x3 grid used, with a note.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.cli.options import (
    TASK_TOKENS,
    add_region_arguments,
    quiet_weight_loading,
    text_argument,
    to_stderr,
)
from tasks.registry import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--image", required=True, help="the image file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--question", type=text_argument, help="VQA: print the top-k answers with scores")
    what.add_argument("--expression", type=text_argument,
                      help="referring expression: print the chosen box and the top 3")
    what.add_argument("--captions", metavar="FILE", help="retrieval: rank the captions in FILE (one per line)")
    add_region_arguments(parser)
    parser.add_argument("--answers", metavar="FILE", help="VQA answer list, one per line (default: config id2label)")
    parser.add_argument("--task", choices=sorted(TASKS),
                        help="the task that answers (default: the run's task when it answers this request, else "
                             "vqa / refcoco / retrieval)")
    parser.add_argument("--task-token", choices=TASK_TOKENS,
                        help="12-in-1 task token for models with task tokens (default: the task's)")
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

    from features.detectors import detector_options
    from features.images import read_image
    from tasks.errors import ConfigError
    from tasks.runners import predict
    from tasks.runners.checkpoint import load_model, read_checkpoint

    if args.boxes and not args.box_format:
        raise ConfigError("--boxes needs --box-format xyxy or xywh (coordinates are never guessed)")
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if (args.words or args.head is not None or args.rollout) and not (args.attention or args.attention_json):
        raise ConfigError("--words, --head and --rollout shape the attention maps: add --attention FILE.png")
    if args.head is not None and args.rollout:
        raise ConfigError("--rollout averages the heads of every layer; it takes no --head")
    predict.check_output_files(out=args.out, attention=args.attention, attention_json=args.attention_json)
    mode = "question" if args.question is not None else "expression" if args.expression is not None else "captions"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # everything cheap to check comes first: a bad path fails before any weights load
    info = read_checkpoint(args.checkpoint)
    task_name = predict.choose_task(info, mode, args.task)
    task = predict.checkpoint_task(info, task_name, predict.checkpoint_tokenizer(info, args.tokenizer, task_name))
    problem = None if args.answers else task.prediction_problem(info.config)
    if problem:
        hint = "; pass --answers FILE (or convert with --answers trainval_label2ans.pkl)" if mode == "question" else ""
        raise ConfigError(f"--checkpoint {args.checkpoint}: {problem}{hint}")
    options = {"top_k": args.top_k}
    if args.answers:
        options["answers"] = predict.read_answers(args.answers)
    captions = predict.read_captions(args.captions) if mode == "captions" else ()
    image = read_image(args.image)
    boxes = predict.boxes_for_image(args.boxes, args.box_format, args.image) if args.boxes else None
    name, detector = predict.prepare_detector(info, args.detector, args.weights, detector_options(args.detector_options),
                                              args.random_detector, warn=to_stderr, boxes_given=boxes is not None)
    with quiet_weight_loading():
        model = load_model(info, device, task)

    example, answer = predict.predict_example(task, model, detector, name, [image], [boxes], [Path(args.image).stem],
                                              device, note=to_stderr, text=args.question or args.expression,
                                              candidates=captions, options=options, task_token=args.task_token)
    result = {"mode": mode, "task": task.name, "image": args.image, "image_hw": list(image.original_hw),
              "detector": name, "boxes": [[round(float(v), 2) for v in box] for box in example.boxes], **answer}
    if args.out:
        predict.save_picture(task.draw(example, answer), args.out)
        result["out"] = args.out
    if args.attention or args.attention_json:
        result.update(predict.write_attention(model, task, example, answer, words=args.words, head=args.head,
                                             rollout=args.rollout, out=args.attention, json_out=args.attention_json))

    if args.json:
        print(json.dumps(result, indent=1))
    else:
        height, width = result["image_hw"]
        print(f"{args.image} ({width}x{height}), {len(example.boxes)} regions from {name}, task {task.name}")
        for line in task.summary_lines(answer):
            print(line)
        for key, label in (("out", "drawn"), ("attention", "attention"), ("attention_json", "attention json")):
            if result.get(key):
                print(f"{label} -> {result[key]}")
    return 0
