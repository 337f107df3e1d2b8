"""What the other 12-in-1 tasks share: samples of (text, image) rows, their batches, heads, predictions, scores.

A task reads its benchmark's own annotation files into `Sample`s: the benchmark's item id, the text of each
model row, the image of each row, and the gold label. Most samples are one row; NLVR2 pairs its sentence with
the left and the right image (2 rows: `binary_logits` reads the two pooled products concatenated), VCR pairs
the question with each of its 4 options (4 rows: `pair_logit` as a 4-way choice).

Every task here follows one contract: `dataset(split)`, `collate(samples)`, `training_step(model, batch)`,
`predict(model, split) -> [dict]` (one JSON-serialisable dict per item, keyed by the benchmark's ids) and a pure
`score(predictions, split)` computing the official metric from predictions and annotations (`tasks.metrics`);
`evaluate` is `score(predict(...))`.

Missing images: a sample with an image that has no features is left out of the dataset, with one warning line
naming the ids (`data.strict: true` makes it an error); `score` counts it as wrong.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from tasks import debiasing
from tasks.data.annotations import image_key_resolver
from tasks.data.regions import collate_visual, visual_input, visual_rows
from tasks.data.tokenization import TextInput
from tasks.debiasing import AnswerPrior
from tasks.engine.distributed import move_to_device
from tasks.engine.evaluation import eval_batches, eval_mode, in_dataset_order, model_device
from tasks.engine.padding import cut_to_longest
from tasks.engine.sampler import length_order
from tasks.engine.task import PredictExample, StepOutput, TaskDataset
from tasks.errors import AnnotationError, ConfigError, DataError
from tasks.figures.drawing import draw_pictures
from tasks.finetuning import (
    FinetuneDataConfig,
    FinetuneTask,
    model_inputs,
    resolve_split,
    soft_bce_sum,
)
from tasks.metrics import accuracy

if TYPE_CHECKING:
    from features.store import FeatureStore, Regions
    from tasks.data.regions import VisualInput
    from tasks.data.tokenization import TextInput, Tokenizer

logger = logging.getLogger(__name__)

Text = str | tuple[str, str]  # a sentence, or a sentence pair (segments 0 and 1)


@dataclass
class Sample:
    """One benchmark item as model rows: `texts[i]` is read with image `images[i]`."""

    id: Any  # the benchmark's item id (JSON-serialisable)
    texts: list[Text]
    images: list[str]  # the annotation's image id of each row
    label: Any = None  # gold label; None on unlabelled (test) splits
    extra: dict = field(default_factory=dict)  # task-specific annotation (candidate boxes, ...)


@dataclass
class ImageTextDataConfig(FinetuneDataConfig):
    """The data settings of the 12-in-1 image-text tasks (`strict` is every fine-tuning task's)."""


def encode_texts(tokenizer: Tokenizer, texts: Sequence[Text], max_length: int) -> TextInput:
    """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` (segment ids 0 then 1) arrays of exactly `max_length`.

    A pair is truncated longest-first, as BERT's sentence-pair tasks do.
    """
    if all(isinstance(text, str) for text in texts):
        return tokenizer.encode(list(texts), max_length)
    firsts = [text[0] if isinstance(text, tuple) else text for text in texts]
    seconds = [text[1] if isinstance(text, tuple) else "" for text in texts]
    encoded = tokenizer.backend(firsts, seconds, max_length=max_length, padding="max_length",
                                truncation="longest_first", return_tensors="np", return_token_type_ids=True,
                                return_attention_mask=True)
    return TextInput(encoded["input_ids"].astype("int64"), encoded["attention_mask"].astype("int64"),
                     encoded["token_type_ids"].astype("int64"))


def read_json_lines(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file; errors name the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text ({error})") from error
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise AnnotationError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
    return entries


def known_samples(samples: list[Sample], store_ids: Sequence[str], source: str, strict: bool = False,
                  exact_ids: bool = False) -> list[tuple[Sample, list[str]]]:
    """(sample, its rows' store ids) for the samples whose every image has features.

    Image ids match store ids exactly, or (unless `exact_ids`) by their trailing number (`image_key_resolver`).
    The others are dropped with one warning line naming (up to five of) the missing image ids, or, with
    `strict`, refused with a DataError naming them; an empty split or one left empty is a DataError.
    """
    if not samples:
        raise DataError(f"{source}: the split has no items")
    exact = set(store_ids)
    resolve = (lambda image: image if image in exact else None) if exact_ids else image_key_resolver(store_ids)
    kept, missing, dropped = [], set(), 0
    for sample in samples:
        keys = [resolve(image) for image in sample.images]
        if any(key is None for key in keys):
            missing.update(str(image) for image, key in zip(sample.images, keys, strict=True) if key is None)
            dropped += 1
            continue
        kept.append((sample, keys))
    if missing:
        names = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        if strict:
            raise DataError(f"{source}: {len(missing)} image id(s) not in the feature store: {names}")
        logger.warning("%s: %d item(s) skipped (counted wrong): %d image id(s) not in the feature store: %s",
                       source, dropped, len(missing), names)
    if not kept:
        raise DataError(f"{source}: none of the {len(samples)} items has its image(s) in the feature store")
    return kept


class SampleDataset(TaskDataset):
    """The samples of a split whose images have features; items are encoded by the task."""

    def __init__(self, task: ImageTextTask, kept: list[tuple[Sample, list[str]]], store: FeatureStore):
        self.task, self.store = task, store
        self.samples = [sample for sample, _ in kept]
        self.keys = [keys for _, keys in kept]
        self.image_ids = [tuple(keys) for keys in self.keys]
        self.region_counts = visual_rows(store, self.image_ids, task.data.max_regions)
        self._text_lengths: np.ndarray | None = None

    @property
    def text_lengths(self) -> np.ndarray:
        """`[N]` tokens of each item's longest text row (tokenised once, on first use: only length grouping and
        sorted evaluation ask)."""
        if self._text_lengths is None:
            rows = [text for sample in self.samples for text in sample.texts]
            tokens = encode_texts(self.task.tokenizer(), rows, self.task.data.max_text_length).attention_mask.sum(1)
            ends = np.cumsum([len(sample.texts) for sample in self.samples])
            self._text_lengths = np.array([tokens[end - len(s.texts):end].max() for s, end in
                                           zip(self.samples, ends, strict=True)], dtype=np.int64)
        return self._text_lengths

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        regions = [self.store.read(key, float32=False, optional=()) for key in self.keys[index]]
        sample = self.samples[index]
        return {"index": index, "prior_row": self.task.prior_row(sample), **self.task.encode(sample, regions)}


class ImageTextTask(FinetuneTask):
    """A task whose samples are (text, image) rows scored by one head; subclasses read files and pick heads.

    Subclasses set `name` (also the 12-in-1 task token), `head` and `split_files` (or define `annotation_file(split)`),
    and define `read_samples(split)`,
    `target(sample)` (the loss target of one sample), `decode(sample, logits)` (one prediction dict) and
    `gold(split)` / `predicted_label(prediction)` (what `score` compares); `logits` and `loss` have defaults for
    a classifier head read per sample.
    """

    main_metric = "accuracy"
    higher_is_better = True
    split_files: Mapping[str, str] = {}  # split -> its annotation file under data.root (the default reader's)
    title: str = ""  # how messages name the benchmark (default: `name`)
    exact_image_ids: bool = False  # image ids whose trailing number is no id (NLVR2's "...-img0")
    data: ImageTextDataConfig

    def __init__(self, config: Any):
        super().__init__(config)
        self._store: FeatureStore | None = None
        self._samples: dict[str, list[Sample]] = {}
        self._answer_prior: AnswerPrior | None = None

    # ------------------------------------------------------------------ data

    def read_samples(self, split: str) -> list[Sample]:
        raise NotImplementedError

    def samples(self, split: str) -> list[Sample]:
        """The samples of a split (the roles train/val resolved through data.train_split/val_split), cached."""
        split = resolve_split(self.data, split)
        if split not in self._samples:
            self._samples[split] = self.read_samples(split)
        return self._samples[split]

    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = self.open_store(self.data.features)
        return self._store

    def annotation_file(self, split: str) -> Path:
        """The annotation file of a (resolved) split: `split_files[split]` under `data.root`."""
        if split not in self.split_files:
            raise ConfigError(f"unknown {self.title or self.name} split {split!r}; "
                              f"choose one of {', '.join(self.split_files)}")
        return Path(self.data.root) / self.split_files[split]

    def source(self, split: str) -> str:
        """How log lines and errors name the split: its annotation file."""
        return str(self.annotation_file(resolve_split(self.data, split)))

    def dataset(self, split: str) -> Dataset:
        kept = known_samples(self.samples(split), self.store().ids, self.source(split), self.data.strict,
                             self.exact_image_ids)
        return SampleDataset(self, kept, self.store())

    def visual(self, sample: Sample, regions: list[Regions]) -> list[VisualInput]:
        """The visual input of each row: IMG token + the image's first `max_regions - 1` boxes."""
        return [visual_input(image, self.data.max_regions) for image in regions]

    def encode(self, sample: Sample, regions: list[Regions]) -> dict:
        """One item: the rows' texts and visual inputs, the label and the loss target."""
        return {"texts": sample.texts, "visuals": self.visual(sample, regions), "target": self.target(sample)}

    # ------------------------------------------------------------------ answer prior (data.debias)

    def question_type(self, sample: Sample) -> str:
        """The sample's question type for the answer prior: `extra["question_type"]`, else "" (one prior)."""
        return str(sample.extra.get("question_type", ""))

    def answer_prior(self) -> AnswerPrior:
        """The training split's per-question-type answer prior (targets averaged per type), for `lmh`."""
        if self._answer_prior is None:
            samples = self.samples("train")
            targets = [self.target(s) for s in samples]
            rows = [{int(i): float(t[i]) for i in t.nonzero().flatten()} for t in targets]
            self._answer_prior = AnswerPrior([self.question_type(s) for s in samples], rows,
                                             int(targets[0].numel()) if targets else 0)
        return self._answer_prior

    def prior_row(self, sample: Sample) -> int:
        """The sample's row of the answer prior under `data.debias: lmh`, else -1."""
        return self.answer_prior().row(self.question_type(sample)) if self.data.debias == "lmh" else -1

    def target(self, sample: Sample) -> torch.Tensor:
        raise NotImplementedError

    def collate(self, samples: list) -> dict:
        texts = [text for s in samples for text in s["texts"]]
        encoded = encode_texts(self.tokenizer(), texts, self.data.max_text_length)
        batch = {"input_ids": torch.from_numpy(encoded.input_ids),  # [B·rows, L]
                 "attention_mask": torch.from_numpy(encoded.attention_mask),
                 "token_type_ids": torch.from_numpy(encoded.token_type_ids),
                 "target": torch.stack([s["target"] for s in samples]),
                 "index": torch.tensor([s["index"] for s in samples]),
                 # the answer prior's row (data.debias: lmh); items built by hand for prediction have none
                 "prior_row": torch.tensor([s.get("prior_row", -1) for s in samples])}
        batch.update(collate_visual([v for s in samples for v in s["visuals"]]))
        return cut_to_longest(batch, self.padded_keys)

    # ------------------------------------------------------------------ model

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor], heads: list[str] | None = None) -> Any:
        rows = batch["input_ids"].shape[0]
        ids = self.task_ids(model, rows, batch["input_ids"].device)
        return model(**model_inputs(batch), task_ids=ids, heads=heads or [self.head])

    def logits(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, C] scores of each sample's choices (classes, options or candidate boxes)."""
        return getattr(self.forward(model, batch), self.head).float()

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """BCE-with-logits against the (one-hot or soft) target summed over the batch's entries: the reference's
        classifier loss (mean x number of choices) times the batch size, which the engine divides out."""
        return soft_bce_sum(logits, batch["target"])

    def training_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> StepOutput:
        mode = self.data.debias
        if mode == "none":
            logits = self.logits(model, batch)
            loss = self.loss(logits, batch)
        else:  # an answer classifier (debias_supported): the mode's loss on its branches
            out = self.forward(model, batch, debiasing.heads(mode, self.head))
            logits = getattr(out, self.head).float()
            prior = self.answer_prior() if mode == "lmh" else None
            loss = debiasing.debias_loss(mode, out, self.head, batch["target"], batch["prior_row"], prior,
                                         self.data.debias_entropy_weight)
        hit = batch["target"].gather(1, logits.argmax(dim=1, keepdim=True))  # the reference's soft accuracy
        return StepOutput({"loss": loss}, metrics={"accuracy": hit.mean().detach()})

    # ------------------------------------------------------------------ evaluation

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        """One prediction dict from a sample's scores [C] (float, CPU)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str, progress: Callable | None = None) -> list[dict]:
        """One prediction dict per item of the split whose images have features."""
        dataset = self.dataset(split)
        order = length_order(dataset)
        predictions = []
        for batch in eval_batches(model, dataset, self.collate, self.data.eval_batch_size, progress, order):
            logits = self.logits(model, batch).cpu()
            for row, index in enumerate(batch["index"].tolist()):
                predictions.append(self.decode(dataset.samples[index], logits[row]))
        return in_dataset_order(predictions, order)

    # ------------------------------------------------------------------ one example

    def example_sample(self, example: PredictExample) -> Sample:
        """The benchmark sample one user example stands for; each row's image is an index into `example.images`.

        Default: one row, the example's text with its image. NLVR2 reads the text with both images, VCR pairs
        the question with each candidate answer, pointing tasks choose among the image's boxes.
        """
        return Sample("example", [example.text or ""], ["0"])

    def choice_labels(self, sample: Sample) -> list[str]:
        """The name of each of a sample's scores, in logit order (answers, classes, options, boxes)."""
        raise NotImplementedError(f"task {self.name!r} does not name its choices")

    def choice_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[C] each choice's score from a sample's logits: the sigmoid of BCE-trained heads (VCR: a softmax)."""
        return torch.sigmoid(logits)

    @torch.no_grad()
    def predict_one(self, model: nn.Module, example: PredictExample) -> dict[str, Any]:
        """{"text", "answers": the top-k choices [{"answer", "score"}] best first, "prediction": what `predict`
        writes for the same item} for one example, encoded exactly as an evaluation sample."""
        sample = self.example_sample(example)
        regions = [example.images[int(key)].regions for key in sample.images]
        batch = move_to_device(self.collate([{"index": 0, **self.encode(sample, regions)}]), model_device(model))
        with eval_mode(model):
            logits = self.logits(model, batch).float().cpu()[0]
        labels = self.choice_labels(sample)
        scores = self.choice_scores(logits)[: len(labels)]
        order = torch.argsort(scores, descending=True, stable=True)[: int(example.options.get("top_k", 5))]
        return {"text": example.text, "answers": [{"answer": labels[i], "score": scores[i].item()} for i in order],
                "prediction": self.decode(sample, logits)}

    def headline(self, result: Mapping[str, Any]) -> str:
        best = result["answers"][0]
        return f"{result['text']} -> {best['answer']} ({best['score']:.2f})"

    def summary_lines(self, result: Mapping[str, Any]) -> list[str]:
        return [f"{self.example_inputs.text if self.example_inputs else 'text'}: {result['text']}",
                *(f"  {i + 1}. {a['answer']:<24} {a['score']:.3f}" for i, a in enumerate(result["answers"]))]

    def draw(self, example: PredictExample, result: Mapping[str, Any]) -> Any:
        """The image(s) side by side with their regions, the headline below."""
        return draw_pictures([(image.image, image.boxes) for image in example.images], None, self.headline(result))

    def gold(self, split: str) -> dict:
        """{item id: gold label} of the whole split (items with missing images included)."""
        return {sample.id: sample.label for sample in self.samples(split)}

    def predicted_label(self, prediction: Mapping) -> Any:
        return prediction["label"]

    def id_of(self, prediction: Mapping) -> Any:
        return prediction["id"]

    def chance(self, split: str, train: ImageTextTask | None = None) -> dict[str, float]:
        """Accuracy of always giving the most frequent training label (a blind guess)."""
        majority = Counter(s.label for s in (train or self).samples("train")).most_common(1)[0][0]
        gold = self.gold(split)
        return {"accuracy": 100 * sum(label == majority for label in gold.values()) / len(gold)}

    def score(self, predictions: list[dict], split: str) -> dict[str, float]:
        """Accuracy over every labelled item of the split; an unlabelled split reports only the count."""
        gold = self.gold(split)
        if any(label is None for label in gold.values()):
            return {"num_predictions": float(len(predictions))}
        predicted = {self.id_of(p): self.predicted_label(p) for p in predictions}
        return {"accuracy": accuracy(predicted, gold), "num_items": float(len(gold)),
                "num_predictions": float(len(predictions))}


class AnswerTask(ImageTextTask):
    """An image-text task answering from a fixed answer list (GQA, Visual Genome QA): a one-hot target over the
    list, BCE on the head's scores. Subclasses say where the list comes from (`load_answers`)."""

    def __init__(self, config: Any):
        super().__init__(config)
        self._answers: list[str] | None = None
        self._label_of: dict[str, int] = {}

    def load_answers(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> list[str]:
        """The answer list (label order), read once."""
        if self._answers is None:
            self._answers = self.load_answers()
            self._label_of = {answer: i for i, answer in enumerate(self._answers)}
        return self._answers

    def target(self, sample: Sample) -> torch.Tensor:
        answers = self.answers()
        return one_hot(self._label_of.get(sample.label), len(answers))


def frequent_answers(labels: Iterable[str], min_count: int) -> list[str]:
    """The answers given at least `min_count` times, most frequent first (ties alphabetically); none is a
    ConfigError naming data.min_answer_count."""
    counts = Counter(labels)
    answers = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    if not answers:
        raise ConfigError(f"data.min_answer_count={min_count}: no answer occurs that often in the train split")
    return answers


def one_hot(label: int | None, size: int) -> torch.Tensor:
    """[size] float target with 1 at `label` (all zeros for None: an unlabelled item)."""
    target = torch.zeros(size)
    if label is not None:
        target[label] = 1.0
    return target
