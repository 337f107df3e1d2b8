"""Answer labels through convert -> evaluate -> finetune: a permuted label2ans keeps every row under its answer."""

import json
import pickle

import numpy as np
import pytest
import torch

from features.store import FeatureStoreWriter
from tasks.cli import main
from tasks.data.answer_labels import carry_answer_rows, extend_answers, read_answer_list
from tasks.data.feature_provenance import feature_mismatch, warn_if_store_differs
from tasks.errors import ConfigError
from tasks.registry import build_task
from tasks.vqa import build_vocabulary, read_split
from tests.fixtures.tiny_task_data import write_store, write_vocab, write_vqa
from vilbert import ViLBertConfig, ViLBertForVLTasks
from vilbert.convert import export_reference_state_dict

TINY = ["train.global_batch_size=4", "train.max_steps=1", "train.num_workers=0", "train.device=cpu",
        "data.max_regions=5", "data.eval_batch_size=4"]


@pytest.fixture
def vqa(tmp_path):
    """Tiny VQA data, store and tokenizer; the data's answers (frequency order) and a permuted label list that
    lacks the most frequent answer, so fine-tuning has one answer to append."""
    info = write_vqa(tmp_path / "vqa")
    write_store(tmp_path / "f.h5", [str(i) for i in info["image_ids"]])
    write_vocab(tmp_path / "tok")
    data_answers = build_vocabulary(read_split(tmp_path / "vqa", "train") + read_split(tmp_path / "vqa", "val"), 1)
    labels = list(reversed(data_answers[1:]))
    assert labels != data_answers[: len(labels)]
    data = [f"data.root={tmp_path / 'vqa'}", f"data.features=[{tmp_path / 'f.h5'}]", "data.min_answer_count=1",
            "data.minval_size=4"]
    return {"data_answers": data_answers, "labels": labels, "data": data}


def _reference_checkpoint(tmp_path, num_labels):
    """A released-style task checkpoint whose head always answers row 0, and its reference JSON config."""
    config = ViLBertConfig.from_preset("tiny", num_labels=num_labels)
    model = ViLBertForVLTasks(config).eval()
    with torch.no_grad():
        model.answer_head.classifier.weight.zero_()
        model.answer_head.classifier.bias.fill_(-10.0)
        model.answer_head.classifier.bias[0] = 10.0
    torch.save(export_reference_state_dict(model), tmp_path / "multi_task_model.bin")
    fields = {k: v for k, v in config.to_dict().items()
              if k in ViLBertConfig.__dataclass_fields__ and k not in ("id2label", "label2id", "dtype")}
    (tmp_path / "tiny.json").write_text(json.dumps(fields))
    return model


def _convert(tmp_path, out, *extra):
    return main(["convert", "--from", "vilbert-multi-task", "--input", str(tmp_path / "multi_task_model.bin"),
                 "--out", str(out), "--config", str(tmp_path / "tiny.json"), *extra])


def test_permuted_labels_survive_convert_evaluate_and_finetune(tmp_path, vqa, capsys):
    labels = vqa["labels"]
    reference = _reference_checkpoint(tmp_path, len(labels))
    with open(tmp_path / "trainval_label2ans.pkl", "wb") as f:
        pickle.dump(labels, f)
    converted = tmp_path / "converted"
    assert _convert(tmp_path, converted, "--answers", str(tmp_path / "trainval_label2ans.pkl"),
                    "--tokenizer", str(tmp_path / "tok")) == 0
    printed = capsys.readouterr().out
    assert "missing: GQA labels" in printed and "missing: answer labels" not in printed
    config = json.loads((converted / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(labels))] == labels
    assert config["visual_features"]["detector"] == "vmb-x152-fpn" and config["visual_features"]["boxes"] == 100
    assert (converted / "vocab.txt").read_text() == (tmp_path / "tok" / "vocab.txt").read_text()

    # evaluate: every answer is row 0's label, read from the converted list (no --tokenizer: the copied vocab)
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", "vqa", "--checkpoint", str(converted), "--split", "minval", "--out", str(out),
                 "data.max_regions=5", *vqa["data"]]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and {p["answer"] for p in predictions} == {labels[0]}

    # finetune --init: the checkpoint's order first, the data's new answer appended, rows carried by label
    task = build_task("vqa", None, [*TINY, *vqa["data"], f"model.init={converted}"])
    model = task.build_model()
    assert task.vocabulary() == labels + [vqa["data_answers"][0]]
    head = model.answer_head.classifier
    assert torch.equal(head.bias[: len(labels)], reference.answer_head.classifier.bias)
    assert torch.equal(head.weight[: len(labels)], reference.answer_head.classifier.weight)
    run = tmp_path / "run"
    assert main(["finetune", "--task", "vqa", "--init", str(converted), *TINY, f"train.output_dir={run}",
                 *vqa["data"]]) == 0
    trained = json.loads((sorted((run / "checkpoints").iterdir())[-1] / "config.json").read_text())
    assert [trained["id2label"][str(i)] for i in range(len(labels) + 1)] == labels + [vqa["data_answers"][0]]


def test_unlabelled_converted_head_is_refused(tmp_path, vqa, capsys):
    _reference_checkpoint(tmp_path, len(vqa["labels"]))
    converted = tmp_path / "converted"
    assert _convert(tmp_path, converted) == 0
    assert "missing: answer labels: pass --answers" in capsys.readouterr().out
    commands = [
        ["evaluate", "--task", "vqa", "--checkpoint", str(converted), "--split", "minval", *vqa["data"]],
        ["finetune", "--task", "vqa", "--init", str(converted), *TINY, f"train.output_dir={tmp_path / 'run'}",
         *vqa["data"]],
        ["predict", "--checkpoint", str(converted), "--image", str(tmp_path / "none.png"), "--question", "what?",
         "--tokenizer", str(tmp_path / "tok")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--answers" in err[0], err


def test_answer_list_of_wrong_size_is_refused(tmp_path, capsys):
    _reference_checkpoint(tmp_path, 4)
    (tmp_path / "answers.txt").write_text("yes\nno\n2\n")
    assert _convert(tmp_path, tmp_path / "c", "--answers", str(tmp_path / "answers.txt")) == 2
    assert "3 answers but the answer head" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_answer_list_formats(tmp_path):
    answers = ["yes", "no", "2", "café"]
    (tmp_path / "a.json").write_text(json.dumps(answers))
    (tmp_path / "a.txt").write_text("\n".join(answers) + "\n", encoding="utf-8")
    with open(tmp_path / "label2ans.pkl", "wb") as f:
        pickle.dump(answers, f)
    with open(tmp_path / "ans2label.pkl", "wb") as f:
        pickle.dump({a: i for i, a in enumerate(answers)}, f)
    for name in ("a.json", "a.txt", "label2ans.pkl", "ans2label.pkl"):
        assert read_answer_list(tmp_path / name) == answers, name
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(np.zeros(2), f)
    with pytest.raises(ConfigError, match="refused to unpickle global numpy"):
        read_answer_list(tmp_path / "evil.pkl")
    (tmp_path / "dup.txt").write_text("yes\nno\nyes\n")
    with pytest.raises(ConfigError, match="answers repeated: 'yes'"):
        read_answer_list(tmp_path / "dup.txt")


def test_rows_follow_their_labels():
    old = ["a", "b", "c"]
    new = extend_answers(["c", "a"], ["a", "d"])
    assert new == ["c", "a", "d"]
    head = torch.nn.Linear(2, 3)
    checkpoint = {"weight": torch.arange(6.0).reshape(3, 2), "bias": torch.tensor([10.0, 20.0, 30.0])}
    assert carry_answer_rows(head, checkpoint, old, new) == 2
    assert head.bias[:2].tolist() == [30.0, 10.0] and head.weight[0].tolist() == [4.0, 5.0]


def test_feature_family_mismatch_warns_in_one_line(tmp_path):
    visual = {"detector": "vmb-x152-fpn", "selection": "per-class NMS 0.5, top 100 boxes"}
    assert feature_mismatch(visual, "vmb-x152-fpn", "f.h5") is None
    assert feature_mismatch(visual, None, "f.h5") is None
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"visual_features": visual}))
    with FeatureStoreWriter(tmp_path / "butd.h5", 4, extractor={"detector": "butd-r101-c4"}) as writer:
        writer.add("1", (10, 10), np.zeros((1, 4), np.float32), np.array([[0, 0, 5, 5]], np.float32))
    message = warn_if_store_differs(checkpoint, [str(tmp_path / "butd.h5")])
    assert message == (f"{tmp_path / 'butd.h5'} holds butd-r101-c4 features but the model was trained on "
                       "vmb-x152-fpn (per-class NMS 0.5, top 100 boxes); expect lower scores")
