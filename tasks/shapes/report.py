"""One-screen reports of the embedded default's runs: every metric beside its chance level.

Pretraining: the trainer's last held-out evaluation (`metrics.jsonl`) of masked-token accuracy, masked-region
accuracy, alignment accuracy and zero-shot R@1, each beside the score of the best blind guess:
- masked tokens: always the most frequent word piece of the held-out captions;
- masked regions: always the most frequent class of the held-out regions;
- alignment: 50 % (half the pairs are swapped);
- zero-shot R@1: 1 / the number of images ranked.

Fine-tuning: the run's last checkpoint is evaluated by its task on the shapes world's held-out `test` split and on
the `compositional` split (held-out colour-shape pairs), beside:
- VQA and VQA-CP: the task's `chance` (the best answer per question type from the training answers, a
  language-only prior), with the task's `report_lines` below (accuracy per answer and question type beside the
  prior's, and how often the model answers what the prior answers);
- retrieval: R@1 of a random ranking, 1 / the number of images;
- referring expressions: the expected accuracy of picking one of the image's regions at random;
- NLVR2, SNLI-VE, GQA: always the most frequent training label (a blind guess);
- Visual7W pointing: the expected accuracy of a random candidate box.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from features.store import FeatureStore
from tasks.data.captions import join_with_store, load_captions
from tasks.data.regions import visual_input
from tasks.data.tokenization import load_tokenizer
from tasks.engine.checkpoints import list_checkpoints
from tasks.engine.config import load_config
from tasks.engine.evaluation import eval_mode
from tasks.engine.task import Task
from tasks.errors import ConfigError, DataError
from tasks.metrics import recall_at_k
from tasks.pretraining import PretrainConfig
from tasks.ranking.search import RANKING_MODES, rank_both_ways
from tasks.registry import build_task, task_class
from tasks.runners.checkpoint import load_checkpoint_model
from tasks.shapes.tasks import EVAL_SPLITS
from tasks.shapes.zero_shot import shapes_zero_shot
from vilbert import ViLBertForPreTraining

logger = logging.getLogger(__name__)

@dataclass
class Row:
    name: str
    value: float  # percent
    chance: float  # percent
    metrics: dict = field(default_factory=dict)  # the whole evaluation the row came from (for the figures)
    details: list = field(default_factory=list)  # the task's report_lines: (label, value %, chance % or None)

    def line(self, width: int = 37) -> str:
        return f"  {self.name:<{width}} {self.value:6.1f} %   (chance {self.chance:5.1f} %)"


def last_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise DataError(f"{run_dir}: no finished checkpoint; train first")
    return found[-1]


def last_evaluation(run_dir: Path) -> dict[str, float]:
    """The last held-out evaluation the trainer logged in `metrics.jsonl`."""
    path = run_dir / "metrics.jsonl"
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the run's metrics log ({error})") from error
    evaluations = [r for r in records if r.get("kind") == "eval"]
    if not evaluations:
        raise DataError(f"{path}: the run logged no evaluation")
    return evaluations[-1]


# -------------------------------------------------------------------------------------------------- pretraining


def pretraining_rows(run_dir: Path) -> list[Row]:
    """Held-out pretraining metrics and their chance levels."""
    config = load_config(run_dir / "config.yaml", PretrainConfig)
    metrics = last_evaluation(run_dir)
    data = config.data
    store = FeatureStore(data.val_features)
    captions = join_with_store(load_captions(data.val_captions), store, str(data.val_captions))
    tokenizer = load_tokenizer(data.tokenizer or config.model.text_init, lowercase=data.lowercase)
    encoded = tokenizer.encode([c.text for c in captions], data.max_text_length).input_ids
    pieces = Counter(int(i) for i in encoded.reshape(-1) if int(i) not in tokenizer.special_ids)
    classes = Counter()
    for image_id in dict.fromkeys(c.image_id for c in captions):
        regions = store.read(image_id)
        if regions.cls_prob is None:
            raise DataError(f"{data.val_features}: no cls_prob; add the class targets first")
        classes.update(regions.cls_prob[: data.max_regions - 1].argmax(1).tolist())
    ranked = min(data.retrieval_images, len({c.image_id for c in captions}))
    dual = [Row(f"dual-encoder retrieval R@{k} ({ranked} images)", metrics[f"retrieval_dual_r{k}"],
                min(100.0, 100 * k / ranked)) for k in (1, 5, 10) if f"retrieval_dual_r{k}" in metrics]
    return [
        # the trainer's evaluation reports every metric in percent already
        Row("masked-token accuracy (MLM)", metrics["mlm_accuracy"], 100 * max(pieces.values()) / sum(pieces.values())),
        Row("masked-region accuracy", metrics["region_accuracy"], 100 * max(classes.values()) / sum(classes.values())),
        Row("alignment accuracy", metrics["alignment_accuracy"], 50.0),
        *(Row(f"zero-shot retrieval R@{k} ({ranked} images)", metrics[f"retrieval_r{k}"], min(100.0, 100 * k / ranked))
          for k in (1, 5, 10)),
        *dual,
    ]


# The pretraining report's retrieval splits: (label, the captions file beside data.val_captions).
PRETRAIN_SPLITS = (("held-out test", "captions_test.jsonl"), ("compositional", "captions_compositional.jsonl"))
PRETRAIN_RERANK_K = 8  # dual+rerank re-ranks the dual encoder's top 8 of the split's data.retrieval_images


def pretraining_split_lines(run_dir: str | Path, rerank_k: int = PRETRAIN_RERANK_K) -> list[str]:
    """The last checkpoint on the held-out test and compositional splits: caption->image R@1/5/10 and queries/s by
    co-attention, the dual encoder and dual+rerank (`tasks.ranking.search`), and zero-shot colour / shape
    classification of every shape of those images (`tasks.shapes.zero_shot`) by each scorer, beside chance.
    A checkpoint without a dual encoder gets the co-attention rows and says so."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml", PretrainConfig)
    data = config.data
    checkpoint = last_checkpoint(run_dir)
    model = ViLBertForPreTraining.from_pretrained(str(checkpoint)).eval()
    tokenizer = load_tokenizer(data.tokenizer or config.model.text_init, lowercase=data.lowercase)
    store = FeatureStore(data.val_features)
    dual = model.vilbert.dual is not None
    modes = RANKING_MODES if dual else ("coattention",)
    scorers = ("dual", "alignment") if dual else ("alignment",)
    header = f"  {'split':<15} {'mode':<13} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'queries/s':>10}"
    lines = [f"Caption->image retrieval and zero-shot classification on the held-out splits ({checkpoint.name}; "
             f"dual+rerank: co-attention re-ranks the dual top {rerank_k})", header]
    zero_shot = []
    for label, file_name in PRETRAIN_SPLITS:
        path = Path(data.val_captions).with_name(file_name)
        if not path.is_file():
            lines.append(f"  {label:<15} not measured: no {path}")
            continue
        captions = join_with_store(load_captions(path), store, str(path))
        image_ids = list(dict.fromkeys(c.image_id for c in captions))[: data.retrieval_images]
        position = {image_id: i for i, image_id in enumerate(image_ids)}
        kept = [c for c in captions if c.image_id in position]
        visuals = [visual_input(store.read(i), data.max_regions) for i in image_ids]
        chance = {k: min(100.0, 100 * k / len(image_ids)) for k in (1, 5, 10)}
        with torch.no_grad(), eval_mode(model):
            for mode in modes:
                ranked = rank_both_ways(model, tokenizer, [c.text for c in kept], visuals, data.max_text_length, mode,
                                        rerank_k, batch_size=max(1, data.eval_batch_size))
                recall = recall_at_k(ranked["text_to_image"], [position[c.image_id] for c in kept])
                speed = len(kept) / max(ranked["seconds"]["text_to_image"], 1e-9)
                lines.append(f"  {label:<15} {mode:<13} {recall['r1']:6.1f} {recall['r5']:6.1f} {recall['r10']:6.1f} "
                             f"{speed:10.1f}")
            lines.append(f"  {label:<15} {'chance':<13} {chance[1]:6.1f} {chance[5]:6.1f} {chance[10]:6.1f}   "
                         f"({len(image_ids)} images, {len(kept)} captions)")
            for scorer in scorers:
                result = shapes_zero_shot(model, tokenizer, store, image_ids, data.max_text_length, scorer,
                                          batch_size=max(1, data.eval_batch_size))
                shapes = int(result["shapes"])
                for what in ("colour", "shape"):
                    zero_shot.append(Row(f"{label}: {what} ({scorer}, {shapes} shapes)", result[f"{what}_accuracy"],
                                         result[f"{what}_chance"]))
    if not dual:
        lines.append("  dual, dual+rerank: not measured, the checkpoint has no dual encoder "
                     "(pretrain with data.contrastive_weight > 0)")
    lines.append("Zero-shot classification of each shape alone (chance: always the most frequent label)")
    lines += [row.line(width=45) for row in zero_shot]
    return lines


def pretraining_report(run_dir: str | Path) -> list[str]:
    """The held-out (val) metrics the trainer logged, then `pretraining_split_lines`, then the checkpoint."""
    run_dir = Path(run_dir)
    rows = pretraining_rows(run_dir)
    return (["Pretraining on the shapes world: held-out (val) metrics"] + [row.line() for row in rows]
            + pretraining_split_lines(run_dir) + [f"checkpoint {last_checkpoint(run_dir)}"])


# ---------------------------------------------------------------------------------------------------- finetuning


def _task_for(run_dir: Path, task_name: str, split_root: str | None, checkpoint: Path | None = None,
              split: str | None = None) -> Task:
    """The run's task reading `checkpoint` (its head as it is), on the split folder `split_root` when given, with
    `split` meaning the split of that name (not a training role)."""
    checkpoint = checkpoint or last_checkpoint(run_dir)
    cls = task_class(task_name)
    overrides = [f"model.init={checkpoint}", *cls.checkpoint_overrides,
                 *(cls.named_split_overrides(split) if split else [])]
    if split_root is not None:
        data = load_config(run_dir / "config.yaml", cls.config_class).data
        overrides.append(f"data.root={Path(data.root) / split_root}")
        if hasattr(data, "prior_root"):  # the split folders hold no training files: priors read data.root's
            overrides.append(f"data.prior_root={data.prior_root or data.root}")
    return build_task(task_name, str(run_dir / "config.yaml"), overrides)


def finetuning_rows(run_dir: str | Path, task_name: str, checkpoint: Path | None = None,
                    held_out_only: bool = False, splits: list[tuple[str, str, str | None]] | None = None) -> list[Row]:
    """Evaluate the run's last checkpoint (or `checkpoint`, read with the run's task config) on the held-out and
    compositional splits (`held_out_only`: the first): the task's report metric beside its chance level.

    `splits`: (label, split, folder under data.root or None), default the shapes world's for the task."""
    splits = splits or EVAL_SPLITS.get(task_name)
    if not splits:
        raise ConfigError(f"--task {task_name}: the report knows {', '.join(EVAL_SPLITS)}")
    run_dir = Path(run_dir)
    checkpoint = checkpoint or last_checkpoint(run_dir)
    train_task = _task_for(run_dir, task_name, None, checkpoint)
    metric = train_task.report_metric or train_task.main_metric
    metric_name = train_task.metric_labels.get(metric, metric)
    model = load_checkpoint_model(str(checkpoint), train_task).eval()
    rows = []
    for label, split, root in splits[:1 if held_out_only else None]:
        task = _task_for(run_dir, task_name, root, checkpoint, split)
        with torch.no_grad():
            metrics = task.evaluate(model, split)
        chance = task.chance(split, train_task)
        if metric not in chance:
            raise ConfigError(f"--task {task_name}: the task has no chance level for {metric}")
        rows.append(Row(f"{label}: {metric_name}", metrics[metric], chance[metric], metrics,
                        task.report_lines(metrics)))
    return rows


def finetuning_report(run_dir: str | Path, task_name: str, compare: str | Path | None = None,
                      rows: list[Row] | None = None, other: list[Row] | None = None) -> list[str]:
    """The report's lines; `rows` / `other` are the runs' `finetuning_rows` when the caller already has them."""
    lines = [f"Fine-tuning {task_name} on the shapes world from {run_dir}"]
    rows = finetuning_rows(run_dir, task_name) if rows is None else rows
    if compare is None:
        for row in rows:
            lines.append(row.line())
            lines += [f"    {label:<35} {value:6.1f} %" + (f"   (prior {prior:5.1f} %)" if prior is not None else "")
                      for label, value, prior in row.details]
    else:
        other = finetuning_rows(compare, task_name) if other is None else other
        lines.append(f"  {'':<34} {'pretrained':>10} {'text-only':>10}   chance")
        for mine, theirs in zip(rows, other, strict=True):
            lines.append(f"  {mine.name:<34} {mine.value:8.1f} % {theirs.value:8.1f} %   {mine.chance:5.1f} %")
            their_details = {label: value for label, value, _ in theirs.details}
            for label, value, prior in mine.details:
                theirs_value = their_details.get(label)
                lines.append(f"    {label:<32} {value:8.1f} % "
                             + (f"{theirs_value:8.1f} %" if theirs_value is not None else f"{'':>10}")
                             + (f"   {prior:5.1f} %" if prior is not None else ""))
        lines.append(f"  (text-only: the same steps from the MiniLM text stream alone: {compare})")
    lines.append(f"checkpoint {last_checkpoint(Path(run_dir))}")
    return lines


def report_record(run_dir: str | Path, task_name: str, rows: list[Row], compare: str | Path | None = None,
                  other: list[Row] | None = None) -> dict:
    """A fine-tuning report as data (`vilbert report --json`): per split its metric, chance and whole evaluation,
    for the run and the --compare run."""
    def record(directory, found):
        return {"run": str(directory), "checkpoint": str(last_checkpoint(Path(directory))),
                "rows": [{"split": row.name.split(": ", 1)[0], "metric": row.name.split(": ", 1)[1], "value": row.value,
                          "chance": row.chance, "metrics": row.metrics} for row in found]}
    return {"task": task_name, **record(run_dir, rows), "compare": record(compare, other) if compare else None}


def multitask_report(multi_run: str | Path, singles: dict[str, tuple[Path, int]]) -> list[str]:
    """Per member of a multi-task run: its held-out metric from the multi-task model beside the single-task model
    trained for the same number of steps (`singles`: member -> (that run's directory, steps)), and chance."""
    multi_run = Path(multi_run)
    checkpoint = last_checkpoint(multi_run)
    lines = [f"Multi-task fine-tuning on the shapes world from {multi_run}",
             f"  {'held-out test':<34} {'multi':>8} {'single':>8}   chance  (steps each)"]
    gains = []
    for name, (single_run, steps) in singles.items():
        multi = finetuning_rows(single_run, name, checkpoint, held_out_only=True)[0]
        single = finetuning_rows(single_run, name, held_out_only=True)[0]
        gains.append(multi.value - single.value)
        lines.append(f"  {name + ': ' + multi.name.split(': ', 1)[1]:<34} {multi.value:6.1f} % {single.value:6.1f} %"
                     f"   {multi.chance:5.1f} %  ({steps})")
    lines.append(f"  mean multi - single: {np.mean(gains):+.1f} points")
    lines.append(f"checkpoint {checkpoint}")
    return lines
