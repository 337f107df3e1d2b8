"""VQA v2: the official question/annotation files, the answer vocabulary, soft-score targets, and the task.

Files (in `data.root`, as downloaded from visualqa.org):
    v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
    v2_mscoco_{train2014,val2014}_annotations.json

Splits: train, val, trainval (train + val minus minval), minval (the last `minval_size` val questions by
question_id; 3,000 in the reference), test, test-dev. The answer vocabulary is every normalised answer that is
the consensus answer (`multiple_choice_answer`) of at least `min_answer_count` train+val questions: 9 gives the
standard 3,129. A question's target gives each vocabulary answer the soft score of its human count (0, 0.3, 0.6,
0.9, 1). Loss: BCE-with-logits (mean) × number of answers, on `answer_logits`, or a debiasing loss
(`data.debias: rubi | lmh`, tasks/debiasing.py) against the per-question-type answer prior.

VQA-CP v2 (Agrawal et al., CVPR 2018; `--task vqa-cp`, or `data.format: vqa-cp`) regroups VQA v2's questions so
that each question type's answer distribution differs between train and test. Files (in `data.root`):
    vqacp_v2_{train,test}_questions.json    a JSON list of {"question_id", "image_id", "question", "coco_split"}
    vqacp_v2_{train,test}_annotations.json  a JSON list of VQA v2 annotations, each with "coco_split"
`coco_split` (train2014 or val2014) names the COCO image folder; features join by image id as VQA's do (COCO ids
are unique over both folders). Splits: train and test; the vocabulary is built from train alone.

Region supervision (`data.grounding_weight` > 0; tasks/region_supervision.py): a grounding file beside a split's
annotation file (`v2_mscoco_<subtype>_grounding.json`, VQA-CP `vqacp_v2_<split>_grounding.json`; the format in
tasks/data/grounding.py) names the box of each question about one object; training adds -log of the share of
the words' attention over the regions that lands on that box's region.

Bias measurements (`score`, on annotated splits): accuracy per answer type and per question type, the
question-only prior's accuracy (each question answered with its type's most frequent training answer, the
training questions read from `data.prior_root` or else `data.root`) per answer and question type, and how often
the model's answer equals that prior (`prior_agreement`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from features.store import FeatureStore
from tasks import debiasing
from tasks.data.annotations import (
    id_field,
    image_key_resolver,
    int_field,
    keep_known_images,
    list_field,
    load_json,
    require,
    str_field,
)
from tasks.data.answer_labels import (
    carry_answer_rows,
    checkpoint_classifier,
    config_answers,
    extend_answers,
    require_answer_labels,
)
from tasks.data.grounding import Box, read_grounding, target_rows
from tasks.data.regions import collate_visual, visual_input, visual_rows
from tasks.debiasing import AnswerPrior
from tasks.engine.evaluation import eval_batches, in_dataset_order
from tasks.engine.padding import MODEL_PADDED_KEYS, REGIONS, cut_to_longest
from tasks.engine.sampler import length_order
from tasks.engine.task import ExampleInputs, PredictExample, StepOutput, TaskDataset
from tasks.errors import AnnotationError, ConfigError, DataError
from tasks.figures.drawing import draw_boxes
from tasks.finetuning import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneTask,
    build_task_model,
    model_inputs,
    resolve_split,
)
from tasks.metrics import normalize_answer, soft_score, vqa_score
from tasks.region_supervision import check_model, grounding_loss

logger = logging.getLogger(__name__)

QUESTION_FILES = {
    "train2014": "v2_OpenEnded_mscoco_train2014_questions.json",
    "val2014": "v2_OpenEnded_mscoco_val2014_questions.json",
    "test2015": "v2_OpenEnded_mscoco_test2015_questions.json",
    "test-dev2015": "v2_OpenEnded_mscoco_test-dev2015_questions.json",
}
ANNOTATION_FILES = {
    "train2014": "v2_mscoco_train2014_annotations.json",
    "val2014": "v2_mscoco_val2014_annotations.json",
}
GROUNDING_FILES = {  # optional: the box each question about one object names (tasks/data/grounding.py)
    "train2014": "v2_mscoco_train2014_grounding.json",
    "val2014": "v2_mscoco_val2014_grounding.json",
}
SPLITS = ("train", "val", "trainval", "minval", "test", "test-dev")
FORMATS = ("vqa", "vqa-cp")
CP_SPLITS = ("train", "test")
CP_FILES = "vqacp_v2_{split}_{kind}.json"
COCO_SPLITS = ("train2014", "val2014")


@dataclass
class VQAQuestion:
    question_id: int
    image_id: int | str
    question: str
    answers: list[str] = field(default_factory=list)  # the humans' answers (empty for test splits)
    answer_type: str = ""
    question_type: str = ""
    consensus: str = ""  # multiple_choice_answer
    coco_split: str = ""  # VQA-CP: the COCO image folder (train2014, val2014)
    box: Box | None = None  # the named object's box, from the split's grounding file (when read)


def vocabulary_key(answer: str) -> str:
    """The vocabulary form of an answer: the official normalisation, then commas dropped (as the reference)."""
    return normalize_answer(answer).replace(",", "")


def read_questions(path: str | Path) -> list[VQAQuestion]:
    """Questions of one `v2_OpenEnded_mscoco_*_questions.json` file."""
    data = load_json(path)
    require(data, ["questions"], str(path), "the file")
    questions, seen = [], set()
    for i, entry in enumerate(list_field(data, "questions", str(path), "the file")):
        where = f"questions[{i}]"
        require(entry, ["question_id", "image_id", "question"], str(path), where)
        question_id = int_field(entry, "question_id", str(path), where)
        if question_id in seen:  # scored twice it would count twice (as `vilbert score` refuses too)
            raise AnnotationError(f"{path}: {where} repeats question_id {question_id}")
        seen.add(question_id)
        questions.append(VQAQuestion(question_id, id_field(entry, "image_id", str(path), where),
                                     str_field(entry, "question", str(path), where)))
    return questions


def attach_annotations(questions: list[VQAQuestion], path: str | Path) -> list[VQAQuestion]:
    """Fill answers and types from a `v2_mscoco_*_annotations.json` file.

    Questions without annotation, or whose answers are empty, are dropped with one counted warning;
    an annotation for an unknown question is an error (the files do not belong together).
    """
    data = load_json(path)
    require(data, ["annotations"], str(path), "the file")
    return attach_entries(questions, list_field(data, "annotations", str(path), "the file"), path)


def attach_grounding(questions: list[VQAQuestion], path: Path) -> list[VQAQuestion]:
    """Set each question's `box` from the grounding file `path` (none: every box stays None)."""
    boxes = read_grounding(path, {q.question_id for q in questions})
    for question in questions:
        question.box = boxes.get(question.question_id)
    return questions


def attach_entries(questions: list[VQAQuestion], entries: list, path: str | Path) -> list[VQAQuestion]:
    """`attach_annotations` on the annotation entries of `path` (a VQA v2 "annotations" list or a VQA-CP file)."""
    by_id = {q.question_id: q for q in questions}
    annotated = set()
    empty = 0
    for i, entry in enumerate(entries):
        require(entry, ["question_id", "answers"], str(path), f"annotations[{i}]")
        question = by_id.get(int_field(entry, "question_id", str(path), f"annotations[{i}]"))
        if question is None:
            raise AnnotationError(f"{path}: annotations[{i}] is for question_id {entry['question_id']}, "
                                  "which the questions file does not have")
        answers = []
        for j, answer in enumerate(list_field(entry, "answers", str(path), f"annotations[{i}]")):
            require(answer, ["answer"], str(path), f"annotations[{i}].answers[{j}]")
            if not isinstance(answer["answer"], (str, int, float)) or isinstance(answer["answer"], bool):
                raise AnnotationError(f"{path}: annotations[{i}].answers[{j}]: answer must be a string, got "
                                      f"{answer['answer']!r}")
            answers.append(str(answer["answer"]))
        if not answers or all(not a.strip() for a in answers):
            empty += 1
            continue
        question.answers = answers
        question.answer_type = str(entry.get("answer_type", ""))
        question.question_type = str(entry.get("question_type", ""))
        question.consensus = str(entry.get("multiple_choice_answer", Counter(answers).most_common(1)[0][0]))
        annotated.add(question.question_id)
    kept = [q for q in questions if q.question_id in annotated]
    if len(kept) < len(questions):
        logger.warning("%s: %d question(s) without usable answers skipped (%d with empty answers)",
                       path, len(questions) - len(kept), empty)
    return kept


def _cp_list(path: Path) -> list:
    data = load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list (the VQA-CP v2 layout), got a {type(data).__name__}")
    return data


def _coco_split(entry: dict, path: Path, where: str) -> str:
    split = str_field(entry, "coco_split", str(path), where)
    if split not in COCO_SPLITS:
        raise AnnotationError(f"{path}: {where}: coco_split must be one of {', '.join(COCO_SPLITS)}, got {split!r}")
    return split


def read_cp_split(root: str | Path, split: str, grounding: bool = False) -> list[VQAQuestion]:
    """The annotated questions of a VQA-CP v2 split (`vqacp_v2_<split>_{questions,annotations}.json`, with
    `grounding` also its `_grounding.json` boxes), sorted by question_id. A file of the wrong shape (not a list, an
    entry without a key, an unknown coco_split) is an AnnotationError naming the file and the entry."""
    if split not in CP_SPLITS:
        raise ConfigError(f"unknown VQA-CP split {split!r}; choose one of {', '.join(CP_SPLITS)}")
    root = Path(root)
    path = root / CP_FILES.format(split=split, kind="questions")
    questions = []
    for i, entry in enumerate(_cp_list(path)):
        where = f"entry {i}"
        require(entry, ["question_id", "image_id", "question", "coco_split"], str(path), where)
        question = VQAQuestion(int_field(entry, "question_id", str(path), where), id_field(entry, "image_id",
                               str(path), where), str_field(entry, "question", str(path), where))
        question.coco_split = _coco_split(entry, path, where)
        questions.append(question)
    if grounding:
        attach_grounding(questions, root / CP_FILES.format(split=split, kind="grounding"))
    path = root / CP_FILES.format(split=split, kind="annotations")
    entries = _cp_list(path)
    for i, entry in enumerate(entries):
        require(entry, ["question_id", "answers", "question_type", "answer_type", "coco_split"], str(path),
                f"entry {i}")
        _coco_split(entry, path, f"entry {i}")
    kept = sorted(attach_entries(questions, entries, path), key=lambda q: q.question_id)
    if split == "train" and not kept:
        raise DataError(f"{path}: the train split has no annotated questions")
    return kept


def build_vocabulary(questions: list[VQAQuestion], min_count: int) -> list[str]:
    """Answers that are the consensus answer of at least `min_count` questions, most frequent first."""
    counts = Counter(vocabulary_key(q.consensus) for q in questions if q.consensus)
    counts.pop("", None)
    vocabulary = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    if not vocabulary:
        raise ConfigError(f"data.min_answer_count={min_count}: no answer occurs that often; lower it")
    return vocabulary


def checkpoint_answers(directory: str | None) -> list[str] | None:
    """The answer list saved in a VQA checkpoint's config.json (id2label), or None for other checkpoints."""
    if not directory or not (Path(directory) / "config.json").is_file():
        return None
    return config_answers(load_json(Path(directory) / "config.json"))


def soft_target(answers: list[str], label_of: Mapping[str, int]) -> dict[int, float]:
    """{label: soft score} of one question's human answers (answers outside the vocabulary are dropped)."""
    counts = Counter(vocabulary_key(a) for a in answers)
    return {label_of[a]: soft_score(c) for a, c in counts.items() if a in label_of}


def read_split(root: str | Path, split: str, minval_size: int = 3000, layout: str = "vqa",
               grounding: bool = False) -> list[VQAQuestion]:
    """The questions of a split (annotated for train/val/trainval/minval), sorted by question_id; `layout`
    "vqa-cp" reads VQA-CP v2's train / test files instead; `grounding` also reads the grounding files' boxes."""
    if layout == "vqa-cp":
        return read_cp_split(root, split, grounding)
    root = Path(root)
    if split not in SPLITS:
        raise ConfigError(f"unknown VQA split {split!r}; choose one of {', '.join(SPLITS)}")

    def annotated(subset: str) -> list[VQAQuestion]:
        questions = read_questions(root / QUESTION_FILES[subset])
        if grounding:
            attach_grounding(questions, root / GROUNDING_FILES[subset])
        return sorted(attach_annotations(questions, root / ANNOTATION_FILES[subset]), key=lambda q: q.question_id)

    if split == "test":
        return sorted(read_questions(root / QUESTION_FILES["test2015"]), key=lambda q: q.question_id)
    if split == "test-dev":
        return sorted(read_questions(root / QUESTION_FILES["test-dev2015"]), key=lambda q: q.question_id)
    if split == "train":
        train = annotated("train2014")
        if not train:
            raise DataError(f"{root / ANNOTATION_FILES['train2014']}: the train split has no annotated questions")
        return train
    val = annotated("val2014")
    if split == "val":
        return val
    minval = val[-minval_size:] if minval_size > 0 else []
    if split == "minval":
        return minval
    held_out = {q.question_id for q in minval}
    return annotated("train2014") + [q for q in val if q.question_id not in held_out]  # trainval


@dataclass
class VQADataConfig(FinetuneDataConfig):
    max_text_length: int = 23
    train_split: str = "trainval"
    val_split: str = "minval"
    min_answer_count: int = 9
    minval_size: int = 3000
    extend_answers: bool = True  # fine-tuning from a labelled head: append the data's new answers (evaluate: off)
    format: str = "vqa"  # vqa (VQA v2 files) | vqa-cp (VQA-CP v2 files)
    prior_root: str | None = None  # the folder whose train split gives the question-type prior (default: root)
    grounding_weight: float = 0.0  # > 0: region supervision from the grounding files (tasks/region_supervision.py)

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.grounding_weight, (int, float)) and math.isfinite(self.grounding_weight)
                and self.grounding_weight >= 0):
            raise ConfigError(f"data.grounding_weight must be a number >= 0, got {self.grounding_weight!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        splits = CP_SPLITS if self.format == "vqa-cp" else SPLITS
        for key in ("train_split", "val_split"):
            if getattr(self, key) not in splits:
                raise ConfigError(f"data.{key}: {getattr(self, key)!r} is not a {self.format} split; choose one of "
                                  f"{', '.join(splits)}")


@dataclass
class VQACPDataConfig(VQADataConfig):
    format: str = "vqa-cp"
    train_split: str = "train"
    val_split: str = "test"


@dataclass
class VQAConfig(FinetuneConfig):
    """A VQA fine-tuning run (tasks/configs/vqa.yaml)."""

    data: VQADataConfig = field(default_factory=VQADataConfig)


@dataclass
class VQACPConfig(VQAConfig):
    """A VQA-CP v2 fine-tuning run (tasks/configs/vqa-cp.yaml)."""

    data: VQADataConfig = field(default_factory=VQACPDataConfig)


class VQADataset(TaskDataset):
    """One item per question: tokenised question, the image's regions, soft-score target."""

    def __init__(self, questions, store, tokenizer, label_of, max_text_length, max_regions, source, strict=False,
                 prior_row: Callable[[str], int] | None = None, grounding: bool = False):
        resolve = image_key_resolver(store.ids)
        kept = keep_known_images(questions, lambda q: q.image_id, resolve, source, "questions", strict)
        self.questions = [q for q, _ in kept]
        self.image_keys = [sid for _, sid in kept]
        self.image_ids = [(key,) for key in self.image_keys]
        self.text = tokenizer.encode([q.question for q in self.questions], max_text_length)
        self.text_lengths = self.text.attention_mask.sum(1)
        self.region_counts = visual_rows(store, self.image_ids, max_regions)
        self.targets = [soft_target(q.answers, label_of) for q in self.questions]
        self.prior_rows = [prior_row(q.question_type) if prior_row else -1 for q in self.questions]
        self.store, self.num_labels, self.max_regions = store, len(label_of), max_regions
        self.grounding = grounding  # items carry "grounding": their target rows (tasks/data/grounding.py)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        target = torch.zeros(self.num_labels)
        for label, score in self.targets[index].items():
            target[label] = score
        regions = self.store.read(self.image_keys[index], float32=False, optional=())
        visual = visual_input(regions, self.max_regions)
        item = {
            "question_id": self.questions[index].question_id,
            "input_ids": torch.from_numpy(self.text.input_ids[index]),
            "attention_mask": torch.from_numpy(self.text.attention_mask[index]),
            "token_type_ids": torch.from_numpy(self.text.token_type_ids[index]),
            "visual": visual,
            "target": target,
            "prior_row": self.prior_rows[index],  # the question type's row of the answer prior (lmh), else -1
        }
        if self.grounding:
            rows = target_rows(self.questions[index].box, regions.boxes[: visual.num_boxes])
            item["grounding"] = torch.from_numpy(rows)
        return item


def collate_vqa(samples: list[dict]) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in
             ("input_ids", "attention_mask", "token_type_ids", "target")}
    batch["question_id"] = torch.tensor([s["question_id"] for s in samples])
    batch["prior_row"] = torch.tensor([s["prior_row"] for s in samples])
    batch.update(collate_visual([s["visual"] for s in samples]))
    if "grounding" in samples[0]:  # target rows, padded like the regions
        rows = torch.zeros(batch["region_mask"].shape, dtype=torch.bool)
        for i, s in enumerate(samples):
            rows[i, : len(s["grounding"])] = s["grounding"]
        batch["grounding"] = rows
    return batch


class VQATask(FinetuneTask):
    """VQA v2 fine-tuning and evaluation (main metric: the official accuracy on the validation split)."""

    name = "vqa"
    main_metric = "accuracy"
    higher_is_better = True
    config_class = VQAConfig
    predict_modes = ("question",)
    example_inputs = ExampleInputs("question", example_text="what color is the circle")
    head = "answer_logits"
    metric_labels = {"accuracy": "VQA accuracy"}
    checkpoint_overrides = ("data.extend_answers=false",)  # the checkpoint's answers as they are
    debias_supported = True
    padded_keys = {**MODEL_PADDED_KEYS, "grounding": (REGIONS, False)}  # one target flag per region row
    data: VQADataConfig

    def __init__(self, config: VQAConfig):
        super().__init__(config)
        self._store = None
        self._questions: dict[str, list[VQAQuestion]] = {}
        self.answers: list[str] | None = None
        self.init_answers: list[str] | None = None  # the initial checkpoint's labelled answers
        self._answer_prior: AnswerPrior | None = None
        self._prior_answers: dict[str, str] | None = None

    # ------------------------------------------------------------------ data

    def questions(self, split: str) -> list[VQAQuestion]:
        split = resolve_split(self.data, split)
        if split not in self._questions:
            self._questions[split] = read_split(self.data.root, split, self.data.minval_size, self.data.format,
                                                self.data.grounding_weight > 0)
        return self._questions[split]

    def training_questions(self) -> list[VQAQuestion]:
        """The training split's questions, from `data.prior_root` when set (a split folder without train files)."""
        if not self.data.prior_root:
            return self.questions("train")
        return read_split(self.data.prior_root, self.data.train_split, self.data.minval_size, self.data.format)

    def vocabulary(self) -> list[str]:
        """The answer list: the initial checkpoint's (config id2label) when it has one, then (when fine-tuning) the
        data's answers it lacks; else built from train+val. A converted head without labels is refused."""
        if self.answers is None:
            init = self.config.model.init
            require_answer_labels(init)
            self.init_answers = checkpoint_answers(init)
            if self.init_answers is None or self.data.extend_answers:
                if self.data.format == "vqa-cp":  # VQA-CP's test answers are what the model must not see
                    source = read_split(self.data.root, "train", layout="vqa-cp")
                else:
                    source = read_split(self.data.root, "train") + read_split(self.data.root, "val")
                built = build_vocabulary(source, self.data.min_answer_count)
                logger.info("answer vocabulary: %d answers given by >= %d questions",
                            len(built), self.data.min_answer_count)
            if self.init_answers is None:
                self.answers = built
            elif self.data.extend_answers:
                self.answers = extend_answers(self.init_answers, built)
                logger.info("answers: %d from %s in its order, %d new appended", len(self.init_answers), init,
                            len(self.answers) - len(self.init_answers))
            else:
                self.answers = self.init_answers
        return self.answers

    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = self.open_store(self.data.features)
        return self._store

    def dataset(self, split: str) -> Dataset:
        label_of = {answer: i for i, answer in enumerate(self.vocabulary())}
        prior_row = self.answer_prior().row if self.data.debias == "lmh" else None
        grounding = self.data.grounding_weight > 0 and resolve_split(self.data, split) == self.data.train_split
        if grounding and not any(q.box is not None for q in self.questions(split)):
            raise ConfigError(f"data.grounding_weight={self.data.grounding_weight}: no question of the "
                              f"{self.data.train_split} split in {self.data.root} has a grounding box (its "
                              "*_grounding.json files are missing or empty); set it to 0 or add them")
        return VQADataset(self.questions(split), self.store(), self.tokenizer(), label_of,
                          self.data.max_text_length, self.data.max_regions, f"{self.data.root} ({split})",
                          self.data.strict, prior_row, grounding)

    def answer_prior(self) -> AnswerPrior:
        """The per-question-type answer prior of the training split (soft targets averaged per type), for lmh."""
        if self._answer_prior is None:
            label_of = {answer: i for i, answer in enumerate(self.vocabulary())}
            questions = self.training_questions()
            self._answer_prior = AnswerPrior([q.question_type for q in questions],
                                             [soft_target(q.answers, label_of) for q in questions], len(label_of))
        return self._answer_prior

    def prior_answers(self) -> dict[str, str]:
        """{question type: its most frequent consensus answer among the training questions} ("" = any type)."""
        if self._prior_answers is None:
            questions = self.training_questions()
            by_type: dict[str, Counter] = {}
            for q in questions:
                by_type.setdefault(q.question_type, Counter())[vocabulary_key(q.consensus)] += 1
            overall = Counter(vocabulary_key(q.consensus) for q in questions)
            self._prior_answers = {t: _most_frequent(c) for t, c in by_type.items()}
            self._prior_answers.setdefault("", _most_frequent(overall))
        return self._prior_answers

    def prior_answer(self, question: VQAQuestion) -> str:
        prior = self.prior_answers()
        return prior.get(question.question_type, prior[""])

    def collate(self, samples: list) -> dict:
        return cut_to_longest(collate_vqa(samples), self.padded_keys)

    # ------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        """The task model; its config's id2label carries the answer list, so checkpoints know their labels."""
        answers = self.vocabulary()
        model = build_task_model(self.config.model, id2label=dict(enumerate(answers)),
                                 label2id={a: i for i, a in enumerate(answers)},
                                 **debiasing.model_settings(self.data.debias, len(answers)))
        check_model(model.config, self.data.grounding_weight)
        if self.init_answers is not None and answers != self.init_answers:  # rows follow their answers
            old = checkpoint_classifier(self.config.model.init)
            carry_answer_rows(model.answer_head.classifier, old, self.init_answers, answers)
        return model

    def label_counts(self, batch: Mapping[str, Any]) -> dict[str, int]:
        """The answer loss over every question; with region supervision, its term over the grounded ones."""
        counts = {"loss": int(batch["input_ids"].shape[0])}
        if self.data.grounding_weight > 0:
            counts["grounding"] = int(batch["grounding"].any(dim=1).sum())
        return counts

    def training_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> StepOutput:
        ids = self.task_ids(model, batch["input_ids"].shape[0], batch["input_ids"].device)
        mode = self.data.debias
        grounded = self.data.grounding_weight > 0
        out = model(**model_inputs(batch), task_ids=ids, heads=debiasing.heads(mode, "answer_logits"),
                    output_attentions=grounded)
        best = out.answer_logits.argmax(dim=1, keepdim=True)
        score = batch["target"].gather(1, best).mean()  # the reference's in-training soft accuracy
        prior = self.answer_prior() if mode == "lmh" else None
        loss = debiasing.debias_loss(mode, out, "answer_logits", batch["target"], batch["prior_row"], prior,
                                     self.data.debias_entropy_weight)
        if not grounded:
            return StepOutput({"loss": loss}, metrics={"soft_accuracy": score.detach()})
        per_question = grounding_loss(out.text_to_vision_attentions, batch["attention_mask"], batch["grounding"])
        return StepOutput({"loss": loss, "grounding": self.data.grounding_weight * per_question.sum()},
                          metrics={"soft_accuracy": score.detach()})

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str, progress: Callable | None = None) -> list[dict]:
        """[{"question_id", "answer", "score"}] for every question of the split whose image has features."""
        answers = self.vocabulary()
        dataset = self.dataset(split)
        order = length_order(dataset)
        predictions = []
        for batch in eval_batches(model, dataset, self.collate, self.data.eval_batch_size, progress, order):
            ids = self.task_ids(model, batch["input_ids"].shape[0], batch["input_ids"].device)
            logits = model(**model_inputs(batch), task_ids=ids, heads=["answer_logits"]).answer_logits
            probs, labels = torch.sigmoid(logits.float()).max(dim=1)
            for qid, label, prob in zip(batch["question_id"].tolist(), labels.tolist(), probs.tolist(), strict=True):
                predictions.append({"question_id": qid, "answer": answers[label], "score": prob})
        return in_dataset_order(predictions, order)

    def score(self, predictions: list[dict], split: str) -> dict[str, float]:
        """Official accuracy over every question of the split: one without features (no prediction) counts as
        wrong, and `num_without_features` says how many there were."""
        questions = self.questions(split)
        if not questions or not questions[0].answers:
            return {"num_questions": float(len(predictions))}
        annotations = [{"question_id": q.question_id, "answers": [{"answer": a} for a in q.answers],
                        "answer_type": q.answer_type, "question_type": q.question_type} for q in questions]
        answered = {int(p["question_id"]): p["answer"] for p in predictions}
        unanswered = [q.question_id for q in questions if q.question_id not in answered]
        result = vqa_score({**answered, **dict.fromkeys(unanswered, "")}, annotations)  # "" matches no human answer
        metrics = {"accuracy": result["overall"], "num_questions": float(result["num_questions"]),
                   "num_without_features": float(len(unanswered))}
        metrics.update({f"accuracy/{name}": value for name, value in result["per_answer_type"].items()})
        metrics.update({f"question_type/{name}": value for name, value in result["per_question_type"].items()})
        metrics.update(self.bias_metrics(questions, answered, annotations))
        return metrics

    def bias_metrics(self, questions: list[VQAQuestion], answered: Mapping[int, str],
                     annotations: list[dict]) -> dict[str, float]:
        """The question-only prior's accuracy (overall, per answer and question type) and the share of answered
        questions whose answer is the prior's (`prior_agreement`, %)."""
        guesses = {q.question_id: self.prior_answer(q) for q in questions}
        prior = vqa_score(guesses, annotations)
        metrics = {"prior_accuracy": prior["overall"]}
        metrics.update({f"prior_accuracy/{name}": value for name, value in prior["per_answer_type"].items()})
        metrics.update({f"prior_question_type/{name}": value for name, value in prior["per_question_type"].items()})
        agree = [vocabulary_key(answered[q.question_id]) == guesses[q.question_id]
                 for q in questions if q.question_id in answered]
        metrics["prior_agreement"] = 100.0 * sum(agree) / len(agree) if agree else 0.0
        return metrics

    def chance(self, split: str, train: VQATask | None = None) -> dict[str, float]:
        """The question-only prior's accuracy on the split: each question gets its type's most frequent answer in
        the training split of `train` (default this task); empty on unannotated splits."""
        questions = self.questions(split)
        if not questions or not questions[0].answers:
            return {}
        source = train or self
        annotations = [{"question_id": q.question_id, "answers": [{"answer": a} for a in q.answers]}
                       for q in questions]
        return {"accuracy": vqa_score({q.question_id: source.prior_answer(q) for q in questions},
                                      annotations)["overall"]}

    def report_lines(self, metrics: Mapping[str, float]) -> list[tuple[str, float, float | None]]:
        """Per answer and question type: (label, accuracy %, the prior's %), then the prior agreement."""
        rows = [(f"answer type {key.split('/', 1)[1]}", value, metrics.get(f"prior_{key}"))
                for key, value in sorted(metrics.items()) if key.startswith("accuracy/")]
        rows += [(f"question type '{key.split('/', 1)[1]}'", value, metrics.get(f"prior_{key}"))
                 for key, value in sorted(metrics.items()) if key.startswith("question_type/")]
        if "prior_agreement" in metrics:
            rows.append(("answer = the question-type prior's", metrics["prior_agreement"], None))
        return rows

    # ------------------------------------------------------------------ one image

    @torch.no_grad()
    def evaluation(self, model: nn.Module, split: str, progress: Callable | None = None, mode: str | None = None,
                   rerank_k: int = 32) -> tuple[Any, dict[str, Any]]:
        """VQA v2's test splits have no answers: their predictions file is the official submission."""
        if split not in ("test", "test-dev") or self.data.format == "vqa-cp":
            return super().evaluation(model, split, progress)
        result = submission(self.predict(model, split, progress), self.questions(split),
                            fallback=self.vocabulary()[0])
        return result, {"num_questions": len(result)}

    def predict_one(self, model: nn.Module, example: PredictExample) -> dict[str, Any]:
        """{"question", "answers": the top-k [{"answer", "score"}] by sigmoid(answer_logits), best first}.

        The answer list is `options["answers"]` when given, else the checkpoint's (config id2label).
        """
        answers = example.options.get("answers") or config_answers({"id2label": model.config.id2label})
        if answers is None:
            raise ConfigError("the checkpoint's config.json has no VQA answer list (id2label); pass --answers FILE")
        if len(answers) != model.config.num_labels:
            raise ConfigError(f"the answer list has {len(answers)} answers but the answer head has "
                              f"{model.config.num_labels} outputs")
        device = example.visual["region_features"].device
        text = self.tokenizer().encode([example.text], self.data.max_text_length).tensors(device)
        ids = self.task_ids(model, 1, device, example.task_token)
        logits = model(**text, **example.visual, task_ids=ids, heads=["answer_logits"]).answer_logits
        top_k = min(int(example.options.get("top_k", 5)), len(answers))
        scores, labels = torch.sigmoid(logits.float()[0]).topk(top_k)
        return {"question": example.text,
                "answers": [{"answer": answers[i], "score": p}
                            for p, i in zip(scores.tolist(), labels.tolist(), strict=True)]}

    def prediction_problem(self, model_config: Mapping[str, Any]) -> str | None:
        if config_answers(model_config) is None:
            return "config.json has no VQA answer list (id2label)"
        return None

    def headline(self, result: Mapping[str, Any]) -> str:
        best = result["answers"][0]
        return f"Q: {result['question']}  A: {best['answer']} ({best['score']:.2f})"

    def draw(self, example: PredictExample, result: Mapping[str, Any]) -> Image.Image:
        return draw_boxes(example.image, example.boxes, None, self.headline(result))

    def summary_lines(self, result: Mapping[str, Any]) -> list[str]:
        return [f"Q: {result['question']}",
                *(f"  {i + 1}. {a['answer']:<24} {a['score']:.3f}" for i, a in enumerate(result["answers"]))]


def _most_frequent(counts: Counter) -> str:
    """The most frequent key; ties go to the alphabetically first (deterministic)."""
    return min(counts, key=lambda key: (-counts[key], key)) if counts else ""


class VQACPTask(VQATask):
    """VQA-CP v2: VQA's model, vocabulary rule, metric and 12-in-1 token on the VQA-CP file layout (the
    config's `data.format: vqa-cp`; main metric: the official accuracy on the test split)."""

    name = "vqa-cp"
    config_class = VQACPConfig

    @property
    def task_token(self) -> str:
        return "vqa"


def submission(predictions: list[dict], questions: list[VQAQuestion], fallback: str) -> list[dict]:
    """The evaluation server's result list [{"question_id", "answer"}] covering every question of the split.

    Questions the model could not answer (their image has no features) get `fallback` (the most frequent
    answer) with a warning, because the server rejects files that miss questions.
    """
    answered = {p["question_id"]: p["answer"] for p in predictions}
    missing = [q.question_id for q in questions if q.question_id not in answered]
    if missing:
        logger.warning("%d question(s) had no features; answered %r", len(missing), fallback)
    return [{"question_id": q.question_id, "answer": answered.get(q.question_id, fallback)} for q in questions]
