"""Extract region features for images into an HDF5 feature store (resumable; shards under torchrun).

Examples:
  vilbert extract --images photos/ --out feats.h5 --detector butd-r101-c4 --weights model.pth --device cuda
  vilbert extract ... --detector butd-r101-c4 --option selection=maxnms-36    (LXMERT / airsplay 36 boxes)
  vilbert extract --images shapes.json --out gt.h5 --boxes boxes.json --box-format xyxy
  vilbert extract --images photos/ --out feats.h5 --detector vmb-x152-fpn --weights detectron_model.pth \
      --config detectron_config.yaml --device cuda     (the features of the vilbert-multi-task / 12-in-1 models)
  torchrun --nproc-per-node 4 -m tasks.cli extract --images photos/ --out feats.h5 --device cuda ...
  vilbert extract --merge feats.h5 feats.h5.rank0-of-2 feats.h5.rank1-of-2

BUTD box selection (--option selection=NAME; docs/features.md, selection rules):
  butd          Caffe generate_tsv / MILVLG: per-class NMS 0.3, max_conf >= 0.2, 10-100 boxes (default)
  fixed-K       the same with exactly K boxes (the Caffe 36-box features: fixed-36)
  vmb           vilbert-multi-task / MMF: per-class NMS 0.5, the top 100
  maxnms-K      airsplay / LXMERT (maxnms-36): class-agnostic NMS on the regressed arg-max boxes, IoU raised
                0.3 -> 0.9 until K survive; regressed boxes stored, features from the proposals
  two-stage-K   MILVLG bboxes + bbox_feats: per-class NMS 0.3 on the regressed boxes, the top K, features pooled
                again on them
"""

from __future__ import annotations

import argparse
import os

from features.detectors import DETECTORS, build_detector, detector_options
from features.errors import FeaturesError
from tasks.cli.options import BATCH_PIXELS, BOX_FORMATS, MAX_SIDE, PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", help="a folder (searched recursively), a text file of paths, or a JSON list")
    parser.add_argument("--out", help="the feature store to write (e.g. feats.h5)")
    parser.add_argument("--detector", default="mobilenet-v2", choices=sorted(DETECTORS))
    parser.add_argument("--weights", help="detector weight file (default: the detector's packaged weights)")
    parser.add_argument("--config", help="detector config file (vmb-x152-fpn: detectron_config.yaml)")
    parser.add_argument("--backend", default="native", choices=["native", "detectron2"],
                        help="build the detector natively or through detectron2 (BUTD only)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a detector option, e.g. short_side=224, max_boxes=36, selection=maxnms-36, "
                             "box_mode=regressed or pool_on=selected (repeatable)")
    parser.add_argument("--boxes", help="given boxes: JSON {image_id: [[4 numbers], ...]}")
    parser.add_argument("--box-format", choices=BOX_FORMATS, help="coordinates in --boxes (required with it)")
    parser.add_argument("--ids", help="a text file of image ids, one per line, in the order of the images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (0: in the main process)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast dtype")
    parser.add_argument("--float32", action="store_true", help="store float32 features (default float16)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE,
                        help="downscale larger images while decoding (boxes stay in original pixels)")
    parser.add_argument("--batch-pixels", type=int, default=BATCH_PIXELS,
                        help="padded input pixels per detector batch (bounds memory; 0: no limit)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--merge", nargs="+", metavar=("OUT", "SHARD"), help="merge shard stores into OUT and exit")


def run(args: argparse.Namespace) -> int:
    from features.extract import boxes_file_info, extract
    from features.inputs import list_images, load_boxes
    from features.store import merge_stores

    if args.merge:
        if len(args.merge) < 2:
            raise FeaturesError("--merge needs OUT and at least one shard")
        out = merge_stores(args.merge[1:], args.merge[0])
        print(f"merged {len(args.merge) - 1} stores into {out}")
        return 0
    if not args.images or not args.out:
        raise FeaturesError("--images and --out are required (or --merge OUT SHARD...)")
    if args.boxes and not args.box_format:
        raise FeaturesError("--boxes needs --box-format xyxy or xywh (coordinates are never guessed)")
    if args.box_format and not args.boxes:
        raise FeaturesError("--box-format is only meaningful with --boxes")
    images = list_images(args.images, args.ids)
    boxes = load_boxes(args.boxes, args.box_format) if args.boxes else None
    options = detector_options(args.option)
    if args.backend != "native":
        options["backend"] = args.backend
    if args.config:
        options["config_file"] = args.config
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if world_size > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    detector = build_detector(args.detector, weights=args.weights, **options)
    summary = extract(
        images, args.out, detector, boxes=boxes,
        boxes_info=boxes_file_info(args.boxes, args.box_format) if args.boxes else None,
        batch_size=args.batch_size, workers=args.workers, device=device, precision=args.precision,
        float32=args.float32, max_side=args.max_side, batch_pixels=args.batch_pixels or None, rank=rank, world_size=world_size,
        progress=not args.no_progress,
    )
    where = f" (rank {rank} of {world_size}, shard {summary.shard})" if world_size > 1 else ""
    print(f"extracted {args.out}{where}")
    print(f"  images written   {summary.images_written}")
    print(f"  already present  {summary.images_skipped}")
    print(f"  failed           {summary.images_failed}")
    print(f"  boxes written    {summary.boxes_written}")
    if boxes is not None:
        print(f"  boxes clipped    {summary.boxes_clipped} ({summary.boxes_degenerate} without area)")
    print(f"  time             {summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s")
    if summary.errors_file:
        print(f"  problems logged  {summary.errors_file}")
    return 0
