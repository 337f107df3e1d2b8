"""GuessWhat?!: the oracle's answers (task 14) and the guesser's pointing (task 17), from the released games.

Files (in `data.root`): `guesswhat.{train,valid,test}.jsonl`, one game a line: {"id", "image": {"id", ...},
"objects": [{"id", "category", "bbox" [x, y, w, h], ...}], "object_id" (the target), "qas": [{"id", "question",
"answer" ("Yes" / "No" / "N/A")}], "status" ("success" / "failure" / "incomplete")}.

- `guesswhat` (oracle, 12-in-1 task 14): one sample per question of every game, the question with the image,
  `tri_logits` with Yes 0 / No 1 / N/A 2 (LABEL_MAP of the original's vilbert/datasets/guesswhat_dataset.py), BCE
  on the one-hot answer; accuracy. As the issue's table reads the task ("dialogue turn + image"), the target
  object is not given to the model. Predictions [{"qa_id", "answer"}].
- `guesswhat-pointing` (guesser, task 17): one sample per *successful* game, the whole dialogue ("question
  answer" turns joined) with the image; the candidates are the game's objects (see `tasks.pointing`);
  accuracy of the chosen object. Predictions [{"game_id", "object_id", "box"}].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.data.annotations import require
from tasks.engine.task import ExampleInputs
from tasks.errors import AnnotationError, ConfigError
from tasks.finetuning import FinetuneConfig
from tasks.image_text import ImageTextDataConfig, ImageTextTask, Sample, one_hot, read_json_lines
from tasks.metrics import xywh_to_xyxy
from tasks.pointing import PointingDataConfig, PointingTask

ANSWERS = ("Yes", "No", "N/A")
SPLITS = ("train", "valid", "test")


def read_games(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, game) of every game, with the keys both tasks need checked."""
    games = []
    for number, game in read_json_lines(path):
        require(game, ["id", "image", "objects", "object_id", "qas"], str(path), f"line {number}")
        require(game["image"], ["id"], str(path), f"line {number} image")
        for k, qa in enumerate(game["qas"]):
            require(qa, ["question", "answer"], str(path), f"line {number} qas[{k}]")
            if qa["answer"] not in ANSWERS:
                raise AnnotationError(f"{path}: line {number} qas[{k}] has answer {qa['answer']!r}; "
                                      f"expected one of {', '.join(ANSWERS)}")
        games.append((number, game))
    return games


def read_oracle(path: str | Path) -> list[Sample]:
    """One sample per question: label 0 Yes / 1 No / 2 N/A; id the qa's id (else "game-turn")."""
    samples = []
    for _, game in read_games(path):
        for k, qa in enumerate(game["qas"]):
            qa_id = qa.get("id", f"{game['id']}-{k}")
            samples.append(Sample(qa_id, [str(qa["question"])], [str(game["image"]["id"])],
                                  ANSWERS.index(qa["answer"])))
    return samples


def dialogue(game: dict) -> str:
    """The game's dialogue as one text: "question answer question answer ..."."""
    return " ".join(f"{qa['question']} {qa['answer']}" for qa in game["qas"])


def read_pointing(path: str | Path) -> list[Sample]:
    """One sample per successful game: the dialogue; candidates the game's objects; label the target's id."""
    samples = []
    for number, game in read_games(path):
        if game.get("status", "success") != "success":
            continue
        ids, boxes = [], []
        for k, obj in enumerate(game["objects"]):
            require(obj, ["id", "bbox"], str(path), f"line {number} objects[{k}]")
            ids.append(int(obj["id"]))
            boxes.append(xywh_to_xyxy(torch.tensor(obj["bbox"], dtype=torch.float32)).tolist())
        if int(game["object_id"]) not in ids:
            raise AnnotationError(f"{path}: line {number} has object_id {game['object_id']}, not among its objects")
        samples.append(Sample(int(game["id"]), [dialogue(game)], [str(game["image"]["id"])], int(game["object_id"]),
                              {"candidates": ids, "boxes": boxes}))
    return samples


def split_file(root: str, split: str) -> Path:
    if split not in SPLITS:
        raise ConfigError(f"unknown GuessWhat split {split!r}; choose one of {', '.join(SPLITS)}")
    return Path(root) / f"guesswhat.{split}.jsonl"


@dataclass
class GuessWhatDataConfig(ImageTextDataConfig):
    max_text_length: int = 20
    train_split: str = "train"
    val_split: str = "valid"


@dataclass
class GuessWhatConfig(FinetuneConfig):
    """A GuessWhat oracle fine-tuning run (tasks/configs/guesswhat.yaml)."""

    data: GuessWhatDataConfig = field(default_factory=GuessWhatDataConfig)


class GuessWhatTask(ImageTextTask):
    """The GuessWhat oracle on `tri_logits`."""

    name = "guesswhat"
    head = "tri_logits"
    config_class = GuessWhatConfig
    example_inputs = ExampleInputs("question about the hidden object", example_text="is it red")

    def annotation_file(self, split: str) -> Path:
        return split_file(self.data.root, split)

    def read_samples(self, split: str) -> list[Sample]:
        return read_oracle(self.annotation_file(split))

    def target(self, sample: Sample) -> torch.Tensor:
        return one_hot(sample.label, len(ANSWERS))

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        return {"qa_id": sample.id, "answer": ANSWERS[int(logits.argmax())]}

    def choice_labels(self, sample: Sample) -> list[str]:
        return list(ANSWERS)

    def id_of(self, prediction: dict):
        return prediction["qa_id"]

    def predicted_label(self, prediction: dict) -> int:
        return ANSWERS.index(prediction["answer"])


@dataclass
class GuessWhatPointingDataConfig(PointingDataConfig):
    max_text_length: int = 256  # the reference's max_seq_length for task 17
    max_gt_regions: int = 205  # 101 + 205 = the reference's 306 regions
    train_split: str = "train"
    val_split: str = "valid"


@dataclass
class GuessWhatPointingConfig(FinetuneConfig):
    """A GuessWhat pointing fine-tuning run (tasks/configs/guesswhat-pointing.yaml)."""

    data: GuessWhatPointingDataConfig = field(default_factory=GuessWhatPointingDataConfig)


class GuessWhatPointingTask(PointingTask):
    """The GuessWhat guesser: point at the target object after the dialogue."""

    name = "guesswhat-pointing"
    config_class = GuessWhatPointingConfig
    example_inputs = ExampleInputs("dialogue", example_text="is it a circle yes is it red no")

    def annotation_file(self, split: str) -> Path:
        return split_file(self.data.root, split)

    def read_samples(self, split: str) -> list[Sample]:
        return read_pointing(self.annotation_file(split))

    def decode(self, sample: Sample, logits: torch.Tensor) -> dict:
        object_id, box = self.chosen(sample, logits)
        return {"game_id": sample.id, "object_id": object_id, "box": box}

    def id_of(self, prediction: dict) -> int:
        return prediction["game_id"]

    def predicted_label(self, prediction: dict) -> int:
        return prediction["object_id"]
