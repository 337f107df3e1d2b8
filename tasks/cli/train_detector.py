"""Train the shapes-world detector (Faster R-CNN heads on the frozen MobileNetV2 trunk) and score it on held-out scenes.

  vilbert train-detector --world data/shapes/world --out data/shapes/detector        (what `make detector` runs)
  vilbert extract --detector shapes --images photos/ --out feats.h5                  (then: no boxes file needed)

Trains on the world's train split, reports mAP@0.5 on its test split, and writes the detector directory (--out:
config.json + model.safetensors) atomically at the end. The run directory keeps the
latest training state (--run-dir, default <out>.run): rerunning a killed command resumes there and ends with the same weights.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", required=True, help="a shapes-world folder (vilbert shapes-world)")
    parser.add_argument("--out", required=True, help="the detector directory to write")
    parser.add_argument("--run-dir", help="the training run directory (default: <out>.run)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detect-short-side", type=int, default=256,
                        help="detection input: shorter image side in pixels (default 256, twice the world's)")
    parser.add_argument("--train-images", type=int, help="use only the first N training images (tests, smoke runs)")
    parser.add_argument("--held-out-images", type=int, help="score on only the first N test images")
    parser.add_argument("--mobilenet-weights", help="MobileNetV2 .pth (default: the packaged ImageNet weights)")
    parser.add_argument("--random-trunk", action="store_true", help="a random trunk (tests only)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from features.atomic import check_output
    from features.detector_training import RUN_LOCK, TrainingSettings, score_detector, train_detector
    from features.locks import OutputLock
    from features.mobilenet_rcnn import MobileNetRCNN, RCNNConfig, build_trunk, save_detector
    from tasks.errors import ConfigError
    from tasks.shapes.detector import detection_samples, world_record

    for option in ("steps", "batch_size", "detect_short_side"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    check_output(args.out, inputs=[args.world], folder=True)  # refused now, not after the training
    world = world_record(args.world)
    train = detection_samples(args.world, ("train",))[: args.train_images]
    held_out = detection_samples(args.world, ("test",))[: args.held_out_images]
    config = RCNNConfig(classes=world["classes"], world=world, detect_short_side=args.detect_short_side)
    torch.manual_seed(args.seed)  # the heads' initialisation
    detector = MobileNetRCNN(config, build_trunk(args.mobilenet_weights, random_init=args.random_trunk))
    settings = TrainingSettings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                seed=args.seed, warmup_steps=min(100, max(1, args.steps // 10)))
    run_dir = Path(args.run_dir or f"{args.out}.run")
    run_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(run_dir / RUN_LOCK, f"detector run {run_dir}"):
        trained = train_detector(detector, train, run_dir, settings, progress=not args.no_progress)
        scores = score_detector(detector, held_out)
        results = {**scores, "train_images": len(train), "steps": trained["steps"], "world": world}
        save_detector(detector, args.out, results)
    print(f"detector -> {args.out} ({len(train)} training images, {settings.steps} steps)")
    print(f"  held-out mAP@0.5  {scores['map50']:.4f} on {scores['images']} test images ({scores['boxes']} boxes)")
    print(f"  operating rule    precision {scores['precision']:.4f}, recall {scores['recall']:.4f}, "
          f"every box right in {scores['images_exact']:.1%} of images")
    return 0
