"""Every registered task on tiny official-format data, built the way `vilbert finetune` / `pretrain` build them.

`write_zoo(root)` writes each task's tiny files once and returns its `key=value` overrides; `build_task(name,
overrides)` loads the task from its YAML (tasks/configs/<name>.yaml, pretraining from its dataclass defaults) with
the tiny preset. Imports only the test writers and the task layer, so spawned ranks can import it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from tiny_12in1_data import (
    VCR_WORDS,
    write_flickr_entities,
    write_foil,
    write_genome_qa,
    write_gqa,
    write_guesswhat,
    write_nlvr2,
    write_snli_ve,
    write_vcr,
    write_visual7w,
    write_vocab_with,
)
from tiny_pretrain_data import write_pretraining_data
from tiny_task_data import write_karpathy, write_refcoco, write_store, write_vqa, write_vqa_cp

from tasks.engine.config import load_config
from tasks.engine.task import Task
from tasks.registry import TASKS, task_class
from tasks.runners.evaluate import load_task

# no dropout: ranks and micro-steps draw different dropout masks, so exactness holds only without it
NO_DROPOUT = ["model.overrides.hidden_dropout_prob=0.0", "model.overrides.attention_probs_dropout_prob=0.0",
              "model.overrides.v_hidden_dropout_prob=0.0", "model.overrides.v_attention_probs_dropout_prob=0.0",
              "model.overrides.head_dropout_prob=0.0", "model.overrides.answer_head_dropout_prob=0.0"]


# every registered single task; "multi" composes them, and tests/test_multitask.py checks its ranks and its resume
ZOO_TASKS = [name for name in TASKS if name != "multi"]


def _answers(path: Path, answers: list[str], size: int) -> Path:
    with open(path, "wb") as f:
        pickle.dump(answers + [f"other{i}" for i in range(size - len(answers))], f, protocol=2)
    return path


def _task_data(name: str, root: Path) -> list[str]:
    """Write `name`'s tiny files under `root`; its data overrides."""
    data = root / "data"
    store = root / "f.h5"
    if name == "pretrain":
        paths = write_pretraining_data(root, train_images=16, val_images=4)
        return [f"data.tokenizer={paths['vocab']}", f"data.train_features={paths['train_features']}",
                f"data.train_captions={paths['train_captions']}", f"data.val_features={paths['val_features']}",
                f"data.val_captions={paths['val_captions']}", "data.max_text_length=16", "data.max_regions=9"]
    write_vocab_with(root / "tok", VCR_WORDS)
    common = [f"data.tokenizer={root / 'tok'}", "data.max_regions=5", "data.max_text_length=20",
              f"data.root={data}", f"data.features=[{store}]"]
    extra: list[str] = []
    if name == "vqa":
        write_store(store, [str(i) for i in write_vqa(data)["image_ids"]])
        return [*common, "data.min_answer_count=1", "data.minval_size=4"]
    if name == "vqa-cp":
        write_store(store, [str(i) for i in write_vqa_cp(data)["image_ids"]])
        return [*common, "data.min_answer_count=1"]
    if name == "retrieval":
        write_store(store, write_karpathy(data / "dataset_flickr30k.json"))
        return [*common, "data.val_split=test"]
    if name in ("refcoco", "refcoco+", "refcocog"):
        refs = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}[name]
        splits = ("train", "val", "test") if name == "refcocog" else ("train", "val", "testA", "testB")
        info = write_refcoco(data, refs_name=refs, splits=splits)
        write_store(store, info["image_ids"], boxes=info["boxes"])
        return [*common, "data.gt_features=[]"]
    if name in ("visual7w", "guesswhat-pointing"):
        info = write_visual7w(data) if name == "visual7w" else write_guesswhat(data)
        write_store(store, info["image_ids"], boxes=info["gt_boxes"])
        return [*common, "data.gt_features=[]"]
    if name == "flickr-grounding":
        info = write_flickr_entities(data)
        write_store(store, info["image_ids"], boxes=info["boxes"])
        return [*common, "data.gt_features=[]"]
    if name == "snli-ve":
        ids = write_snli_ve(data)
    elif name == "nlvr2":
        ids = write_nlvr2(data)
    elif name == "gqa":
        ids = write_gqa(data)
        extra = [f"data.answers_file={_answers(root / 'gqa.pkl', ['yes', 'no', 'red', 'left'], 11)}"]
    elif name == "genome-qa":
        ids = write_genome_qa(data)
        extra = [f"data.answers_file={_answers(root / 'vqa.pkl', ['2', 'red', 'yes'], 10)}", "data.val_images=1"]
    elif name == "foil":
        ids = write_foil(data)
    elif name == "guesswhat":
        ids = write_guesswhat(data)["image_ids"]
    elif name in ("vcr-qa", "vcr-qar"):
        ids, extra = write_vcr(data), ["data.gt_features=[]"]
    else:
        raise KeyError(f"no tiny data for task {name!r}: add it to tests/task_zoo.py")
    write_store(store, ids)
    return [*common, *extra]


def write_zoo(root: Path, names: list[str] | None = None) -> dict[str, list[str]]:
    """Tiny data for every registered single task (or `names`), each in its own folder: name -> overrides."""
    return {name: _task_data(name, root / name.replace("+", "_plus")) for name in (names or ZOO_TASKS)}


def build_task(name: str, overrides: list[str], dropout: bool = False) -> Task:
    """The task with the tiny preset, no dropout unless asked, and the given overrides (config defaults for
    pretraining)."""
    overrides = ["model.preset=tiny", *([] if dropout else NO_DROPOUT), *overrides]
    if name == "pretrain":
        cls = task_class(name)
        return cls(load_config(None, cls.config_class, overrides))
    return load_task(name, None, overrides)
