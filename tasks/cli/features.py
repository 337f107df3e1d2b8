"""Inspect feature stores: `vilbert features info FILE [FILE ...]`."""

from __future__ import annotations

import argparse
import json
import os

from features.store import FeatureStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="images, boxes per image, dtype, extractor and datasets of a store")
    info.add_argument("files", nargs="+", help="store file(s); several are read joined, as training reads them")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
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
