"""A user sees one line per problem and nothing when there is none (issue 24, noise)."""

from __future__ import annotations

import logging
import pickle

from tests.fixtures.cli_check import run_cli
from vilbert import ViLBertConfig, ViLBertForVLTasks


def test_loading_a_checkpoint_logs_no_tensor_parallel_report(tmp_path, caplog):
    ViLBertForVLTasks(ViLBertConfig.from_preset("tiny")).save_pretrained(tmp_path / "model")
    with caplog.at_level(logging.INFO):
        ViLBertForVLTasks.from_pretrained(tmp_path / "model")
    assert "not sharded" not in caplog.text
    assert logging.getLogger("transformers.distributed.tensor_parallel").level == logging.NOTSET  # restored


def test_a_protocol_4_pickle_is_refused_in_exactly_one_line(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    code, _, stderr = run_cli(["convert", "--from", "vilbert-multi-task", "--input", str(path), "--out",
                               str(tmp_path / "out")], subprocess=True)
    assert code == 2
    assert stderr.strip().splitlines() == [stderr.strip()], stderr  # no torch warning before the error
    assert str(path) in stderr and "not a readable weights-only state dict" in stderr


def test_a_checkpoint_of_another_task_is_named_without_an_empty_head(tmp_path, caplog):
    from types import SimpleNamespace

    from tasks.runners.checkpoint import CheckpointInfo, check_serves

    ViLBertForVLTasks(ViLBertConfig.from_preset("tiny")).save_pretrained(tmp_path)
    info = CheckpointInfo(tmp_path, {"architectures": ["ViLBertForVLTasks"]}, record={"task": "vqa"})
    task = SimpleNamespace(name="vcr-qa", head_modules=(), pretraining_zero_shot=False)
    with caplog.at_level(logging.WARNING):
        check_serves(info, task)
    assert "was trained for vqa; its head for vcr-qa was not trained" in caplog.text
    assert "its  was" not in caplog.text
