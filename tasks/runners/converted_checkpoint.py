"""What a converted checkpoint directory carries besides weights, so it runs with no other path.

- `id2label` (VQA head) and `gqa_answers` (12-in-1 GQA head) in the released heads' order, from the reference's
  label lists;
- `visual_features`: the detector and box selection the released model was trained on;
- `converted_from`: the source repository and file, which marks the head's labels as required;
- the BERT tokenizer files (vocab.txt, tokenizer config) copied beside the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.data.answer_labels import read_answer_list
from tasks.errors import ConfigError
from vilbert.convert import RELEASED_VISUAL_FEATURES

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def label_converted_model(model, source: str, input_path: str, answers: str | None = None,
                          gqa_answers: str | None = None) -> list[str]:
    """Record labels, provenance and features in `model.config`; returns what is still missing, one line each."""
    config = model.config
    has_heads = hasattr(model, "answer_head")
    config.converted_from = {"source": source, "file": Path(input_path).name}
    config.visual_features = dict(RELEASED_VISUAL_FEATURES[source])
    missing = []
    for option, path, size, head in (("--answers", answers, config.num_labels, "answer"),
                                     ("--gqa-answers", gqa_answers, getattr(config, "gqa_num_labels", 0), "GQA")):
        if path is None:
            continue
        if not has_heads:
            raise ConfigError(f"{option} {path}: {input_path} is a pretraining checkpoint without a {head} head")
        labels = read_answer_list(path)
        if len(labels) != size:
            raise ConfigError(f"{option} {path}: {len(labels)} answers but the {head} head of {input_path} "
                              f"has {size} rows")
        if option == "--answers":
            config.id2label = dict(enumerate(labels))
            config.label2id = {answer: i for i, answer in enumerate(labels)}
        else:
            config.gqa_answers = labels
    if has_heads and answers is None:
        missing.append(f"answer labels: pass --answers trainval_label2ans.pkl ({config.num_labels} rows unlabelled;"
                       " evaluate, predict and finetune --init refuse the VQA head without them)")
    if has_heads and gqa_answers is None and source == "vilbert-multi-task":
        missing.append("GQA labels: pass --gqa-answers (the GQA trainval_label2ans.pkl, 1533 answers)")
    return missing


def copy_tokenizer(directory: str | None, out: str | Path) -> list[str]:
    """Copy the tokenizer files of `directory` into `out`; returns the names copied (vocab.txt or tokenizer.json
    required). Without a directory, nothing is copied."""
    if directory is None:
        return []
    source = Path(directory)
    if not source.is_dir():
        raise ConfigError(f"--tokenizer {directory}: no such directory")
    present = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not {"vocab.txt", "tokenizer.json"} & set(present):
        raise ConfigError(f"--tokenizer {directory}: no vocab.txt or tokenizer.json (a BERT tokenizer directory)")
    for name in present:
        shutil.copy2(source / name, Path(out) / name)
    return present
