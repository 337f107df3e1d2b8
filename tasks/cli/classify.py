"""Zero-shot classification of an image against labels: the dual encoder with prompt ensembling, or co-attention.

Examples:
  vilbert classify --checkpoint CKPT --image cat.jpg --labels cat,dog,car
  vilbert classify --checkpoint CKPT --image cat.jpg --labels cat,dog --template "a photo of a {}." \
      --template "a blurry photo of a {}."
  vilbert classify --checkpoint CKPT --image shapes.png --labels red,blue,green --scorer alignment --json
--scorer dual (default; the checkpoint needs a dual encoder, data.contrastive_weight > 0) embeds the image and every
label in every template (--template, repeatable; default: a photo / a picture / an image of a {}, a {}), a label's
embedding the mean of its templates' embeddings; the probabilities are a softmax of logit scale × cosine.
--scorer alignment scores the image and each prompt through co-attention (the alignment head of a pretraining
checkpoint, the pair head of a fine-tuned retrieval one) and averages a label's templates.
The image's regions come as in `vilbert predict`: the run's detector (or --detector), on --boxes if given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.cli.options import ZERO_SHOT_SCORERS, ZERO_SHOT_TEMPLATES, add_region_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--labels", required=True, help="comma-separated labels, e.g. cat,dog,car")
    parser.add_argument("--template", action="append", metavar="TEXT",
                        help="a prompt with {} for the label (repeatable: the scores are ensembled over them; "
                             f"default: {' | '.join(ZERO_SHOT_TEMPLATES)})")
    parser.add_argument("--scorer", choices=ZERO_SHOT_SCORERS, default="dual",
                        help="dual encoder (default) or the co-attention alignment / pair head")
    parser.add_argument("--top", type=int, help="labels to print (default: all)")
    add_region_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from features.detectors import detector_options
    from features.images import read_image
    from tasks.cli.options import quiet_weight_loading, to_stderr
    from tasks.data.regions import visual_input
    from tasks.data.tokenization import load_tokenizer
    from tasks.errors import ConfigError
    from tasks.finetuning import task_token_id
    from tasks.ranking.zero_shot import check_labels, check_templates, zero_shot_scores
    from tasks.runners import predict
    from tasks.runners.checkpoint import load_dual_model, load_model, read_checkpoint

    # everything cheap to check comes first: bad input fails before any weights load
    labels = check_labels(args.labels.split(","))
    templates = check_templates(args.template or list(ZERO_SHOT_TEMPLATES))
    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    if args.boxes and not args.box_format:
        raise ConfigError("--boxes needs --box-format xyxy or xywh (coordinates are never guessed)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = read_checkpoint(args.checkpoint)
    if args.scorer == "dual" and not info.config.get("dual_embedding_size"):
        raise ConfigError(f"--checkpoint {args.checkpoint}: its model has no dual encoder (dual_embedding_size is 0); "
                          "use --scorer alignment, or train with data.contrastive_weight > 0")
    tokenizer_dir = predict.checkpoint_tokenizer(info, args.tokenizer)
    task = predict.checkpoint_task(info, predict.choose_task(info, "captions"), tokenizer_dir)
    image = read_image(args.image)
    boxes = predict.boxes_for_image(args.boxes, args.box_format, args.image) if args.boxes else None
    name, detector = predict.prepare_detector(info, args.detector, args.weights, detector_options(args.detector_options),
                                              args.random_detector, warn=to_stderr, boxes_given=boxes is not None)
    with quiet_weight_loading():
        model = load_dual_model(args.checkpoint, device)[0] if args.scorer == "dual" else load_model(info, device, task)

    regions = predict.image_regions(detector, name, image, boxes, device, Path(args.image).stem, note=to_stderr)
    visual = visual_input(regions, task.max_regions)
    tokenizer = load_tokenizer(tokenizer_dir, lowercase=bool((info.run_config.get("data") or {}).get("lowercase", True)))
    token = info.task_token or "retrieval-flickr30k"
    scores = zero_shot_scores(model, tokenizer, [visual], labels, templates, task.config.data.max_text_length,
                              args.scorer, task_token_id(model, token))[0]  # [L]
    probabilities = torch.softmax(scores, 0) if args.scorer == "dual" else None
    order = torch.argsort(scores, descending=True, stable=True).tolist()[: args.top]
    ranked = [{"label": labels[i], "score": round(float(scores[i]), 6),
               **({"probability": round(float(probabilities[i]), 6)} if probabilities is not None else {})}
              for i in order]
    result = {"image": args.image, "image_hw": list(regions.image_hw), "detector": name,
              "regions": visual.num_boxes, "scorer": args.scorer, "templates": templates, "labels": ranked}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    height, width = result["image_hw"]
    what = "dual encoder: logit scale x cosine" if args.scorer == "dual" else "co-attention pair score"
    print(f"{args.image} ({width}x{height}), {visual.num_boxes} regions from {name}; {what}, "
          f"ensembled over {len(templates)} template(s)")
    for rank, entry in enumerate(ranked, 1):
        probability = f"  p {entry['probability']:.3f}" if "probability" in entry else ""
        print(f"  {rank:>2}. {entry['label']:<20} {entry['score']:9.4f}{probability}")
    return 0
