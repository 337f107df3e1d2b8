"""Inspect feature stores, import published feature files, export stores: `vilbert features info|import|export`.

  vilbert features info feats.h5
  vilbert features import --from vilbert-lmdb coco_trainval_resnext152_faster_rcnn_genome.lmdb --out coco.h5 \
      --ids-from int
  vilbert features import --from butd-tsv trainval_36.tsv --out coco36.h5 --limit 100 --skip-bad
  vilbert features export --to vilbert-lmdb coco.h5 --out coco.lmdb
"""

from __future__ import annotations

import argparse
import json
import os

from tasks.cli.options import FEATURE_EXPORTERS, FEATURE_ID_RULES, FEATURE_READERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="images, boxes per image, dtype, extractor and datasets of a store")
    info.add_argument("files", nargs="+", help="store file(s); several are read joined, as training reads them")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")

    imp = sub.add_parser("import", help="import a published feature file (LMDB, TSV, MMF npy) into a store")
    imp.add_argument("source", help="the LMDB folder, TSV file or npy folder")
    imp.add_argument("--from", dest="format", required=True, choices=FEATURE_READERS, help="the source's format")
    imp.add_argument("--out", required=True, help="the store to write (.h5); rerun to resume after an interruption")
    imp.add_argument("--ids-from", choices=FEATURE_ID_RULES, default="image",
                     help="store ids: the source id as written (image), its file stem (stem) or its trailing "
                          "integer (int: COCO_train2014_000000000009 -> 9)")
    imp.add_argument("--limit", type=int, help="import only the first N rows")
    imp.add_argument("--exclude-ids", metavar="FILE", help="leave out these store ids (coco_test_ids.npy, or text)")
    imp.add_argument("--skip-bad", action="store_true", help="record bad rows in <out>.errors.jsonl and go on")
    imp.add_argument("--float32", action="store_true", help="store float32 features (default float16)")
    imp.add_argument("--workers", type=int, default=1,
                     help="processes decoding rows (helps where decoding is the bottleneck: TSV base64)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")

    exp = sub.add_parser("export", help="write a store as a vilbert-multi-task LMDB or a BUTD TSV")
    exp.add_argument("files", nargs="+", help="store file(s)")
    exp.add_argument("--to", required=True, choices=FEATURE_EXPORTERS, help="the format to write")
    exp.add_argument("--out", required=True, help="the LMDB folder or TSV file to write")


def run(args: argparse.Namespace) -> int:
    from features.importing import import_features
    from features.published import EXPORTERS
    from features.store import FeatureStore
    from tasks.data.reference_files import read_image_ids

    if args.action == "import":
        exclude = read_image_ids(args.exclude_ids) if args.exclude_ids else None
        summary = import_features(args.source, args.format, args.out, ids_from=args.ids_from, limit=args.limit,
                                  skip_bad=args.skip_bad, float32=args.float32, progress=not args.no_progress,
                                  exclude=exclude, workers=args.workers)
        print(f"{summary.out}: {summary.images_written} images imported from {args.format} "
              f"({summary.images_per_second:.1f} img/s), {summary.images_resumed} already there, "
              f"{summary.images_excluded} excluded, {summary.images_bad} bad"
                  + (f" (see {summary.errors_file})" if summary.errors_file else ""))
        return 0
    if args.action == "export":
        store = FeatureStore(args.files)
        out = EXPORTERS[args.to](store, args.out)
        print(f"{out}: {len(store)} images written as {args.to}")
        return 0
    store = FeatureStore(args.files)
    summary = store.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    per_image = summary["boxes_per_image"]
    for entry in summary["files"]:
        print(f"{entry['path']}  ({os.path.getsize(entry['path']) / 2**20:.1f} MiB)")
        print(f"  features        {entry['feature_dim']}-d {entry['features_dtype']}")
        print(f"  optional        {', '.join(entry['optional']) or 'none'}")
        for key, value in entry["extractor"].items():
            print(f"  extractor.{key:<14} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    print(f"images            {summary['images']}")
    print(f"boxes             {summary['boxes']}")
    print(f"boxes per image   min {per_image['min']}  mean {per_image['mean']:.2f}  max {per_image['max']}")
    return 0
