"""Predict one example of any registered task (NLVR2, SNLI-VE, GQA, Visual7W, GuessWhat, VCR, FOIL, VQA...) on new images.

Examples:
  vilbert predict-task --task nlvr2 --checkpoint CKPT --image left.png --image right.png \\
      --text "the left image has more red shapes than the right image" --out pair.png
  vilbert predict-task --task snli-ve --checkpoint CKPT --image 17.png --text "there is a red circle"
  vilbert predict-task --task visual7w --checkpoint CKPT --image 17.png --text "which is the red circle?" \\
      --boxes candidates.json --box-format xyxy --out chosen.png
  vilbert predict-task --task vcr-qa --checkpoint CKPT --image x.jpg --text "why is she smiling?" \\
      --option "she won" --option "she is sad" --option "it rains" --option "nothing"
What one example needs (a text, options, one or two images) is the task's (`Task.example_inputs`); a request
that does not fit is one line naming what is missing. The task's settings (text length, regions, tokenizer, answer
list) come from the checkpoint's run_config.yaml (a multi-task checkpoint: the member's); regions are extracted as
`vilbert predict` extracts them. Pointing tasks choose among the regions the model sees: the --boxes, else the
detector's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.cli.options import add_region_arguments, quiet_weight_loading, text_argument, to_stderr
from tasks.registry import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="the task that answers")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory holding that task's head")
    parser.add_argument("--image", action="append", required=True, help="an image (NLVR2: left, then right)")
    parser.add_argument("--text", type=text_argument, help="question, expression, statement, hypothesis or dialogue")
    parser.add_argument("--option", action="append", default=[],
                        help="a candidate text: a caption to rank, or one of VCR's 4 answers (repeatable)")
    add_region_arguments(parser, option_flag="--detector-option")
    parser.add_argument("--top-k", type=int, default=5, help="answers to show")
    parser.add_argument("--out", metavar="FILE.png", help="draw the image(s), the regions and the answer")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


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
    predict.check_output_files(out=args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # everything cheap to check comes first: a request that does not fit fails before any weights load
    info = read_checkpoint(args.checkpoint)
    task = predict.checkpoint_task(info, args.task, predict.checkpoint_tokenizer(info, args.tokenizer, args.task))
    predict.check_request(task, args.text, args.option, len(args.image))
    problem = task.prediction_problem(info.config)
    if problem:
        raise ConfigError(f"--checkpoint {args.checkpoint}: {problem}")
    images = [read_image(path) for path in args.image]
    boxes = [predict.boxes_for_image(args.boxes, args.box_format, path) if args.boxes else None
             for path in args.image]
    name, detector = predict.prepare_detector(info, args.detector, args.weights, detector_options(args.detector_options),
                                              args.random_detector, warn=to_stderr,
                                              boxes_given=args.boxes is not None)
    with quiet_weight_loading():
        model = load_model(info, device, task)

    example, answer = predict.predict_example(
        task, model, detector, name, images, boxes, [Path(path).stem for path in args.image], device,
        note=to_stderr, text=args.text or "", candidates=args.option, options={"top_k": args.top_k})
    result = {"task": task.name, "images": args.image, "detector": name,
              "boxes": [[[round(float(v), 2) for v in box] for box in image.boxes] for image in example.images],
              **answer}
    if args.out:
        predict.save_picture(task.draw(example, answer), args.out)
        result["out"] = args.out
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{', '.join(args.image)}: {sum(len(image.boxes) for image in example.images)} regions from {name}, "
              f"task {task.name}")
        for line in task.summary_lines(answer):
            print(line)
        if args.out:
            print(f"drawn -> {args.out}")
    return 0
