"""The debiasing table of docs/results.md, from the `report.json` of `make finetune TASK=vqa` runs.

    python bench/debias_table.py [--runs runs] [--modes none rubi lmh] [--seeds 0 1] [--start pretrained|text-only]
                                 [--grounding W ...] [--pretrain embedded grounded]

Reads, per debias mode and seed, the report rows `make finetune TASK=vqa DEBIAS=MODE SEED=N` wrote
(runs/vqa_embedded[_MODE]_seedN/report.json: held-out test and compositional; runs/vqa-cp_embedded[_MODE]_seedN/
report.json: the changing-priors split); with `--grounding W ...`, those of `make finetune ... GROUNDING=W` for
each W (runs/vqa_embedded[_MODE]_groundingW_seedN), a column per mode and weight; with `--pretrain embedded
grounded`, those of `make finetune ...` and `make finetune ... PRETRAIN=grounded` (runs/vqa_embedded_grounded[_MODE]
...), a column per pretraining. It prints a markdown table: each split's VQA accuracy and how often the model answers
the question-type prior's answer, as the mean over seeds with each seed in brackets, beside the prior's own accuracy.
`--start text-only` reads the text-only runs the same reports compared against (`make finetune` without TEXT_ONLY=0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (the task whose report holds the split, the split's label in that report)
SPLITS = (("vqa", "held-out test"), ("vqa", "compositional"), ("vqa-cp", "changing priors"))


class TableError(Exception):
    """A run's report is missing or unreadable: one line naming the file."""


def report_path(runs: Path, task: str, mode: str, seed: int, grounding: str | None = None,
                pretrain: str = "embedded") -> Path:
    """Where `make finetune TASK=vqa DEBIAS=mode SEED=seed [GROUNDING=grounding] [PRETRAIN=pretrain]` writes the
    task's report rows (Makefile RUN_SUFFIX)."""
    suffix = (("_grounded" if pretrain == "grounded" else "") + ("" if mode == "none" else f"_{mode}")
              + ("" if grounding is None else f"_grounding{grounding}"))
    return runs / f"{task}_embedded{suffix}_seed{seed}" / "report.json"


def read_rows(path: Path, start: str, mode: str, seed: int, grounding: str | None = None,
              pretrain: str = "embedded") -> dict[str, dict]:
    """{split label: report row} of the run (`start` pretrained) or of the text-only run it was compared with."""
    given = ("" if grounding is None else f" GROUNDING={grounding}") + (
        "" if pretrain == "embedded" else f" PRETRAIN={pretrain}")
    make = f"make finetune TASK=vqa DEBIAS={mode}{given} SEED={seed}" + (" TEXT_ONLY=0" if start == "pretrained" else "")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise TableError(f"{path}: no such report; run `{make}`") from None
    except (OSError, ValueError) as error:
        raise TableError(f"{path}: not a readable report ({error})") from None
    if start == "text-only":
        record = record.get("compare") if isinstance(record, dict) else None
        if record is None:
            raise TableError(f"{path}: the report has no text-only run beside it; run `{make}`")
    try:
        rows = {row["split"]: row for row in record["rows"]}
        numbers = [[row["value"], row["chance"], row["metrics"]["prior_agreement"]] for row in rows.values()]
        if not all(isinstance(x, (int, float)) for found in numbers for x in found):
            raise TypeError("not a number")
        if not all(isinstance(row["metric"], str) for row in rows.values()):
            raise TypeError("no metric name")
    except (KeyError, TypeError, ValueError):
        raise TableError(f"{path}: not a VQA `vilbert report --json` file (rows need split, metric, value, chance "
                         "and metrics.prior_agreement)") from None
    return rows


def weight(text: str) -> str:
    """A GROUNDING=W value as make got it (it names the run directories): a number >= 0, kept as written."""
    try:
        if float(text) >= 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--grounding: {text!r} is not a number >= 0")


def cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f} %"
    return f"{mean:.1f} % ({' / '.join(f'{v:.1f}' for v in values)})"


def table(runs: Path, modes: list[str], seeds: list[int], start: str, grounding: list[str] | None = None,
          pretrains: list[str] | None = None) -> list[str]:
    columns = [(mode, weight, pretrain) for pretrain in (pretrains or ["embedded"]) for mode in modes
               for weight in (grounding or [None])]
    rows = {((mode, weight, pretrain), seed, task):
            read_rows(report_path(runs, task, mode, seed, weight, pretrain), start, mode, seed, weight, pretrain)
            for mode, weight, pretrain in columns for seed in seeds
            for task in dict.fromkeys(task for task, _ in SPLITS)}
    seed_text = ", ".join(str(s) for s in seeds)
    labels = [", ".join([*([] if pretrains is None else [f"PRETRAIN={pretrain}"]), mode,
                         *([] if weight is None else [f"grounding {weight}"])]) for mode, weight, pretrain in columns]
    lines = [f"| {start} start, seed{'s' if len(seeds) > 1 else ''} {seed_text}: mean (each seed) | "
             + " | ".join(labels) + " | question-type prior |",
             "|---" * (len(columns) + 2) + "|"]
    for task, split in SPLITS:
        found = {key: task_rows[split] for key, task_rows in rows.items() if key[2] == task and split in task_rows}
        if len(found) < len(columns) * len(seeds):
            missing = next(report_path(runs, task, c[0], s, c[1], c[2]) for c in columns for s in seeds
                           if (c, s, task) not in found)
            raise TableError(f"{missing}: has no '{split}' row")
        priors = sorted({round(row["chance"], 6) for row in found.values()})
        prior = f"{priors[0]:.1f} %" if len(priors) == 1 else " / ".join(f"{p:.1f}" for p in priors) + " %"
        metric = next(iter(found.values()))["metric"]
        accuracy = [cell([found[column, seed, task]["value"] for seed in seeds]) for column in columns]
        agreement = [cell([found[column, seed, task]["metrics"]["prior_agreement"] for seed in seeds])
                     for column in columns]
        lines.append(f"| {split}: {metric} | " + " | ".join(accuracy) + f" | {prior} |")
        lines.append(f"| {split}: answer = the prior's | " + " | ".join(agreement) + " | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="the folder holding the run directories")
    parser.add_argument("--modes", nargs="+", default=["none", "rubi", "lmh"], choices=["none", "rubi", "lmh"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--start", choices=["pretrained", "text-only"], default="pretrained")
    parser.add_argument("--grounding", nargs="+", metavar="W", type=weight,
                        help="the GROUNDING=W of the runs, as given to make (default: runs made without it)")
    parser.add_argument("--pretrain", nargs="+", choices=["embedded", "grounded"],
                        help="the PRETRAIN= of the runs, a column each (default: runs made without it)")
    args = parser.parse_args(argv)
    try:
        lines = table(Path(args.runs), args.modes, args.seeds, args.start, args.grounding, args.pretrain)
    except TableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
