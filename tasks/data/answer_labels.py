"""Answer labels of an answer head: read the reference's lists, refuse unlabelled heads, carry rows by label.

A released head's row i means the reference's `trainval_label2ans.pkl[i]`; this project's own vocabulary is ordered
by frequency, so a head is only usable with its own list. Converted checkpoints keep the list in `id2label`
(`gqa_answers` for the 12-in-1 GQA head); a converted head without it is refused rather than read under the wrong
words; fine-tuning keeps the checkpoint's order and appends answers the data adds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from features.errors import FeaturesError
from features.safe_pickle import safe_load
from tasks.engine.run_record import TASK_ARCHITECTURE, architecture
from tasks.errors import ConfigError

logger = logging.getLogger(__name__)


def read_answer_list(path: str | Path) -> list[str]:
    """Answers in label order from a pickle (label2ans list or ans2label dict), a JSON list, or text (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such answer list")
    if path.suffix in (".pkl", ".pickle"):
        try:
            data = safe_load(path, allow_numpy=False, encoding="utf-8")
        except FeaturesError as error:
            raise ConfigError(str(error)) from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
    else:
        data = _answer_lines(path)
    if isinstance(data, dict):  # ans2label: answer -> index
        if sorted(data.values()) != list(range(len(data))):
            raise ConfigError(f"{path}: an answer -> label dict must map to 0..{len(data) - 1} exactly once each")
        data = sorted(data, key=data.__getitem__)
    if not isinstance(data, (list, tuple)) or not all(isinstance(a, str) for a in data):
        raise ConfigError(f"{path}: expected a list of answer strings (label order), got {type(data).__name__}")
    answers = list(data)
    if not answers:
        raise ConfigError(f"{path}: no answers")
    if len(set(answers)) != len(answers):
        repeated = sorted({a for a in answers if answers.count(a) > 1})[:3]
        raise ConfigError(f"{path}: answers repeated: {', '.join(map(repr, repeated))}")
    return answers


def _answer_lines(path: Path) -> list[str]:
    """One answer per line, the line number being the label: a blank line inside the list is an error (skipping
    it would shift every later label by one); blank lines at the end are ignored."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); expected one answer per line") from None
    while lines and not lines[-1]:
        lines.pop()
    if "" in lines:
        raise ConfigError(f"{path}: line {lines.index('') + 1} is blank; each line is one answer, in label order")
    return lines


def config_answers(config: dict) -> list[str] | None:
    """The answer list of a config.json dict (id2label in label order), or None when it is the default LABEL_i."""
    id2label = config.get("id2label") or {}
    answers = [id2label[k] for k in sorted(id2label, key=int)]
    return answers if answers and not all(a == f"LABEL_{i}" for i, a in enumerate(answers)) else None


def require_answer_labels(directory: str | Path | None) -> None:
    """Refuse a converted checkpoint whose answer head has no labels: its rows would be read under wrong words."""
    if not directory or not (Path(directory) / "config.json").is_file():
        return
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    has_head = bool(architectures) and architecture(architectures) == TASK_ARCHITECTURE
    if config.get("converted_from") and has_head and config_answers(config) is None:
        raise ConfigError(f"{directory}: the converted answer head has no answer labels; convert again with "
                          "--answers trainval_label2ans.pkl (the reference's label -> answer list)")


def extend_answers(known: list[str], data_answers: list[str]) -> list[str]:
    """The checkpoint's answers in their order, then the data's answers it lacks, in the data's order."""
    have = set(known)
    return known + [answer for answer in data_answers if answer not in have]


def carry_answer_rows(head: nn.Linear, checkpoint_head: dict[str, torch.Tensor], old: list[str],
                      new: list[str]) -> int:
    """Copy classifier rows from a checkpoint's head (`weight` [N_old, H], `bias` [N_old]) by answer label.

    Row j of `head` (answer new[j]) receives the checkpoint's row of the same answer; answers the checkpoint lacks
    keep their fresh rows. Returns the number of rows carried.
    """
    position = {answer: i for i, answer in enumerate(old)}
    pairs = [(j, position[answer]) for j, answer in enumerate(new) if answer in position]
    if not pairs:
        return 0
    rows = torch.tensor([j for j, _ in pairs])
    source = torch.tensor([i for _, i in pairs])
    with torch.no_grad():
        head.weight[rows] = checkpoint_head["weight"][source].to(head.weight.dtype)
        head.bias[rows] = checkpoint_head["bias"][source].to(head.bias.dtype)
    return len(pairs)


def checkpoint_classifier(directory: str | Path, prefix: str = "answer_head.classifier.") -> dict[str, torch.Tensor]:
    """The answer classifier's weight and bias from a checkpoint directory's model.safetensors."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{directory}: no model.safetensors to carry the answer head from")
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing = [prefix + n for n in ("weight", "bias") if prefix + n not in names]
        if missing:
            raise ConfigError(f"{path}: no {', '.join(missing)} (not a task checkpoint)")
        return {n: f.get_tensor(prefix + n) for n in ("weight", "bias")}
