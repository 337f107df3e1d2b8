"""Write the VCR leaderboard's submission CSV: Q→A probabilities and QA→R conditioned on each answer.

  vilbert vcr-submission --checkpoint models/vilbert-12in1 --out vcr_test.csv            # one 12-in-1 model
  vilbert vcr-submission --checkpoint runs/vcr-qa/best --rationale-checkpoint runs/vcr-qar/best --split test \\
      --out vcr_test.csv data.root=data/vcr

The Q→A task reads the split once; the QA→R task reads it four times, with answer choice 0, 1, 2 and 3 in the
context (test items have no labels). Settings come from tasks/configs/vcr-qa.yaml and vcr-qar.yaml (or --config)
plus key=value overrides, applied to both.
"""

from __future__ import annotations

import argparse
import csv
import io

from features.atomic import check_output, write_text_atomic
from tasks.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the Q→A checkpoint (a 12-in-1 one serves both)")
    parser.add_argument("--rationale-checkpoint", help="the QA→R checkpoint (default: --checkpoint)")
    parser.add_argument("--split", default="test", help="the split to answer (default test)")
    parser.add_argument("--config", help="YAML for both tasks (default: tasks/configs/vcr-qa.yaml, vcr-qar.yaml)")
    parser.add_argument("--out", required=True, help="the CSV to write")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, for both tasks")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tasks.engine.run_record import read_run_record
    from tasks.registry import build_task
    from tasks.runners.checkpoint import load_checkpoint_model
    from tasks.vcr import LEADERBOARD_COLUMNS, leaderboard_rows

    inputs = (args.checkpoint, args.rationale_checkpoint, args.config)
    check_output(args.out, inputs)
    rationale_checkpoint = args.rationale_checkpoint or args.checkpoint
    for option, path, wanted, other in (("--checkpoint", args.checkpoint, "vcr-qa", "vcr-qar"),
                                        ("--rationale-checkpoint", args.rationale_checkpoint, "vcr-qar", "vcr-qa")):
        if path is not None and read_run_record(path).get("task") == other:  # run.json says which is which
            raise ConfigError(f"{option} {path}: trained for {other}, but {option} takes the {wanted} checkpoint "
                              "(--checkpoint answers Q→A, --rationale-checkpoint QA→R)")
    overrides = [*args.overrides, "data.strict=true"]  # a leaderboard row for every item, or a one-line refusal
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def progress(name: str):
        return lambda items: tqdm(items, desc=name, leave=False)

    answer_task = build_task("vcr-qa", args.config, [*overrides, f"model.init={args.checkpoint}"])
    model = load_checkpoint_model(args.checkpoint, answer_task).to(device).eval()
    answers = answer_task.predict(model, args.split, progress("Q→A"))
    rationale_tasks = [build_task("vcr-qar", args.config, [*overrides, f"model.init={rationale_checkpoint}",
                                                          f"data.condition_on_answer={i}"]) for i in range(4)]
    model = load_checkpoint_model(rationale_checkpoint, rationale_tasks[0]).to(device).eval()
    conditioned = [task.predict(model, args.split, progress(f"QA→R given answer {i}"))
                   for i, task in enumerate(rationale_tasks)]
    rows = leaderboard_rows(answers, conditioned)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LEADERBOARD_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(args.out, text.getvalue(), inputs)
    print(f"{args.out}: {len(rows)} items, Q→A and QA→R conditioned on each of 4 answers")
    return 0
