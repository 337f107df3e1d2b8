"""Generate the shapes world: seeded synthetic scenes written in the official VQA/retrieval/refer/caption formats.

Writes under --out: images/<id>.png, scenes.json (the ground truth), gt_boxes.json (for `vilbert extract --boxes
... --box-format xyxy`), gt_classes.json (colour x shape class per box, 1..18), captions/, vqa/, retrieval/ and
refshapes/. The same --seed, --images and --size give byte-identical files.

With --add-tasks, instead writes the NLVR2, SNLI-VE, GQA and Visual7W files of the world in --out
(tasks/shapes/tasks.py), leaving its other files untouched.

With --add-cls-prob STORE, instead writes the ground-truth classes of the world in --out into a feature store
extracted over its images, as one-hot `cls_prob` (the masked-region targets; a detector's class distribution
in real data).
"""

from __future__ import annotations

import argparse

from tasks.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the shapes-world folder (written, or read with --add-cls-prob)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--images", type=int, default=2000, help="number of images over all splits (default 2000)")
    parser.add_argument("--size", type=int, default=128, choices=(128, 224), help="image side in pixels")
    parser.add_argument("--add-tasks", action="store_true",
                        help="add the NLVR2 / SNLI-VE / GQA / Visual7W files to the world in --out")
    parser.add_argument("--add-cls-prob", metavar="STORE",
                        help="add one-hot ground-truth classes to this feature store instead of generating")


def run(args: argparse.Namespace) -> int:
    from tasks.shapes.targets import add_class_targets
    from tasks.shapes.world import write_shapes_world

    if args.add_tasks:
        from tasks.shapes.tasks import write_task_files

        counts = write_task_files(args.out)
        print(f"shapes world in {args.out}: " + ", ".join(f"{task} {n}" for task, n in counts.items()) + " items")
        return 0
    if args.add_cls_prob:
        boxes = add_class_targets(args.add_cls_prob, args.out)
        print(f"{args.add_cls_prob}: cls_prob (19 classes, one-hot) for {boxes} boxes")
        return 0
    try:
        counts = write_shapes_world(args.out, seed=args.seed, num_images=args.images, size=args.size)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    print(f"shapes world in {args.out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + " images")
    return 0
