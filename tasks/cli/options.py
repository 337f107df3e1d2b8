"""What several commands share, import-light: argument groups, the command line's vocabulary, two output helpers.

Parsing `vilbert COMMAND --help` imports this module and the two registries (`features.detectors.DETECTORS`,
`tasks.registry.TASKS`), never torch or transformers: a command imports its library in `run`. The choice lists
below name what library modules define beside torch; tests/cli/test_options.py checks each against its source.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from features.detectors import DETECTORS
from tasks.registry import TASKS

BOX_FORMATS = ("xyxy", "xywh")  # features.inputs.BOX_FORMATS
PRECISIONS = ("bf16", "fp16", "fp32")  # features.extract.PRECISIONS
BATCH_PIXELS = 16_000_000  # features.extract.BATCH_PIXELS
MAX_SIDE = 4096  # features.images.MAX_SIDE
FEATURE_READERS = ("butd-tsv", "lxmert-tsv", "mmf-npy", "vilbert-beta-lmdb", "vilbert-lmdb", "volta-lmdb")
FEATURE_EXPORTERS = ("butd-tsv", "vilbert-lmdb")  # features.published.READERS, EXPORTERS
FEATURE_ID_RULES = ("image", "stem", "int")  # features.published.ID_RULES
CHECKPOINT_SOURCES = ("vilbert-multi-task", "vilbert_beta")  # vilbert.convert.SOURCES
TASK_TOKENS = ("flickr-grounding", "foil", "genome-qa", "gqa", "guesswhat", "guesswhat-pointing", "nlvr2",
               "refcoco", "refcoco+", "refcocog", "retrieval-coco", "retrieval-flickr30k", "snli-ve", "vcr-qa",
               "vcr-qar", "visual7w", "vqa")  # tasks.finetuning.TASK_TOKEN_IDS
ZERO_SHOT_SCORERS = ("dual", "alignment")  # tasks.ranking.zero_shot.SCORERS
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")  # DEFAULT_TEMPLATES
REPORT_TASKS = ("gqa", "nlvr2", "refcoco", "retrieval", "snli-ve", "visual7w", "vqa", "vqa-cp")  # shapes EVAL_SPLITS


def text_argument(value: str) -> str:
    """The argparse type of every free-text option (a question, an expression, a query): blank text is refused
    at the edge, as the demo refuses it, instead of being encoded as nothing."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty or blank text; give the words to use")
    return value


def task_choices() -> list[str]:
    """The tasks `finetune` and `evaluate` take: every registered task but pretraining (read when the parser is
    built, so that a task registered at run time is one)."""
    return [name for name in TASKS if name != "pretrain"]


def add_region_arguments(parser: argparse.ArgumentParser, option_flag: str = "--option") -> None:
    """How one image's regions are made (detector, weights, options, given boxes) and the tokenizer: the options
    every command that runs the model on a new image shares. The detector options land in `detector_options`;
    `option_flag` names their flag where `--option` means something else (predict-task's candidate texts)."""
    parser.add_argument("--detector", choices=sorted(DETECTORS),
                        help="default: the detector of the checkpoint's training features; for features on "
                             "shapes-world ground-truth boxes, the shapes detector when `make detector` has run")
    parser.add_argument("--weights", help="detector weight file or directory (default: the detector's packaged "
                        "weights; shapes: data/shapes/detector)")
    parser.add_argument(option_flag, action="append", default=[], metavar="KEY=VALUE", dest="detector_options",
                        help="a detector option, e.g. short_side=224 or max_boxes=36 (repeatable)")
    parser.add_argument("--random-detector", action="store_true",
                        help="allow a detector without trained weights (smoke runs and tests)")
    parser.add_argument("--boxes", help="given boxes: JSON list of boxes, or {image_id or \"boxes\": [...]}")
    parser.add_argument("--box-format", choices=BOX_FORMATS, help="coordinates in --boxes (required with it)")
    parser.add_argument("--tokenizer", help="local BERT tokenizer directory (default: the run's)")


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """No "Loading weights" progress bar for a checkpoint that loads in a blink (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
