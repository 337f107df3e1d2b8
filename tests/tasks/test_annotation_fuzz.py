"""Fuzzing each task's annotation files: every field of a training entry dropped, set to null or given the wrong
type, one at a time. Reading the split, building the training set and collating it must either work or raise one
of the errors the command line prints as one line naming the file; never anything else (a guard for the future).
Uses the task's data code directly, so the ~150 cases take a few seconds.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import pytest

from tasks.cli import USER_ERRORS
from tasks.engine.config import load_config
from tasks.registry import task_class
from tests.fixtures.tiny_task_data import write_three_tasks

CHANGES = ("drop", "null", "wrong-type")  # what `_mutate` does to one field


def _wrong_type(value):
    """A value of another JSON type than `value`."""
    if isinstance(value, str):
        return 7
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "x"
    if isinstance(value, list):
        return {"a": 1}
    return [1]


def _paths(entry, prefix=()):
    """Paths to every field of a JSON entry: its keys and those of its first nested entry (depth 2)."""
    for key, value in entry.items():
        yield (*prefix, key)
        if isinstance(value, dict) and len(prefix) < 2:
            yield from _paths(value, (*prefix, key))
        if isinstance(value, list) and value and isinstance(value[0], dict) and len(prefix) < 2:
            yield from _paths(value[0], (*prefix, key, 0))


def _mutate(entry, path, kind):
    entry = copy.deepcopy(entry)
    parent = entry
    for part in path[:-1]:
        parent = parent[part]
    if kind == "drop":
        del parent[path[-1]]
    elif kind == "null":
        parent[path[-1]] = None
    else:
        parent[path[-1]] = _wrong_type(parent[path[-1]])
    return entry


# (task, file, how to read it, where the first training entry is, extra config)
FILES = {
    "vqa-questions": ("vqa", "v2_OpenEnded_mscoco_train2014_questions.json", "json", ("questions", 0)),
    "vqa-annotations": ("vqa", "v2_mscoco_train2014_annotations.json", "json", ("annotations", 0)),
    "retrieval-karpathy": ("retrieval", "dataset_flickr30k.json", "json", ("images", 0)),
    "refcoco-refs": ("refcoco", "refs(unc).p", "pickle", (0,)),
    "refcoco-instances": ("refcoco", "instances.json", "json", ("annotations", 0)),
}
OVERRIDES = {"vqa": ["data.min_answer_count=1", "data.minval_size=4"], "retrieval": ["data.max_text_length=12"],
             "refcoco": ["data.gt_features=[]"]}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return write_three_tasks(tmp_path_factory.mktemp("fuzz"))


def _read(path, kind):
    if kind == "pickle":
        with open(path, "rb") as handle:
            return pickle.load(handle)
    return json.loads(path.read_text())


def _write(path, kind, data):
    if kind == "pickle":
        with open(path, "wb") as handle:
            pickle.dump(data, handle, protocol=2)
    else:
        path.write_text(json.dumps(data))


def _train_on(task_name, data_root, root):
    """What training reads first: the task, its training set, every sample, one collated batch."""
    cls = task_class(task_name)
    config = load_config(None, cls.config_class, [
        "model.preset=tiny", f"data.root={data_root}", f"data.features=[{root / (task_name + '.h5')}]",
        f"data.tokenizer={root / 'tok'}", "data.max_regions=5", *OVERRIDES[task_name]])
    task = cls(config)
    dataset = task.dataset("train")
    task.collate([dataset.sample(i, 0) for i in range(len(dataset))])


@pytest.mark.parametrize("name", list(FILES))
def test_every_field_dropped_null_or_mistyped_is_a_clean_run_or_one_line(valid, tmp_path, name):
    task_name, file, kind, where = FILES[name]
    data_root = tmp_path / task_name
    shutil.copytree(valid / task_name, data_root)
    path = data_root / file
    original = _read(path, kind)
    container = original
    for part in where[:-1]:
        container = container[part]
    entry = container[where[-1]]
    outcomes = {"ran": 0, "refused": 0}
    for field in _paths(entry):
        for kind_of_change in CHANGES:
            data = copy.deepcopy(original)
            target = data
            for part in where[:-1]:
                target = target[part]
            target[where[-1]] = _mutate(entry, field, kind_of_change)
            _write(path, kind, data)
            case = f"{name}: {'.'.join(map(str, field))} {kind_of_change}"
            try:
                _train_on(task_name, data_root, valid)
            except USER_ERRORS as error:
                message = str(error)
                assert "\n" not in message, f"{case}: a message of several lines: {message}"
                assert str(data_root) in message, f"{case}: the message does not name the file: {message}"
                outcomes["refused"] += 1
            except Exception as error:  # noqa: BLE001 - what the test exists to catch
                pytest.fail(f"{case}: {type(error).__name__}: {error} (a traceback on the command line)")
            else:
                outcomes["ran"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) >= 9
