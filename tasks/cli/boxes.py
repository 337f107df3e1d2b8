"""Write the given-boxes file `vilbert extract --boxes` reads from COCO / refer annotations or MAttNet detections.

  vilbert boxes --coco refcoco+/instances.json --out gt_boxes.json                   # ground-truth boxes
  vilbert boxes --coco refcoco+/instances.json --detections dets.json --out det_boxes.json   # MAttNet boxes
  vilbert extract --images train2014/ --boxes gt_boxes.json --box-format xyxy --out refcoco+_gt.h5 ...

Boxes are written x1 y1 x2 y2 in original pixels (pass --box-format xyxy to extract); image ids are the image
files' stems, the ids `vilbert extract` gives images from a folder (--ids-from int: the COCO number).
"""

from __future__ import annotations

import argparse
import math

from features.atomic import check_output, write_json_atomic
from tasks.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coco", required=True, help="COCO or refer instances.json (images and annotations)")
    parser.add_argument("--detections", help="MAttNet detections JSON: use these boxes instead of the annotations")
    parser.add_argument("--min-score", type=float, default=0.0, help="with --detections: drop boxes scoring below")
    parser.add_argument("--ids-from", choices=("stem", "int"), default="stem",
                        help="image ids: file stem (COCO_train2014_000000000009) or the COCO number (9)")
    parser.add_argument("--out", required=True, help="the boxes JSON to write")


def run(args: argparse.Namespace) -> int:
    from tasks.data.reference_files import coco_boxes, coco_image_names, mattnet_boxes

    inputs = (args.coco, args.detections)
    check_output(args.out, inputs)
    if not math.isfinite(args.min_score):
        raise ConfigError(f"--min-score {args.min_score}: not a finite number")
    if args.detections:
        boxes = mattnet_boxes(args.detections, coco_image_names(args.coco, args.ids_from), args.min_score)
    else:
        boxes = coco_boxes(args.coco, args.ids_from)
    write_json_atomic(args.out, boxes, inputs)
    count = sum(len(b) for b in boxes.values())
    print(f"{args.out}: {count} boxes on {len(boxes)} images (x1 y1 x2 y2; extract with --box-format xyxy)")
    return 0
