"""VCR (Visual Commonsense Reasoning): pick the answer (Q→A) and then the rationale (QA→R) among four.

Files (in `data.root`, as released): `{train,val,test}.jsonl`, one item a line: {"annot_id", "objects" (the
detections' class names), "img_fn", "question", "answer_choices" (4), "answer_label", "rationale_choices" (4),
"rationale_label"}. Question, answers and rationales are token lists in which a detection tag is a list of
object indices ([0, 2]). The per-image metadata JSON (`metadata_fn`: boxes, names) is not read: the feature
stores carry the boxes and "objects" the names.

Text (as the original's vilbert/datasets/vcr_dataset.py): tags become the objects' names joined by "and"; a
"person" becomes a name, here the index-th of a fixed list of gender-neutral names (the reference draws them at
random from a table), so a person keeps one name within an item. Q→A reads (question, answer i) as a sentence
pair (segments 0 / 1);
QA→R reads (question + correct answer, rationale i). Regions: the detected store(s) `data.features` joined with
the ground-truth-box store(s) `data.gt_features`, as the reference merges them. The image id is `img_fn`'s stem.

Model (12-in-1 tasks 5 and 6): `pair_logit` of the 4 rows as a 4-way choice, cross-entropy. Metrics: Q→A
(`vcr-qa`) or QA→R (`vcr-qar`) accuracy; Q→AR needs both tasks' predictions: `joint_scores`. Predictions
[{"annot_id", "choice", "probabilities"}].

Leaderboard (`vilbert vcr-submission`): the test split has no labels, so QA→R is read four times, once with each
answer choice in the context (`data.condition_on_answer`); `leaderboard_rows` joins the Q→A probabilities and the
four conditioned rationale distributions into the columns the VCR leaderboard's CSV asks for (annot_id,
answer_0..3, rationale_conditioned_on_a{i}_{j}); the server takes the argmax answer, then the argmax rationale
conditioned on the correct answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.data.annotations import require
from tasks.engine.task import ExampleInputs, PredictExample
from tasks.errors import AnnotationError, ConfigError, DataError
from tasks.finetuning import FinetuneConfig
from tasks.image_text import ImageTextDataConfig, ImageTextTask, Sample, one_hot, read_json_lines
from tasks.metrics import vcr_scores

NAMES = ("Casey", "Riley", "Jordan", "Avery", "Quinn", "Jessie", "Rowan", "Skyler", "Taylor", "Morgan", "Alex",
         "Jamie", "Kendall", "Peyton", "Reese", "Dakota")
SPLITS = ("train", "val", "test")


def object_names(objects: list[str]) -> list[str]:
    """What each detection is called in the text: its class, or for the k-th person the k-th name."""
    names, people = [], 0
    for name in objects:
        if name == "person":
            names.append(NAMES[people % len(NAMES)])
            people += 1
        else:
            names.append(str(name))
    return names


def detokenize(tokens: list, names: list[str], where: str) -> str:
    """A VCR token list as text, detection tags ([0, 2]) replaced by "name0 and name2"."""
    words = []
    for token in tokens:
        if isinstance(token, list):
            if any(not isinstance(i, int) or not 0 <= i < len(names) for i in token):
                raise AnnotationError(f"{where} tags object {token}, but the item has {len(names)} objects")
            words.append(" and ".join(names[i] for i in token))
        else:
            words.append(str(token))
    return " ".join(words)


def read_vcr(path: str | Path, mode: str, answer: int | None = None) -> list[Sample]:
    """One sample per item: 4 (context, option) rows; mode "answer" (Q→A) or "rationale" (QA→R).

    QA→R puts the correct answer in the context, or answer choice `answer` when given (unlabelled test items).
    """
    samples = []
    for number, item in read_json_lines(path):
        where = f"{path}: line {number}"
        require(item, ["annot_id", "objects", "img_fn", "question", "answer_choices"], str(path), f"line {number}")
        names = object_names(item["objects"])
        question = detokenize(item["question"], names, where)
        answers = [detokenize(a, names, where) for a in item["answer_choices"]]
        if mode == "answer":
            context, options, label = question, answers, item.get("answer_label")
        else:
            require(item, ["rationale_choices"], str(path), f"line {number}")
            if answer is None and item.get("answer_label") is None:
                raise AnnotationError(f"{where} has no answer_label; QA→R needs the correct answer "
                                      "(or data.condition_on_answer for the leaderboard's conditioned rationales)")
            chosen = int(item["answer_label"]) if answer is None else answer
            if not 0 <= chosen < len(answers):
                raise AnnotationError(f"{where} has {len(answers)} answer choices; answer {chosen} does not exist")
            context = f"{question} {answers[chosen]}"
            options = [detokenize(r, names, where) for r in item["rationale_choices"]]
            label = item.get("rationale_label")
        if len(options) != 4:
            raise AnnotationError(f"{where} has {len(options)} {mode} choices; expected 4")
        image = Path(str(item["img_fn"])).stem
        samples.append(Sample(str(item["annot_id"]), [(context, option) for option in options], [image] * 4,
                              None if label is None else int(label)))
    return samples


@dataclass
class VCRDataConfig(ImageTextDataConfig):
    gt_features: list[str] = field(default_factory=list)  # GT-box store(s), joined after the detected ones
    max_text_length: int = 60
    train_split: str = "train"
    val_split: str = "val"
    condition_on_answer: int | None = None  # QA→R: this answer choice in every context instead of the correct one

    def validate(self) -> None:
        if self.condition_on_answer is not None and self.condition_on_answer not in range(4):
            raise ConfigError(f"data.condition_on_answer must be 0, 1, 2 or 3, got {self.condition_on_answer}")


@dataclass
class VCRConfig(FinetuneConfig):
    """A VCR fine-tuning run (tasks/configs/vcr-qa.yaml, vcr-qar.yaml)."""

    data: VCRDataConfig = field(default_factory=VCRDataConfig)


class VCRTask(ImageTextTask):
    """Q→A; `VCRRationaleTask` is QA→R."""

    name = "vcr-qa"
    head = "pair_logit"
    example_inputs = ExampleInputs("question", "answers", 4, example_text="why is the circle red?")
    mode = "answer"
    metric = "q_a"
    config_class = VCRConfig
    data: VCRDataConfig

    def annotation_file(self, split: str) -> Path:
        if split not in SPLITS:
            raise ConfigError(f"unknown VCR split {split!r}; choose one of {', '.join(SPLITS)}")
        return Path(self.data.root) / f"{split}.jsonl"

    def read_samples(self, split: str) -> list[Sample]:
        answer = self.data.condition_on_answer if self.mode == "rationale" else None
        return read_vcr(self.annotation_file(split), self.mode, answer)

    def store(self):
        if self._store is None:
            self._store = self.open_store(list(self.data.features) + list(self.data.gt_features))
        return self._store

    def example_sample(self, example: PredictExample) -> Sample:
        """The question paired with each of the 4 candidates, all on the one image."""
        return Sample("example", [(example.text or "", option) for option in example.candidates], ["0"] * 4)

    def choice_labels(self, sample: Sample) -> list[str]:
        return [option for _, option in sample.texts]

    def choice_scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=0)  # trained as a 4-way choice (cross-entropy)

    def target(self, sample: Sample) -> torch.Tensor:
        return one_hot(sample.label, 4)

    def logits(self, model, batch) -> torch.Tensor:
        return self.forward(model, batch).pair_logit.float().view(-1, 4)  # [B, 4]

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, batch["target"].argmax(dim=1), reduction="sum")

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        return {"annot_id": sample.id, "choice": int(logits.argmax()),
                "probabilities": [round(p, 5) for p in torch.softmax(logits, dim=0).tolist()]}

    def id_of(self, prediction: dict) -> str:
        return prediction["annot_id"]

    def predicted_label(self, prediction: dict) -> int:
        return prediction["choice"]

    def score(self, predictions: list[dict], split: str) -> dict[str, float]:
        metrics = super().score(predictions, split)
        if "accuracy" in metrics:
            metrics[self.metric] = metrics["accuracy"]
        return metrics


class VCRRationaleTask(VCRTask):
    name = "vcr-qar"
    mode = "rationale"
    example_inputs = ExampleInputs("question and its answer", "rationales", 4)
    metric = "qa_r"


def joint_scores(answer_predictions: list[dict], rationale_predictions: list[dict], answers: list[Sample],
                 rationales: list[Sample]) -> dict[str, float]:
    """Q→A, QA→R and Q→AR from the two tasks' predictions and samples of one split."""
    return vcr_scores({p["annot_id"]: p["choice"] for p in answer_predictions},
                      {p["annot_id"]: p["choice"] for p in rationale_predictions},
                      {s.id: s.label for s in answers}, {s.id: s.label for s in rationales})


LEADERBOARD_COLUMNS = ("annot_id", *(f"answer_{j}" for j in range(4)),
                       *(f"rationale_conditioned_on_a{i}_{j}" for i in range(4) for j in range(4)))


def leaderboard_rows(answer_predictions: list[dict], conditioned: list[list[dict]]) -> list[dict]:
    """The VCR leaderboard's rows: Q→A probabilities and, for each answer i, QA→R probabilities with answer i given.

    `conditioned[i]` are the QA→R predictions read with `data.condition_on_answer = i`; every list must cover the
    same items.
    """
    if len(conditioned) != 4:
        raise DataError(f"expected QA→R predictions conditioned on each of 4 answers, got {len(conditioned)}")
    by_answer = [{p["annot_id"]: p["probabilities"] for p in predictions} for predictions in conditioned]
    rows, seen = [], set()
    for prediction in answer_predictions:
        annot_id = prediction["annot_id"]
        if annot_id in seen:
            raise DataError(f"item {annot_id!r} appears twice in the split; the leaderboard takes one row per item")
        seen.add(annot_id)
        missing = [i for i, table in enumerate(by_answer) if annot_id not in table]
        if missing:
            raise DataError(f"item {annot_id!r} has no QA→R prediction conditioned on answer {missing[0]}")
        row = {"annot_id": annot_id, **{f"answer_{j}": p for j, p in enumerate(prediction["probabilities"])}}
        for i, table in enumerate(by_answer):
            row.update({f"rationale_conditioned_on_a{i}_{j}": p for j, p in enumerate(table[annot_id])})
        rows.append(row)
    return rows
