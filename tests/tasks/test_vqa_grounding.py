"""Region supervision for VQA (`data.grounding_weight`): grounding files, their boxes as visual rows, the loss
against a hand-computed case, every architecture that has text-to-vision attention, and bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.data.grounding import read_grounding, target_rows
from tasks.errors import AnnotationError, ConfigError
from tasks.finetuning import model_inputs
from tasks.region_supervision import check_model, grounding_loss
from tests.fixtures.cli_check import assert_refused
from tests.fixtures.task_zoo import build_task, write_zoo
from vilbert import ViLBertConfig
from vilbert.configuration_vilbert import ARCHITECTURES

SINGLE_STREAM_WIDTH = ["model.overrides.v_hidden_size=32", "model.overrides.v_num_attention_heads=4"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"), ["vqa", "vqa-cp"])


def copy_vqa_files(zoo, folder: Path, keep_grounding: bool = True) -> Path:
    """The zoo's VQA files copied into `folder` (without the grounding files unless `keep_grounding`)."""
    data = Path(next(o.split("=", 1)[1] for o in zoo["vqa"] if o.startswith("data.root=")))
    folder.mkdir()
    for path in data.iterdir():
        if keep_grounding or "grounding" not in path.name:
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_a_grounding_file_gives_each_named_question_its_box_and_a_missing_file_none(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps([{"question_id": 7, "box": [1, 2, 30, 40.5]}, {"question_id": "8", "box": [0, 0, 1, 1]}]))
    assert read_grounding(path, {7, 8, 9}) == {7: (1.0, 2.0, 30.0, 40.5), 8: (0.0, 0.0, 1.0, 1.0)}
    assert read_grounding(tmp_path / "absent.json", {7}) == {}


@pytest.mark.parametrize(("content", "problem"), [
    ({"7": [0, 0, 1, 1]}, "expected a JSON list"),
    ([{"question_id": 7}], "entry 0 has no 'box'"),
    ([{"question_id": 7, "box": [0, 0, 1]}], "entry 0: box must be [x1, y1, x2, y2]"),
    ([{"question_id": 7, "box": [5, 0, 1, 1]}], "x1 < x2"),
    ([{"question_id": 7, "box": [0, 0, True, 1]}], "box must be"),
    ([{"question_id": 99, "box": [0, 0, 1, 1]}], "entry 0 is for question_id 99, which the questions file does not"),
    ([{"question_id": 7, "box": [0, 0, 1, 1]}, {"question_id": 7, "box": [0, 0, 1, 1]}], "entry 1 repeats"),
])
def test_a_grounding_file_of_the_wrong_shape_is_an_error_naming_it(tmp_path, content, problem):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(content))
    with pytest.raises(AnnotationError) as error:
        read_grounding(path, {7})
    assert str(error.value).startswith(f"{path}: ") and problem in str(error.value)


def test_the_named_box_is_every_kept_region_with_iou_at_least_a_half_never_the_img_token():
    kept = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 20], [0, 0, 10, 21]], dtype=np.float32)
    # IoU with (0, 0, 10, 10): 1, 0, 0.5, 100/210
    assert target_rows((0.0, 0.0, 10.0, 10.0), kept).tolist() == [False, True, False, True, False]
    assert target_rows(None, kept).tolist() == [False] * 5
    assert target_rows((0.0, 0.0, 10.0, 10.0), kept[:0]).tolist() == [False]


def test_the_loss_is_minus_the_log_of_the_attention_share_on_the_named_rows_by_hand():
    # one question of 3 tokens (the last is padding), 2 heads, 3 rows, row 1 named; a second question unsupervised
    probs = torch.tensor([[[[0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0]],
                           [[0.4, 0.4, 0.2], [0.3, 0.6, 0.1], [0.0, 0.0, 1.0]]]])
    probs = torch.cat([probs, probs])  # [2, 2, 3, 3]
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    rows = torch.tensor([[False, True, False], [False, False, False]])
    share_layer_1 = ((0.5 + 0.4) / 2 + (0.8 + 0.6) / 2) / 2  # heads, then the two real tokens
    layer_2 = torch.full_like(probs, 1 / 3)
    expected = (-math.log(share_layer_1) - math.log(1 / 3)) / 2  # the mean over the maps
    loss = grounding_loss((probs, layer_2), mask, rows)
    assert loss.tolist() == pytest.approx([expected, 0.0], rel=1e-6)
    # a model with 12-in-1 task tokens returns one more (real) token: it counts like the others
    token = torch.full((2, 2, 1, 3), 0.0).index_fill(3, torch.tensor([1]), 1.0)
    with_token = torch.cat([probs[:, :, :1], token, probs[:, :, 1:]], dim=2)
    share = ((0.5 + 0.4) / 2 + 1.0 + (0.8 + 0.6) / 2) / 3
    assert grounding_loss((with_token,), mask, rows)[0].item() == pytest.approx(-math.log(share), rel=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_with_text_to_vision_attention_is_supervised_and_late_fusion_refused(architecture, zoo):
    width = SINGLE_STREAM_WIDTH if architecture == "single-stream" else []
    overrides = [*zoo["vqa"], f"model.overrides.architecture={architecture}", *width, "data.grounding_weight=2.0"]
    task = build_task("vqa", overrides)
    if architecture == "late-fusion":
        with pytest.raises(ConfigError, match=r"data.grounding_weight=2.0: the late-fusion architecture .* has no "
                                              "text-to-vision attention"):
            task.build_model()
        return
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(4)])
    assert batch["grounding"].shape == batch["region_mask"].shape
    supervised = int(batch["grounding"].any(dim=1).sum())
    assert supervised == 2  # the "what color is the ..." questions name their image's first box
    assert task.label_counts(batch) == {"loss": 4, "grounding": supervised}
    output = task.training_step(model, batch)
    maps = model(**model_inputs(batch), heads=["answer_logits"], output_attentions=True).text_to_vision_attentions
    expected = 2.0 * grounding_loss(maps, batch["attention_mask"], batch["grounding"]).sum()
    torch.testing.assert_close(output.loss_sums["grounding"], expected)
    output.loss_sums["grounding"].backward()
    query = next(p for name, p in model.named_parameters() if name.endswith("text_query.weight")
                 or (architecture == "single-stream" and name.endswith("attention.query.weight")))
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_training_on_the_grounding_term_moves_the_attention_onto_the_named_region(zoo):
    task = build_task("vqa", [*zoo["vqa"], "data.grounding_weight=1.0"])
    torch.manual_seed(0)
    model = task.build_model()
    dataset = task.dataset("train")
    batch = task.collate([dataset[i] for i in range(len(dataset))])

    def loss():
        return task.training_step(model, batch).loss_sums["grounding"] / task.label_counts(batch)["grounding"]

    before = loss().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    after = loss().item()
    assert after < 0.5 * before  # -log share: the share on the named region grew


def test_region_supervision_reads_vqa_cp_grounding_files_and_evaluation_does_not_need_them(zoo):
    task = build_task("vqa-cp", [*zoo["vqa-cp"], "data.grounding_weight=1.0"])
    named = [q for q in task.questions("train") if q.box is not None]
    assert named and all(q.question.startswith("what color") for q in named)
    assert "grounding" in task.dataset("train")[0] and "grounding" not in task.dataset("test")[0]


def test_the_default_weight_reads_no_grounding_file_and_adds_no_term(zoo):
    task = build_task("vqa", zoo["vqa"])
    assert all(q.box is None for q in task.questions("train"))
    batch = task.collate([task.dataset("train")[i] for i in range(2)])
    assert "grounding" not in batch and task.label_counts(batch) == {"loss": 2}
    assert list(task.training_step(task.build_model(), batch).loss_sums) == ["loss"]


def test_a_weight_without_grounding_files_or_a_bad_weight_is_refused(zoo, tmp_path):
    copy = copy_vqa_files(zoo, tmp_path / "data", keep_grounding=False)
    task = build_task("vqa", [*zoo["vqa"], f"data.root={copy}", "data.grounding_weight=1.0"])
    with pytest.raises(ConfigError, match="data.grounding_weight=1.0: no question of the trainval split .* has a "
                                          "grounding box"):
        task.dataset("train")
    with pytest.raises(ConfigError, match="data.grounding_weight must be a number >= 0, got -1"):
        build_task("vqa", [*zoo["vqa"], "data.grounding_weight=-1"])


def test_check_model_counts_the_maps_of_each_architecture():
    for architecture in ARCHITECTURES:
        extra = {"v_hidden_size": 32, "v_num_attention_heads": 4} if architecture == "single-stream" else {}
        config = ViLBertConfig.from_preset("tiny", architecture=architecture, **extra)
        if architecture == "late-fusion":
            with pytest.raises(ConfigError):
                check_model(config, 1.0)
        else:
            check_model(config, 1.0)
        check_model(config, 0.0)  # no supervision asked: any architecture


@pytest.mark.parametrize(("content", "problem"), [
    ({"not": "a list"}, "expected a JSON list"),
    ([{"question_id": 123456, "box": [0, 0, 10, 10]}], "question_id 123456, which the questions file does not have"),
])
def test_the_command_line_refuses_a_bad_grounding_file_in_one_line_naming_it(zoo, tmp_path, content, problem):
    copy = copy_vqa_files(zoo, tmp_path / "data")
    bad = copy / "v2_mscoco_train2014_grounding.json"
    bad.write_text(json.dumps(content))
    out = tmp_path / "run"
    line = assert_refused(["finetune", "--task", "vqa", *zoo["vqa"], "model.preset=tiny", f"data.root={copy}",
                           "data.grounding_weight=1.0", f"train.output_dir={out}"], names=[str(bad)],
                          watch=[tmp_path])
    assert problem in line and not out.exists()
