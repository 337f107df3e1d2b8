"""Training curves as a picture: every metric a run logged in `metrics.jsonl`, against steps.

One panel per logged quantity: the training loss and its parts, every evaluation metric, the learning rate and
samples/s; training records as lines, evaluations as dots (a run that evaluates once shows one dot). Several runs
overlay in the same panels, one colour each. Beside the curves, from each run's last evaluation (or the held-out
evaluations a report ran): VQA accuracy by question type as bars, and retrieval recall@K against K.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import DataError
from tasks.figures.matplotlib_files import pyplot, save_png

SKIPPED = ("step", "epoch", "kind")
COUNTS = re.compile(r"num_\w+$")  # sizes of the evaluated split, not metrics
QUESTION_TYPE = "question_type/"
PRIOR_QUESTION_TYPE = "prior_question_type/"
PER_TYPE = (QUESTION_TYPE, PRIOR_QUESTION_TYPE, "prior_accuracy/")  # drawn as bars (or not at all), not curves
RECALL = re.compile(r"^(?P<family>(?:\w+_)?r)(?P<k>\d+)$")  # r1 r5 r10, i2t_r1 ..., retrieval_r1 ...


@dataclass
class RunLog:
    """One run's `metrics.jsonl`, split into training and evaluation records."""

    name: str
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)

    def series(self, kind: str) -> dict[str, tuple[list[int], list[float]]]:
        """metric -> (steps, values) for the `kind` ("train" or "eval") records, plotted metrics only."""
        found: dict[str, tuple[list[int], list[float]]] = {}
        for record in self.train if kind == "train" else self.eval:
            for key, value in record.items():
                if key in SKIPPED or COUNTS.search(key) or key.startswith(PER_TYPE):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    steps, values = found.setdefault(key, ([], []))
                    steps.append(int(record["step"]))
                    values.append(float(value))
        return found


def read_run(run_dir: str | os.PathLike, name: str | None = None) -> RunLog:
    """Read `run_dir/metrics.jsonl`; a clear DataError when it is missing, unreadable or empty."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read the run's metrics log ({error.strerror or error})") from error
    log = RunLog(name or Path(run_dir).name)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DataError(f"{path}:{number}: not a JSON line ({error})") from error
        if not isinstance(record, dict) or "step" not in record:
            raise DataError(f"{path}:{number}: a record without a step")
        (log.eval if record.get("kind") == "eval" else log.train).append(record)
    if not log.train and not log.eval:
        raise DataError(f"{path}: no records; the run has not logged yet")
    return log


def question_type_accuracy(metrics: dict, prefix: str = QUESTION_TYPE) -> dict[str, float]:
    """{question type: accuracy %} from an evaluation's `question_type/...` entries (`prefix`
    "prior_question_type/": the question-only prior's)."""
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def recall_curves(metrics: dict) -> dict[str, tuple[list[int], list[float]]]:
    """{family ("r" = caption->image, "i2t_r", "retrieval_r"): (K values, recall %)} from an evaluation."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for key, value in metrics.items():
        match = RECALL.match(key)
        if match:
            curves.setdefault(match["family"], []).append((int(match["k"]), float(value)))
    return {family: ([k for k, _ in sorted(p)], [v for _, v in sorted(p)]) for family, p in curves.items()}


RECALL_LABELS = {"r": "caption -> image", "i2t_r": "image -> caption", "retrieval_r": "zero-shot caption -> image"}


def plot_runs(runs: list[RunLog], out: str | os.PathLike, evaluations: dict[str, dict] | None = None) -> Path:
    """Write `curves_figure` as a PNG, atomically."""
    return save_png(curves_figure(runs, evaluations), out)


def curves_figure(runs: list[RunLog], evaluations: dict[str, dict] | None = None, columns: int = 4):
    """The curves of `runs` (overlaid) and the bar / recall panels as one matplotlib figure.

    `evaluations` ({label: metrics}) feeds the bar and recall panels; without it they come from each run's last
    logged evaluation.
    """
    plt = pyplot()
    if evaluations is None:
        evaluations = {run.name: run.eval[-1] for run in runs if run.eval}
    panels: dict[str, list[tuple[str, str, list[int], list[float]]]] = {}
    for run in runs:
        for kind in ("train", "eval"):
            for key, (steps, values) in run.series(kind).items():
                title = key if kind == "train" else f"eval: {key}"
                panels.setdefault(title, []).append((run.name, kind, steps, values))
    bars = {label: question_type_accuracy(m) for label, m in evaluations.items() if question_type_accuracy(m)}
    recalls = {label: recall_curves(m) for label, m in evaluations.items() if recall_curves(m)}
    count = len(panels) + bool(bars) + bool(recalls)
    if count == 0:
        raise DataError(f"{', '.join(r.name for r in runs)}: nothing numeric to plot in the metrics log")

    cols = min(columns, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    colours = {run.name: f"C{i}" for i, run in enumerate(runs)}
    flat = iter(axes.flat)
    for title, lines in panels.items():
        ax = next(flat)
        for name, kind, steps, values in lines:
            style = {"marker": "o", "ms": 4} if kind == "eval" else {"lw": 1.2}
            ax.plot(steps, values, color=colours[name], label=name, **style)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if title == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if bars:
        ax = next(flat)
        types = sorted({t for accuracies in bars.values() for t in accuracies})
        width = 0.8 / len(bars)
        for i, (label, accuracies) in enumerate(bars.items()):
            ax.barh([j + i * width for j in range(len(types))], [accuracies.get(t, 0.0) for t in types],
                    height=width, label=label)
            prior = question_type_accuracy(evaluations[label], PRIOR_QUESTION_TYPE)
            if prior:  # the question-only prior's accuracy on the same questions, a black tick on each bar
                ax.scatter([prior.get(t, float("nan")) for t in types], [j + i * width for j in range(len(types))],
                           marker="|", s=80, color="black", label="question-type prior" if i == 0 else None)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(types))], types, fontsize=7)
        ax.set_xlabel("VQA accuracy %", fontsize=8)
        ax.set_title("accuracy by question type", fontsize=9)
        ax.legend(fontsize=7)
    if recalls:
        ax = next(flat)
        for i, (label, curves) in enumerate(recalls.items()):
            for style, (family, (ks, values)) in zip(("-", "--", ":"), sorted(curves.items()), strict=False):
                ax.plot(ks, values, style, marker="o", color=f"C{i}",
                        label=f"{label}: {RECALL_LABELS.get(family, family)}")
        ax.set_xlabel("K", fontsize=8)
        ax.set_ylabel("recall@K %", fontsize=8)
        ax.set_title("retrieval recall@K", fontsize=9)
        ax.legend(fontsize=6)
    if len(runs) > 1:
        handles = [plt.Line2D([], [], color=colours[r.name], label=r.name) for r in runs]
        fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(" vs ".join(r.name for r in runs), fontsize=10)
    fig.tight_layout()
    return fig
