"""`vilbert predict` with a converted 12-in-1 checkpoint goes through vmb-x152-fpn and asks for its weights."""

import json

import numpy as np
import pytest
from PIL import Image
from tiny_task_data import write_vocab

from tasks.cli import main
from tasks.runners.checkpoint import CheckpointInfo
from tasks.runners.predict import detector_name


def _converted(directory, v_feature_size, visual_features=None, **settings):
    """A tiny ViLBertForVLTasks saved as `vilbert convert` leaves it: config.json, no run_config.yaml."""
    from vilbert import ViLBertConfig, ViLBertForVLTasks

    config = ViLBertConfig.from_preset("tiny", v_feature_size=v_feature_size, num_labels=2, **settings)
    config.update({"id2label": {0: "yes", 1: "no"}, "label2id": {"yes": 0, "no": 1}})
    ViLBertForVLTasks(config).save_pretrained(directory)
    if visual_features is not None:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "visual_features": visual_features}))
    return directory


@pytest.mark.parametrize("config, run_config, expected", [
    ({"visual_features": {"detector": "vmb-x152-fpn"}}, {}, "vmb-x152-fpn"),  # recorded by vilbert convert
    ({}, {}, "vmb-x152-fpn"),  # converted (no run config), 2048-d: a vilbert-multi-task checkpoint
    ({"answer_head_type": "beta"}, {}, "butd-r101-c4"),  # converted vilbert_beta: BUTD features
    ({}, {"data": {}}, "butd-r101-c4"),  # trained here, store unknown: the size's default
])
def test_detector_for_a_checkpoint(tmp_path, config, run_config, expected):
    info = CheckpointInfo(tmp_path, {"v_feature_size": 2048, **config}, run_config)
    assert detector_name(info) == expected
    assert detector_name(info, "mobilenet-v2") == "mobilenet-v2"


def test_predict_with_a_converted_12_in_1_checkpoint_uses_the_vmb_detector(tmp_path, capsys):
    checkpoint = _converted(tmp_path / "ckpt", 32, {"detector": "vmb-x152-fpn"}, task_specific_tokens=True)
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(image)
    common = ["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--question", "is it red",
              "--tokenizer", str(write_vocab(tmp_path / "tok")), "--device", "cpu", "--option", "preset=tiny"]
    capsys.readouterr()
    assert main([*common, "--random-detector", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["detector"] == "vmb-x152-fpn" and len(result["boxes"]) > 0
    assert {a["answer"] for a in result["answers"]} == {"yes", "no"}

    assert main(common) == 2  # no --weights: the error names the file to get
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vmb-x152-fpn has random weights" in err[0] and "detectron_model.pth" in err[0]
