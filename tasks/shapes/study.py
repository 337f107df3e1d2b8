"""The paper's ablations on the shapes world: a declared grid of architecture variants x pretraining-data fraction x
seeds, each pretrained and then fine-tuned on VQA, retrieval and RefCOCO, evaluated on the held-out and
compositional splits, summarised in one table (mean and 95 % interval over seeds, parameters, FLOPs per sample) and
one figure (each metric per grid row, with interval bars).

A study directory holds one study: `study.json` (the grid), its world and features, one folder per cell
(`cells/<variant>_p<percent>_s<seed>/`: the pretraining run, one run per task, one result file per finished
step) and the outputs `study.md` and `study.png`. A rerun skips every step whose result file exists and redoes an
interrupted one; a directory holding another study (or anything else) is refused, as a run directory is.
Fine-tuning checkpoints are deleted once evaluated (their metrics are the result); pretraining checkpoints stay.

Choices where the paper is silent or does not apply here:
- every variant starts from the same MiniLM text stream with its first 4 layers frozen, as the embedded default
  (single-stream's frozen layers pass the gradient to the regions they read);
- a pretraining-data fraction f pretrains on the first f of the training images (nested subsets) for the same
  number of steps: the compute is held fixed and the data varies; f = 0 fine-tunes from the text stream alone;
- the co-attention depth N places N blocks (and N vision layers) as the published N-layer models
  (`vilbert.depth_overrides`); the embedded text stream has 6 layers, so N is at most 6.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from features.atomic import atomic_path
from features.detectors import build_detector
from features.extract import boxes_file_info, extract
from features.inputs import list_images, load_boxes
from features.locks import OutputLock
from tasks.engine.config import load_config
from tasks.engine.run_directory import LOCK_FILE, run_contents
from tasks.engine.trainer import Trainer
from tasks.errors import ConfigError
from tasks.figures.intervals import IntervalPanel, interval_figure
from tasks.pretraining import PretrainConfig, PretrainingTask
from tasks.registry import build_task
from tasks.shapes.report import finetuning_rows, last_checkpoint
from tasks.shapes.targets import add_class_targets
from tasks.shapes.world import write_shapes_world
from vilbert import ViLBertConfig, ViLBertModel, depth_overrides
from vilbert.configuration_vilbert import ARCHITECTURES

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
TASKS = ("vqa", "retrieval", "refcoco")
SPLITS = ("held-out test", "compositional")
METRIC_NAMES = {"vqa": "VQA accuracy", "retrieval": "retrieval R@1", "refcoco": "RefCOCO accuracy"}
FROZEN_TEXT_LAYERS = 4  # as the embedded default's configs (model.overrides.fixed_t_layer)
# Each task's settings beyond its embedded config: VQA without region supervision (data.grounding_weight, the
# config's default since results.md's "Region supervision"), which late fusion cannot take and the study's worlds
# have no grounding files for; the study compares the architectures as the paper did.
FINETUNE_SETTINGS = {"vqa": ["data.grounding_weight=0"]}
COST_TEXT_LENGTH, COST_REGIONS = 16, 6  # the sample FLOPs are counted on (a typical caption, IMG + 5 shapes)
# Effective FLOP/s of one idle 2-core VM of this project per kind of run, counted in base-model forward FLOPs (x 3
# per trained sample; the heads, uncounted, are what makes them differ): pretraining from `make pretrain`'s idle run
# (1,400 steps x 32 samples in 12.7 min with its evaluation), fine-tuning from the quick preset's idle run of
# 2026-12-06 (the `seconds` of its 30 result files, less RUN_OVERHEAD_SECONDS each), rounded down.
IDLE_FLOPS_PER_SECOND = {"pretrain": 8e10, "vqa": 1.7e11, "retrieval": 1.5e11, "refcoco": 3.5e11}
EXTRACT_SECONDS_PER_IMAGE = 0.03  # MobileNetV2 on given boxes, idle (the README's 2,000 images in 1.1 min)
RUN_OVERHEAD_SECONDS = 4.0  # building, loading and saving a model once, idle
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t, 1..10 d.o.f.


# ------------------------------------------------------------------------------------------------------- the grid


@dataclasses.dataclass(frozen=True)
class Variant:
    """An architecture (`vilbert.variants`) and, for the co-attention ones, its depth (None: the preset's)."""

    architecture: str
    depth: int | None = None

    @property
    def name(self) -> str:
        return self.architecture if self.depth is None else f"{self.architecture}:{self.depth}"

    def model_overrides(self, base: ViLBertConfig) -> dict[str, Any]:
        """The `ViLBertConfig` fields that make the `base` config this variant."""
        fields: dict[str, Any] = {"architecture": self.architecture}
        if self.depth is not None:
            fields.update(depth_overrides(base.num_hidden_layers, self.depth, base.fixed_t_layer))
        if self.architecture == "single-stream":
            fields.update(v_hidden_size=base.hidden_size, v_num_attention_heads=base.num_attention_heads,
                          v_intermediate_size=base.intermediate_size)
        return fields


def parse_variant(text: str, num_text_layers: int) -> Variant:
    """"NAME" or "NAME:DEPTH" (depth for vilbert, coattention-only, sequential) -> Variant; ConfigError if bad."""
    name, _, depth_text = text.strip().partition(":")
    if name not in ARCHITECTURES:
        raise ConfigError(f"--variants: unknown variant {name!r}; expected one of {', '.join(ARCHITECTURES)} "
                          "(NAME or NAME:DEPTH)")
    if not depth_text:
        return Variant(name)
    if name in ("single-stream", "late-fusion"):
        raise ConfigError(f"--variants {text}: {name} has no co-attention blocks, so no depth")
    try:
        depth = int(depth_text)
    except ValueError:
        raise ConfigError(f"--variants {text}: the depth must be a whole number, got {depth_text!r}") from None
    try:
        depth_overrides(num_text_layers, depth)
    except ConfigError as error:
        raise ConfigError(f"--variants {text}: {error}") from None
    return Variant(name, depth)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One pretraining (unless fraction is 0) and its fine-tunings."""

    variant: Variant
    fraction: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant.name.replace(':', '-d')}_p{round(100 * self.fraction):03d}_s{self.seed}"


@dataclasses.dataclass
class StudyPlan:
    """A declared grid: rows of (variant, pretraining-data fraction), each run with every seed, and the sizes."""

    preset: str
    rows: list[tuple[Variant, float]]
    seeds: list[int]
    images: int  # shapes-world size (a tenth each for val, test and compositional)
    pretrain_steps: int
    finetune_steps: dict[str, int]
    budget_minutes: float | None  # refuse a grid estimated to take longer (idle machine); None = no limit
    retrieval_eval_images: int | None = None  # rank only the first N images of each held-out retrieval set
    model_preset: str = "embedded"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # on top of the shapes configs'
    pretrain_overrides: list[str] = dataclasses.field(default_factory=list)  # `key=value`, pretraining runs
    finetune_overrides: list[str] = dataclasses.field(default_factory=list)  # `key=value`, fine-tuning runs

    def base_config(self) -> ViLBertConfig:
        """The model every variant starts from: the preset, the shapes configs' frozen layers, the overrides."""
        return ViLBertConfig.from_preset(self.model_preset, **self._fields())

    def variant_config(self, variant: Variant) -> ViLBertConfig:
        return ViLBertConfig.from_preset(self.model_preset,
                                         **{**self._fields(), **variant.model_overrides(self.base_config())})

    def _fields(self) -> dict[str, Any]:
        return {"fixed_t_layer": FROZEN_TEXT_LAYERS, **self.model_overrides}

    def cells(self) -> list[Cell]:
        """Seed by seed, so that an interrupted study has whole seeds of every row first."""
        return [Cell(variant, fraction, seed) for seed in self.seeds for variant, fraction in self.rows]

    def identity(self) -> dict[str, Any]:
        """What makes two studies the same (recorded in study.json; the budget is not part of it)."""
        return {"preset": self.preset, "rows": [[v.name, f] for v, f in self.rows], "seeds": self.seeds,
                "images": self.images, "pretrain_steps": self.pretrain_steps, "finetune_steps": self.finetune_steps,
                "retrieval_eval_images": self.retrieval_eval_images, "model_preset": self.model_preset,
                    "model_overrides": self.model_overrides,
                "pretrain_overrides": self.pretrain_overrides, "finetune_overrides": self.finetune_overrides}


def _rows(variants: list[str], fractions: list[float], num_text_layers: int = 6) -> list[tuple[Variant, float]]:
    return [(parse_variant(v, num_text_layers), f) for v in variants for f in fractions]


def preset_plan(name: str) -> StudyPlan:
    """`quick` (18 min estimated, idle): the architecture questions without pretraining (the paper's † rows:
    single-stream vs ViLBERT), the two new ones (coattention-only, sequential) and the late-fusion lower bound, each
    fine-tuned from the text stream, 3 seeds, a 300-image world. No pretraining: 80 steps of it (all such a budget
    allows) taught nothing measurable (alignment 48.7 % against 50 % chance), so the budget goes to fine-tuning.
    `full` (about 8 h, idle, in one process): Tables 1-3 (single-stream and ViLBERT with and without pretraining;
    depth 2/4/6, the paper's first three; data 0/25/50/100 %) and the two new questions, pretrained, 3 seeds, the
    default world and run lengths of `make pretrain` and `make finetune`. Late fusion and depth 1 are left to
    custom grids (`--variants`): the quick preset already bounds late fusion, and every pretrained row costs 3
    pretraining runs."""
    if name == "quick":
        return StudyPlan(
            "quick",
            rows=_rows(["vilbert", "single-stream", "coattention-only", "sequential", "late-fusion"], [0.0]),
            seeds=[0, 1, 2], images=300, pretrain_steps=0, finetune_steps={"vqa": 100, "retrieval": 30, "refcoco": 80},
            budget_minutes=30.0, retrieval_eval_images=20)
    if name == "full":
        return StudyPlan(
            "full",
            rows=_rows(["vilbert", "single-stream"], [1.0, 0.0]) + _rows(["vilbert:4", "vilbert:6"], [1.0])
            + _rows(["vilbert"], [0.25, 0.5]) + _rows(["coattention-only", "sequential"], [1.0]),
            seeds=[0, 1, 2], images=2000, pretrain_steps=1400,
            finetune_steps={"vqa": 450, "retrieval": 100, "refcoco": 150}, budget_minutes=None)
    raise ConfigError(f"--preset: unknown {name!r}; expected quick or full")


def custom_plan(base: StudyPlan, variants: list[str] | None = None, fractions: list[float] | None = None,
                seeds: int | None = None, budget_minutes: float | None = None) -> StudyPlan:
    """`base` with its rows replaced by variants x fractions, `seeds` seeds (0..n-1), another budget."""
    plan = dataclasses.replace(base)
    if fractions is not None:
        for f in fractions:
            if not 0 <= f <= 1:
                raise ConfigError(f"--fractions: {f} is not a fraction of the pretraining data in [0, 1]")
    if variants is not None or fractions is not None:
        plan.preset = f"{base.preset} (custom)"
        plan.rows = _rows(variants or list(dict.fromkeys(v.name for v, _ in base.rows)),
                          fractions if fractions is not None else [1.0], base.base_config().num_hidden_layers)
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds: {seeds} must be at least 1")
        plan.seeds = list(range(seeds))
    if budget_minutes is not None:
        plan.budget_minutes = budget_minutes
    return plan


# ---------------------------------------------------------------------------------------------- cost and estimate


@dataclasses.dataclass(frozen=True)
class ModelCost:
    parameters: int  # the base model (embeddings, encoder, poolers), heads excluded
    flops: float  # forward FLOPs of one sample (COST_TEXT_LENGTH tokens, COST_REGIONS regions)


def model_cost(plan: StudyPlan, variant: Variant) -> ModelCost:
    """Parameters and forward FLOPs per sample of the variant's base model (torch's FLOP counter)."""
    return _counted(plan.variant_config(variant).to_json_string())


@functools.lru_cache(maxsize=64)
def _counted(config_json: str) -> ModelCost:
    """Counted on the meta device: shapes only, no memory, no weights."""
    config = ViLBertConfig(**json.loads(config_json))
    with torch.device("meta"):
        model = ViLBertModel(config).eval()
        inputs = {"input_ids": torch.ones(1, COST_TEXT_LENGTH, dtype=torch.long),
                  "region_features": torch.zeros(1, COST_REGIONS, config.v_feature_size),
                  "region_locations": torch.zeros(1, COST_REGIONS, 5)}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs)
    return ModelCost(sum(p.numel() for p in model.parameters()), float(counter.get_total_flops()))


def estimate_minutes(plan: StudyPlan, costs: dict[str, ModelCost]) -> float:
    """The grid's time on an idle machine: world and features, then per cell its training samples x 3 forward
    FLOPs and its evaluation forwards, over the kind of run's IDLE_FLOPS_PER_SECOND, plus a fixed cost per run."""
    held = max(1, plan.images // 10)
    ranked = min(held, 50, plan.retrieval_eval_images or 50)
    ranked_zero_shot = min(held, 16 if "data.retrieval_images=16" in plan.pretrain_overrides else 32)
    eval_forwards = {"pretrain": 5 * held + ranked_zero_shot ** 2 * 5, "vqa": 2 * 6 * held,
                     "retrieval": 2 * ranked * 5 * ranked, "refcoco": 2 * 3 * held}
    batch = {"pretrain": 32, "vqa": 32, "retrieval": 64, "refcoco": 32}
    seconds = plan.images * EXTRACT_SECONDS_PER_IMAGE
    for cell in plan.cells():
        flops = costs[cell.variant.name].flops
        runs = {task: plan.finetune_steps[task] for task in TASKS}
        if cell.fraction > 0:
            runs["pretrain"] = plan.pretrain_steps
        for run, steps in runs.items():
            samples = steps * batch[run] * 3 + eval_forwards[run]
            seconds += samples * flops / IDLE_FLOPS_PER_SECOND[run] + RUN_OVERHEAD_SECONDS
    return seconds / 60


# -------------------------------------------------------------------------------------------- the study directory


STUDY_RECORD = "study.json"
PARTIAL_FEATURES = "features.partial.h5"  # the store while it is extracted (and its parts, lock, error log)
# what a study writes at the top of its directory; `--overwrite` removes these and nothing else
STUDY_FILES = frozenset({STUDY_RECORD, "study.md", "study.png", "world", "features.h5", "captions", "retrieval_eval",
                         "cells"})


def is_study_file(name: str) -> bool:
    """Whether `name` at the top of a study directory is the study's own (the features store in the making too)."""
    return name in STUDY_FILES or name.startswith(PARTIAL_FEATURES)


@contextlib.contextmanager
def claim_study_directory(out: Path, plan: StudyPlan, overwrite: bool = False) -> Iterator[Path]:
    """Hold `out` for this study (the run-directory rules): a new or empty directory, or one holding this very
    study (resumed); another study is refused unless `overwrite`, which then removes the study's own files
    (`is_study_file`) and nothing else; a folder holding no study is refused, `overwrite` included. Locked while
    held; nothing is removed on failure (each finished step is kept for the rerun)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    created = not out.exists()
    lock = OutputLock(out / LOCK_FILE, f"study directory {out}")
    lock.acquire()
    try:
        contents = run_contents(out)
        record = out / STUDY_RECORD
        if contents and not record.is_file():
            shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
            raise ConfigError(f"--out {out}: is not empty and holds no study ({shown}); nothing there is removed, "
                              "--overwrite included: choose a new or empty --out")
        if contents and not overwrite:
            if other := _other_study(record, plan):
                raise ConfigError(f"--out {out}: holds another study ({other}); choose another --out, or replace "
                                  "it with --overwrite")
        elif contents:
            for name in filter(is_study_file, contents):
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if not record.is_file():
            _write_json(record, plan.identity())
        yield out
    finally:
        lock.release()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _other_study(record: Path, plan: StudyPlan) -> str | None:
    """None when the study record `record` is this plan's, else what differs ("preset 'quick'; differs in seeds");
    a ConfigError naming the file when it cannot be read."""
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{record}: cannot read the study record ({error})") from error
    identity = plan.identity()
    if recorded == identity:
        return None
    recorded = recorded if isinstance(recorded, dict) else {}
    differ = sorted(k for k in identity if recorded.get(k) != identity[k])
    return f"preset {recorded.get('preset')!r}; differs in {', '.join(differ) or 'its keys'}"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(value, indent=1) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------- running it


@dataclasses.dataclass
class StudyPaths:
    out: Path

    @property
    def world(self) -> Path:
        return self.out / "world"

    @property
    def features(self) -> Path:
        return self.out / "features.h5"

    def captions(self, fraction: float) -> Path:
        if fraction >= 1:
            return self.world / "captions" / "captions_train.jsonl"
        return self.out / "captions" / f"captions_train_p{round(100 * fraction):03d}.jsonl"

    def cell(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.key


def prepare_world(paths: StudyPaths, images: int, say: Callable[[str], None]) -> None:
    """The shapes world (seed 0) and its MobileNetV2 features on the ground-truth boxes, with class targets; the
    store takes its final name last, so its presence means the world is done (as in the Makefile)."""
    if paths.features.is_file():
        return
    say(f"shapes world: {images} images, features")
    if paths.world.exists():
        shutil.rmtree(paths.world)
    write_shapes_world(paths.world, seed=0, num_images=images, progress=False)
    partial = paths.out / PARTIAL_FEATURES
    boxes_path = paths.world / "gt_boxes.json"
    extract(list_images(paths.world / "images"), partial, build_detector("mobilenet-v2"),
            boxes=load_boxes(boxes_path, "xyxy"), boxes_info=boxes_file_info(boxes_path, "xyxy"), batch_size=64,
            workers=0, progress=False)
    add_class_targets(partial, paths.world)
    partial.rename(paths.features)


def write_retrieval_subsets(paths: StudyPaths, images: int | None) -> dict[str, str]:
    """The retrieval task's split files, the held-out sets cut to their first `images` images (all: the world's)."""
    folder = paths.world / "retrieval"
    files = {"train": "all_data_final_train.jsonline", "val": "all_data_final_val_set0.jsonline",
             "test": "all_data_final_test_set0.jsonline",
             "compositional": "all_data_final_compositional_set0.jsonline"}
    if images is None:
        return files
    chosen = {"train": str((folder / files["train"]).resolve())}  # absolute: the task reads names under data.root
    for split in ("val", "test", "compositional"):
        lines = [line for line in (folder / files[split]).read_text().splitlines() if line.strip()][:images]
        path = paths.out / "retrieval_eval" / files[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text("\n".join(lines) + "\n")
        chosen[split] = str(path.resolve())
    return chosen


def write_caption_subsets(paths: StudyPaths, fractions: set[float]) -> None:
    """The first `f` of the training images (in file order) with all their captions, for each fraction 0 < f < 1."""
    lines = paths.captions(1.0).read_text().splitlines()
    image_ids = list(dict.fromkeys(json.loads(line)["image_id"] for line in lines if line.strip()))
    for fraction in sorted(f for f in fractions if 0 < f < 1):
        keep = set(image_ids[: max(1, round(fraction * len(image_ids)))])
        chosen = [line for line in lines if line.strip() and json.loads(line)["image_id"] in keep]
        path = paths.captions(fraction)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text("\n".join(chosen) + "\n")


def _model_arguments(plan: StudyPlan, variant: Variant, text_init: str) -> list[str]:
    fields = {**plan.model_overrides, **variant.model_overrides(plan.base_config())}
    return [f"model.preset={plan.model_preset}", f"model.text_init={text_init}"] + [
        f"model.overrides.{key}={json.dumps(value)}" for key, value in fields.items()]


def pretrain(paths: StudyPaths, plan: StudyPlan, cell: Cell, text_init: str) -> dict[str, Any]:
    """Pretrain the cell's variant on its fraction of the captions; the held-out metrics and the checkpoint."""
    run_dir = paths.cell(cell) / "pretrain"
    val = paths.world / "captions" / "captions_val.jsonl"
    overrides = _model_arguments(plan, cell.variant, text_init) + [
        f"data.train_features={paths.features}", f"data.train_captions={paths.captions(cell.fraction)}",
        f"data.val_features={paths.features}", f"data.val_captions={val}", f"train.output_dir={run_dir}",
        f"train.max_steps={plan.pretrain_steps}", f"train.seed={cell.seed}", "train.log_every=1000000",
        *plan.pretrain_overrides]
    config = load_config(CONFIGS / "pretrain_embedded.yaml", PretrainConfig, overrides)
    cpu = time.process_time()
    result = Trainer(PretrainingTask(config)).fit(overwrite=True)
    return {"metrics": result.last_eval, "seconds": result.seconds, "cpu_seconds": time.process_time() - cpu,
            "checkpoint": str(last_checkpoint(run_dir))}


def finetune(paths: StudyPaths, plan: StudyPlan, cell: Cell, task_name: str, text_init: str,
             init: str | None) -> dict[str, Any]:
    """Fine-tune one task from `init` (None: the text stream alone), evaluate the held-out and compositional
    splits, delete the checkpoint; the metrics beside chance."""
    run_dir = paths.cell(cell) / task_name
    roots = {"vqa": "vqa", "retrieval": "retrieval", "refcoco": "refshapes"}
    overrides = _model_arguments(plan, cell.variant, text_init) + [
        f"data.root={paths.world / roots[task_name]}", f"data.features=[{paths.features}]",
        f"train.output_dir={run_dir}", f"train.max_steps={plan.finetune_steps[task_name]}",
        f"train.seed={cell.seed}", "train.log_every=1000000", "train.eval_at_end=false",
        *([f"model.init={init}"] if init else []), *FINETUNE_SETTINGS.get(task_name, []), *plan.finetune_overrides]
    if task_name == "retrieval":
        overrides.append(f"data.split_files={json.dumps(write_retrieval_subsets(paths, plan.retrieval_eval_images))}")
    task = build_task(task_name, CONFIGS / f"{task_name}_embedded.yaml", overrides)
    started, cpu = time.perf_counter(), time.process_time()
    Trainer(task).fit(overwrite=True)
    rows = finetuning_rows(run_dir, task_name)
    shutil.rmtree(run_dir / "checkpoints")
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
            "splits": {row.name.split(":")[0]: {"value": row.value, "chance": row.chance} for row in rows}}


def run_cell(paths: StudyPaths, plan: StudyPlan, cell: Cell, text_init: str, say: Callable[[str], None],
             label: str = "") -> None:
    """Pretrain the cell (unless its fraction is 0), then fine-tune and evaluate every task; each finished step
    leaves its result file, and a step whose file exists is skipped."""
    folder = paths.cell(cell)
    init = None
    if cell.fraction > 0:
        done = _read_json(folder / "pretrain.json")
        if done is None:
            say(f"{label}{cell.key}: pretraining")
            done = pretrain(paths, plan, cell, text_init)
            _write_json(folder / "pretrain.json", done)
        init = done["checkpoint"]
    for task_name in TASKS:
        if not (folder / f"{task_name}.json").is_file():
            say(f"{label}{cell.key}: {task_name}")
            _write_json(folder / f"{task_name}.json", finetune(paths, plan, cell, task_name, text_init, init))


# ------------------------------------------------------------------------------- finished results kept elsewhere


def _check_results_folder(results: Path, plan: StudyPlan) -> None:
    """`results` holds no study yet or this very study (its study.json), else ConfigError naming the file."""
    record = results / STUDY_RECORD
    if results.exists() and not results.is_dir():
        raise ConfigError(f"--results {results}: exists and is not a directory")
    if not record.is_file():
        if results.is_dir() and any(results.iterdir()):
            raise ConfigError(f"--results {results}: is not empty and holds no {STUDY_RECORD}; choose a new folder")
        return
    if other := _other_study(record, plan):
        raise ConfigError(f"{record}: holds another study ({other}); choose another --results folder")


def restore_finished_cells(plan: StudyPlan, results: Path, out: Path) -> list[str]:
    """Copy into the study directory `out` every cell `results` holds finished and `out` does not: a study run in
    pieces on machines that do not keep their disks goes on where the last piece stopped. The keys restored."""
    restored, source, target = [], StudyPaths(results), StudyPaths(out)
    for cell in plan.cells():
        if _cell_done(source, cell) and not _cell_done(target, cell):
            _copy_cell_results(source, target, cell)
            restored.append(cell.key)
    return restored


def keep_finished_cell(plan: StudyPlan, out: Path, cell: Cell, results: Path) -> None:
    """Copy a finished cell's result files (no checkpoints: a few kB) into `results`, with the study record."""
    if not (results / STUDY_RECORD).is_file():
        _write_json(results / STUDY_RECORD, plan.identity())
    _copy_cell_results(StudyPaths(out), StudyPaths(results), cell)


def _copy_cell_results(source: StudyPaths, target: StudyPaths, cell: Cell) -> None:
    for name in _step_names(cell):
        _write_json(target.cell(cell) / f"{name}.json", _read_json(source.cell(cell) / f"{name}.json"))


def _cell_in_worker(out: str, plan: StudyPlan, cell: Cell, text_init: str, label: str) -> str:
    run_cell(StudyPaths(Path(out)), plan, cell, text_init, functools.partial(print, flush=True), label)
    return cell.key


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, as Linux does; else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_cells_in_parallel(paths: StudyPaths, plan: StudyPlan, text_init: str, jobs: int,
                           say: Callable[[str], None], finished: Callable[[Cell], None]) -> None:
    """The unfinished cells over `jobs` worker processes, the machine's cores shared among them. A failed cell
    stops the cells not yet started and is raised once the running ones have finished (their steps are kept)."""
    cells = plan.cells()
    pending = [(number, cell) for number, cell in enumerate(cells, 1) if not _cell_done(paths, cell)]
    threads = max(1, usable_cores() // jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(_cell_in_worker, str(paths.out), plan, cell, text_init, f"[{number}/{len(cells)}] "):
                   cell for number, cell in pending}
        try:
            for future in as_completed(futures):
                say(f"cell {future.result()}: done")
                finished(futures[future])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _step_names(cell: Cell) -> tuple[str, ...]:
    return (*(("pretrain",) if cell.fraction > 0 else ()), *TASKS)


def _cell_done(paths: StudyPaths, cell: Cell) -> bool:
    return all((paths.cell(cell) / f"{name}.json").is_file() for name in _step_names(cell))


def run_study(plan: StudyPlan, out: str | Path, text_init: str, overwrite: bool = False,
              say: Callable[[str], None] = logger.info, jobs: int = 1, results: str | Path | None = None) -> list[str]:
    """Run (or resume) every cell of `plan` in `out`, `jobs` cells at a time (worker processes when more than
    one); write study.md and study.png; return the table's lines. `results`: a folder (in the repository, say)
    that keeps each finished cell's result files and the table: its cells are restored into `out` first and
    skipped, and each cell finished here is copied there at once."""
    if jobs < 1:
        raise ConfigError(f"--jobs: {jobs} must be at least 1")
    costs = {v.name: model_cost(plan, v) for v in dict.fromkeys(v for v, _ in plan.rows)}
    minutes = estimate_minutes(plan, costs)
    if plan.budget_minutes is not None and minutes > plan.budget_minutes:
        raise ConfigError(f"the grid ({len(plan.cells())} cells) needs an estimated {minutes:.0f} min on an idle "
                          f"2-core CPU, over the {plan.budget_minutes:g} min budget (--budget-minutes); use fewer "
                          "variants, fractions or seeds")
    if not Path(text_init).is_dir():
        raise ConfigError(f"--text-init {text_init}: not a directory (a local BERT such as MiniLM)")
    out = Path(out)
    paths = StudyPaths(out)
    if results is not None:
        results = Path(results)
        _check_results_folder(results, plan)

    def finished(cell: Cell, outputs: bool = True) -> None:
        """Keep the cell in `results` and, unless told not to, its table and figure up to date there."""
        if results is not None:
            keep_finished_cell(plan, out, cell, results)
            if outputs:
                write_outputs(plan, results, costs)

    with claim_study_directory(out, plan, overwrite):
        say(f"study {plan.preset}: {len(plan.cells())} cells, estimated {minutes:.0f} min on an idle 2-core CPU"
            + (f" in one process; {jobs} at a time" if jobs > 1 else ""))
        started = time.perf_counter()
        if results is not None and (restored := restore_finished_cells(plan, results, out)):
            say(f"restored {len(restored)} finished cells from {results}")
        prepare_world(paths, plan.images, say)
        write_caption_subsets(paths, {f for _, f in plan.rows})
        if jobs > 1:
            _run_cells_in_parallel(paths, plan, text_init, jobs, say, finished)
        else:
            for number, cell in enumerate(plan.cells(), 1):
                if not _cell_done(paths, cell):
                    run_cell(paths, plan, cell, text_init, say, f"[{number}/{len(plan.cells())}] ")
                    finished(cell)
        for cell in plan.cells():  # and those finished before `results` was given
            if _cell_done(paths, cell):
                finished(cell, outputs=False)
        lines = write_outputs(plan, out, costs)
        if results is not None:
            write_outputs(plan, results, costs)
        say(f"study {plan.preset}: done in {(time.perf_counter() - started) / 60:.1f} min this run "
            f"(estimate for the whole grid, idle: {minutes:.0f} min)")
    return lines


def write_outputs(plan: StudyPlan, folder: Path, costs: dict[str, ModelCost]) -> list[str]:
    """study.md and study.png in `folder` from the cells it holds finished; study.md's lines."""
    found = study_results(plan, folder)
    lines = report_lines(plan, found, costs)
    with atomic_path(folder / "study.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    study_figure(plan, found, folder / "study.png")
    return lines


def _cell_results(folder: Path) -> dict[str, Any]:
    return {task_name: _read_json(folder / f"{task_name}.json") for task_name in (*TASKS, "pretrain")}


# ---------------------------------------------------------------------------------------------- table and figure


def interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % Student-t interval (None for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None
    t = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return mean, t * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def difference(values: list[float], baseline: list[float]) -> tuple[float, float | None]:
    """Mean of `values` minus mean of `baseline` (each at least one value), and the half-width of its 95 %
    Student-t interval with pooled variance (None with one value on each side)."""
    delta = float(np.mean(values) - np.mean(baseline))
    dof = len(values) + len(baseline) - 2
    if dof < 1:
        return delta, None
    squares = sum(float(np.sum((np.asarray(x) - np.mean(x)) ** 2)) for x in (values, baseline))
    pooled = squares / dof
    t = T_975[dof - 1] if dof <= len(T_975) else 1.96
    return delta, t * math.sqrt(pooled * (1 / len(values) + 1 / len(baseline)))


def baseline_row(plan: StudyPlan, variant: Variant, fraction: float) -> tuple[Variant, float] | None:
    """The row a row is compared with: the faithful model (`vilbert` at the preset's depth) at the same
    pretraining fraction, or for that model's own rows the grid's first row; None for the first row itself."""
    first = plan.rows[0]
    faithful = Variant("vilbert") if any(v == Variant("vilbert") for v, _ in plan.rows) else first[0]
    if (variant, fraction) == first:
        return None
    if variant != faithful and (faithful, fraction) in plan.rows:
        return faithful, fraction
    return first


def comparison_lines(plan: StudyPlan, results: dict[Cell, dict]) -> list[str]:
    """Each row against its `baseline_row`: the difference of the means ± its 95 % half-width (pooled-variance t),
    for every task and split; rows or baselines with no finished seed are left out."""
    columns = _metric_columns()
    lines = ["Differences: each row minus the row it is compared with, difference of the means ± 95 % interval "
             "half-width (Student t, pooled variance; none with one seed on each side)",
             "",
             "| row | against | " + " | ".join(columns) + " |",
             "|---" * (2 + len(columns)) + "|"]
    for variant, fraction in plan.rows:
        if (base := baseline_row(plan, variant, fraction)) is None:
            continue
        cells = []
        for task_name in TASKS:
            for split in SPLITS:
                values = _values(plan, results, variant, fraction, task_name, split)
                reference = _values(plan, results, *base, task_name, split)
                if not values or not reference:
                    cells.append("—")
                    continue
                delta, half = difference(values, reference)
                cells.append(f"{delta:+.1f}" + (f" ± {half:.1f}" if half is not None else ""))
        if any(c != "—" for c in cells):
            lines.append(f"| {_row_label(variant, fraction)} | {_row_label(*base)} | " + " | ".join(cells) + " |")
    return lines


def _metric_columns() -> list[str]:
    return [f"{METRIC_NAMES[t]} {'test' if s == SPLITS[0] else 'comp.'}" for t in TASKS for s in SPLITS]


def _row_label(variant: Variant, fraction: float) -> str:
    data = "no pretraining" if fraction == 0 else f"{round(100 * fraction)} % data"
    return f"{variant.name}, {data}"


def _values(plan: StudyPlan, results: dict[Cell, dict], variant: Variant, fraction: float, task_name: str,
            split: str) -> list[float]:
    """The finished seeds' values of one row, task and split."""
    return [results[c][task_name]["splits"][split]["value"] for c in plan.cells()
            if c.variant == variant and c.fraction == fraction and results[c][task_name] is not None]


def _chance(results: dict[Cell, dict], task_name: str, split: str) -> float | None:
    done = [r[task_name] for r in results.values() if r[task_name] is not None]
    return done[0]["splits"][split]["chance"] if done else None


def study_results(plan: StudyPlan, out: str | Path) -> dict[Cell, dict]:
    """Every cell's finished results in `out` (None for the steps not done yet)."""
    return {cell: _cell_results(StudyPaths(Path(out)).cell(cell)) for cell in plan.cells()}


def report_lines(plan: StudyPlan, results: dict[Cell, dict], costs: dict[str, ModelCost]) -> list[str]:
    """study.md: the table of means, then the differences against each row's baseline."""
    return table_lines(plan, results, costs) + [""] + comparison_lines(plan, results)


def table_lines(plan: StudyPlan, results: dict[Cell, dict], costs: dict[str, ModelCost]) -> list[str]:
    """The study's markdown table: per row, each task and split as mean ± 95 % half-width over the seeds."""
    columns = _metric_columns()
    lines = [f"Study {plan.preset}: {len(plan.seeds)} seeds, mean ± 95 % interval half-width (Student t; none with one "
             f"seed; [k] = only k seeds finished); FLOPs: forward, one sample of {COST_TEXT_LENGTH} tokens and "
             f"{COST_REGIONS} regions",
             "",
             "| variant | params (M) | GFLOPs | " + " | ".join(columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    for variant, fraction in plan.rows:
        cells = []
        for task_name in TASKS:
            for split in SPLITS:
                values = _values(plan, results, variant, fraction, task_name, split)
                if not values:
                    cells.append("—")
                    continue
                mean, half = interval(values)
                cells.append(f"{mean:.1f}" + (f" ± {half:.1f}" if half is not None else "")
                             + (f" [{len(values)}]" if len(values) < len(plan.seeds) else ""))
        cost = costs[variant.name]
        lines.append(f"| {_row_label(variant, fraction)} | {cost.parameters / 1e6:.1f} | {cost.flops / 1e9:.2f} | "
                     + " | ".join(cells) + " |")
    chance = [f"{c:.1f}" if (c := _chance(results, t, s)) is not None else "—" for t in TASKS for s in SPLITS]
    lines.append("| chance | | | " + " | ".join(chance) + " |")
    return lines


def study_figure(plan: StudyPlan, results: dict[Cell, dict], out: Path) -> Path:
    """One panel per task and split: each grid row's mean with its 95 % interval, chance as a line."""
    panels = []
    for task_name in TASKS:
        for split in SPLITS:
            points = [(_row_label(v, f), *interval(values)) for v, f in plan.rows
                      if (values := _values(plan, results, v, f, task_name, split))]
            panels.append(IntervalPanel(f"{METRIC_NAMES[task_name]}, {split}", points,
                                        _chance(results, task_name, split)))
    return interval_figure(panels, out, title=f"Study {plan.preset} on the shapes world ({len(plan.seeds)} seeds)")
