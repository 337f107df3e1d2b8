"""Serve a local web demo: choose a task, give its image(s) and text, see the answer, the boxes and the co-attention.

Examples:
  vilbert serve --checkpoint runs/multi_embedded/checkpoints/step-00000700 --examples data/shapes/world
  vilbert serve --checkpoint CKPT_VQA --checkpoint CKPT_REFCOCO --port 8000
Every task each checkpoint answers is offered (a multi-task checkpoint: all its members); several checkpoints add
up, but two offering the same task are refused. Binds 127.0.0.1 unless --host says otherwise. Needs the serve
extra: pip install 'vilbert[serve]'.
Each prediction request is admitted within budgets (body bytes, image pixels, two at a time, a stalled upload
times out; tasks/runners/admission.py); SIGTERM stops the server within seconds.
"""

from __future__ import annotations

import argparse

from features.detectors import DETECTORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True, metavar="DIR",
                        help="a checkpoint directory to serve (repeatable: each adds its tasks; no task twice)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--examples", metavar="WORLD", help="a shapes world directory: offer its test images, "
                        "with their ground-truth boxes")
    parser.add_argument("--detector", choices=sorted(DETECTORS),
                        help="default: the detector of each checkpoint's training features")
    parser.add_argument("--random-detector", action="store_true",
                        help="allow a detector without trained weights (smoke runs and tests)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (default 10)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from tasks.errors import ConfigError

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"vilbert serve needs the serve extra ({error.name} is missing): "
                          "pip install 'vilbert[serve]'") from error
    from tasks.cli.options import quiet_weight_loading
    from tasks.runners.admission import AdmissionLimits, serve
    from tasks.runners.serve import Demo, create_app, load_examples
    from tasks.runners.serving import load_all

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    examples = load_examples(args.examples) if args.examples else None
    with quiet_weight_loading():
        served = load_all(args.checkpoint, device, args.detector, args.random_detector)
    upload_bytes = int(args.max_upload_mb * 1024 * 1024)
    limits = AdmissionLimits.for_uploads(upload_bytes)
    demo = Demo(served, device, examples, max_upload_bytes=upload_bytes, max_pixels=limits.max_pixels)
    for task in served:
        print(f"  {task.name:<20} {task.checkpoint}")
    print(f"serving on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    serve(create_app(demo), args.host, args.port, limits)
    return 0
