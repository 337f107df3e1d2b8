"""Predict one example of a 12-in-1 task (NLVR2, SNLI-VE, GQA, Visual7W, GuessWhat, VCR, FOIL...) on new images.

Examples:
  vilbert predict-task --task nlvr2 --checkpoint CKPT --image left.png --image right.png \\
      --text "the left image has more red shapes than the right image" --out pair.png
  vilbert predict-task --task snli-ve --checkpoint CKPT --image 17.png --text "there is a red circle"
  vilbert predict-task --task visual7w --checkpoint CKPT --image 17.png --text "which is the red circle?" \\
      --boxes candidates.json --box-format xyxy --out chosen.png
  vilbert predict-task --task vcr-qa --checkpoint CKPT --image x.jpg --text "why is she smiling?" \\
      --option "she won" --option "she is sad" --option "it rains" --option "nothing"
The task's settings (text length, regions, tokenizer, answer list) come from the checkpoint's run_config.yaml;
regions are extracted as `vilbert predict` extracts them. Pointing tasks choose among the --boxes (their
candidates, also the boxes features are pooled on); Flickr30k grounding is `vilbert predict --expression ...
--task-token flickr-grounding`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from features.detectors import DETECTORS
from tasks.cli.options import BOX_FORMATS, text_argument

POINTING = ("visual7w", "guesswhat-pointing")
TASKS = ("gqa", "genome-qa", "nlvr2", "snli-ve", "visual7w", "guesswhat-pointing", "guesswhat", "vcr-qa", "vcr-qar",
         "foil")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--checkpoint", required=True, help="a fine-tuned checkpoint directory of that task")
    parser.add_argument("--image", action="append", required=True, help="the image (NLVR2: left, then right)")
    parser.add_argument("--text", required=True, type=text_argument, help="question, statement, hypothesis, caption or dialogue")
    parser.add_argument("--option", action="append", default=[], help="VCR: one of the 4 answers or rationales")
    parser.add_argument("--boxes", help="given boxes (JSON list or {image_id: [...]}); pointing: the candidates")
    parser.add_argument("--box-format", choices=BOX_FORMATS, help="coordinates in --boxes (required with it)")
    parser.add_argument("--detector", choices=sorted(DETECTORS), help="default: the checkpoint's training detector")
    parser.add_argument("--weights", help="detector weight file (default: the detector's packaged weights)")
    parser.add_argument("--random-detector", action="store_true", help="allow a detector without trained weights")
    parser.add_argument("--out", metavar="FILE.png", help="draw the image(s), the chosen box and the result")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from features.images import read_image
    from tasks.cli.options import to_stderr
    from tasks.errors import ConfigError
    from tasks.image_text import Sample
    from tasks.registry import build_task
    from tasks.runners import predict
    from tasks.runners.checkpoint import read_checkpoint

    if args.boxes and not args.box_format:
        raise ConfigError("--boxes needs --box-format xyxy or xywh (coordinates are never guessed)")
    if len(args.image) != (2 if args.task == "nlvr2" else 1):
        raise ConfigError(f"--image: {args.task} takes {2 if args.task == 'nlvr2' else 1} image(s), "
                          f"got {len(args.image)}")
    if args.task.startswith("vcr") and len(args.option) != 4:
        raise ConfigError(f"--option: VCR chooses among 4 options, got {len(args.option)}")
    if args.task in POINTING and not args.boxes:
        raise ConfigError(f"--boxes: {args.task} chooses among candidate boxes; give them")
    predict.check_output_files(out=args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    info = read_checkpoint(args.checkpoint)
    run_config = info.directory / "run_config.yaml"
    task = build_task(args.task, str(run_config) if run_config.is_file() else None, [f"model.init={info.directory}"])
    images = [read_image(path) for path in args.image]
    boxes = predict.boxes_for_image(args.boxes, args.box_format, args.image[0]) if args.boxes else None
    name, detector = predict.prepare_detector(info, args.detector, args.weights, allow_random=args.random_detector,
                                              warn=to_stderr, boxes_given=boxes is not None)
    regions = [predict.image_regions(detector, name, image, boxes, device, Path(path).stem, note=to_stderr)
               for image, path in zip(images, args.image, strict=True)]
    model = task.build_model().to(device)

    keys = [Path(path).stem for path in args.image]
    if args.task == "nlvr2":
        sample = Sample("predict-0-0-0", [args.text] * 2, keys)
    elif args.task.startswith("vcr"):
        sample = Sample("predict-0", [(args.text, option) for option in args.option], keys * 4)
    elif args.task in POINTING:
        candidates = [[float(v) for v in box] for box in boxes]
        sample = Sample(0, [args.text], keys, None, {"candidates": list(range(len(candidates))),
                                                     "boxes": candidates})
    else:
        sample = Sample("predict", [args.text], keys)
    result = {"task": args.task, "images": args.image, "text": args.text,
              "prediction": task.predict_sample(model, sample, regions)}
    if args.out:
        chosen = result["prediction"].get("box")
        caption = f"{args.text} -> " + ", ".join(f"{k}: {v}" for k, v in result["prediction"].items()
                                                 if k not in ("box", "scores", "probabilities"))
        draw_images(images, [r.boxes for r in regions], chosen, caption, args.out)
        result["out"] = args.out
    print(json.dumps(result, indent=1) if args.json else f"{args.task}: {json.dumps(result['prediction'])}")
    return 0


def draw_images(images: list, boxes: list, chosen: list[float] | None, caption: str, out: str) -> Path:
    """One image as `vilbert predict` draws it, or two side by side (NLVR2), the caption on top."""
    import numpy as np
    from PIL import Image

    from features.images import LoadedImage
    from tasks.figures.drawing import draw_boxes
    from tasks.runners.predict import save_picture

    if len(images) == 1:
        return save_picture(draw_boxes(images[0], boxes[0], chosen, caption), out)
    pictures = [Image.fromarray(image.pixels).resize(image.original_hw[::-1]) for image in images]
    height = max(p.height for p in pictures)
    joined = Image.new("RGB", (sum(p.width for p in pictures), height))
    shifted, x = [], 0
    for picture, image_boxes in zip(pictures, boxes, strict=True):
        joined.paste(picture, (x, 0))
        shifted.append(np.asarray(image_boxes, dtype=np.float32).reshape(-1, 4) + np.array([x, 0, x, 0]))
        x += picture.width
    pixels = np.asarray(joined)
    loaded = LoadedImage(pixels=pixels, original_hw=tuple(pixels.shape[:2]))
    return save_picture(draw_boxes(loaded, np.concatenate(shifted), None, caption), out)
