"""The debiasing losses (`data.debias: rubi | lmh`) against hand-computed cases, the answer prior, the branches
they add to the model, and the refusal of a debias mode on a task without an answer prior."""

import math

import pytest
import torch

from tasks.debiasing import AnswerPrior, lmh_loss, rubi_loss
from tasks.errors import ConfigError
from tests.fixtures.cli_check import assert_refused
from tests.fixtures.task_zoo import build_task, write_zoo


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(logit: float, target: float) -> float:
    return -(target * math.log(_sigmoid(logit)) + (1 - target) * math.log(1 - _sigmoid(logit)))


def test_rubi_masks_the_fused_logits_by_the_question_only_sigmoid_and_adds_its_classifier_loss():
    fused = torch.tensor([[1.0, -1.0]])
    question_only = torch.tensor([[0.0, 2.0]])
    classified = torch.tensor([[0.5, 0.0]])
    target = torch.tensor([[1.0, 0.0]])
    expected = (_bce(1.0 * 0.5, 1.0) + _bce(-1.0 * _sigmoid(2.0), 0.0)  # masked fused branch
                + _bce(0.5, 1.0) + _bce(0.0, 0.0))  # the question-only classifier
    assert rubi_loss(fused, question_only, classified, target).item() == pytest.approx(expected, rel=1e-6)


def _entropy(x: float) -> float:
    p = _sigmoid(x)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_learned_mixin_adds_the_gated_smoothed_prior_logit_and_the_entropy_penalty_averaged_over_answers():
    logits = torch.tensor([[0.0, 1.0]])
    gate = torch.tensor([0.0])  # g = softplus(0) = ln 2
    smoothing = torch.tensor([-1.0])  # sigma = sigmoid(-1), the initial smoothing
    prior = torch.tensor([[0.8, 0.2]])
    target = torch.tensor([[1.0, 0.0]])
    g, sigma = math.log(2.0), _sigmoid(-1.0)
    shift = [g * math.log((0.8 + sigma) / (0.2 + sigma)), g * math.log((0.2 + sigma) / (0.8 + sigma))]
    bce = _bce(0.0 + shift[0], 1.0) + _bce(1.0 + shift[1], 0.0)
    assert lmh_loss(logits, gate, smoothing, prior, target, 0.0).item() == pytest.approx(bce, rel=1e-6)
    penalised = bce + 0.36 * (_entropy(shift[0]) + _entropy(shift[1])) / 2  # the mean over the two answers
    assert lmh_loss(logits, gate, smoothing, prior, target, 0.36).item() == pytest.approx(penalised, rel=1e-6)


def test_an_answer_the_prior_rules_out_keeps_a_gradient_on_the_models_own_logit():
    # the collapse of the unsmoothed version: prior 0 gave the mixed logit z - 6.4 and z no gradient, so z of the
    # answers a question type never has drifted above the right one; smoothed, z = 0 still gets pushed down
    logits = torch.zeros(1, 3, requires_grad=True)
    prior = torch.tensor([[1.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    lmh_loss(logits, torch.tensor([0.0]), torch.tensor([-1.0]), prior, target, 0.36).backward()
    g, sigma = math.log(2.0), _sigmoid(-1.0)
    ruled_out = _sigmoid(g * math.log(sigma / (1 + sigma)))  # d BCE / d z at z = 0, target 0
    assert ruled_out > 0.2
    assert logits.grad[0, 1:].tolist() == pytest.approx([ruled_out, ruled_out], rel=1e-5)


def test_the_learned_mixin_gate_and_smoothing_get_a_gradient_and_a_zero_gate_leaves_plain_bce():
    logits = torch.tensor([[0.3, -0.2]])
    prior = torch.tensor([[0.7, 0.3]])
    target = torch.tensor([[1.0, 0.0]])
    gate = torch.tensor([-60.0])  # softplus ~ 0: no prior
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    assert lmh_loss(logits, gate, torch.tensor([-1.0]), prior, target, 0.0).item() == pytest.approx(plain.item(), rel=1e-6)
    gate = torch.tensor([0.5], requires_grad=True)
    smoothing = torch.tensor([-1.0], requires_grad=True)
    lmh_loss(logits, gate, smoothing, prior, target, 0.36).backward()
    assert gate.grad.abs().item() > 0 and smoothing.grad.abs().item() > 0


def test_the_answer_prior_averages_targets_per_question_type():
    prior = AnswerPrior(["color", "color", "count"], [{0: 1.0}, {1: 0.6, 0: 0.3}, {2: 1.0}], 3)
    assert prior.types == ["color", "count"]
    torch.testing.assert_close(prior.table[prior.row("color")], torch.tensor([0.65, 0.3, 0.0]))
    torch.testing.assert_close(prior.table[prior.row("count")], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(prior.table[prior.row("unseen")], torch.tensor([1.3, 0.6, 1.0]) / 3)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"), ["vqa", "gqa", "genome-qa", "nlvr2"])


@pytest.mark.parametrize("name", ["vqa", "gqa", "genome-qa"])
@pytest.mark.parametrize("mode", ["rubi", "lmh"])
def test_a_debiased_training_step_computes_the_mode_loss_and_evaluation_reads_the_fused_head(name, mode, zoo):
    task = build_task(name, [*zoo[name], f"data.debias={mode}"])
    torch.manual_seed(0)
    model = task.build_model()
    branch = "question_only_branch" if mode == "rubi" else "mixin_gate"
    assert hasattr(model, branch)
    if mode == "lmh":  # Clark et al.'s initial smoothing, sigmoid(-1)
        assert model.mixin_gate.smoothing_logit.tolist() == [-1.0]
    batch = task.collate([task.dataset("train")[i] for i in range(2)])
    loss = task.training_step(model, batch).loss_sums["loss"]
    loss.backward()
    assert all(p.grad is not None for p in getattr(model, branch).parameters())
    if mode == "lmh":
        assert (batch["prior_row"] >= 0).all()
    model.eval()
    before = task.predict(model, "val")
    with torch.no_grad():
        for p in getattr(model, branch).parameters():
            p.add_(torch.randn_like(p))
    assert task.predict(model, "val") == before  # the branches only train


def test_the_rubi_branch_does_not_train_the_question_encoder(zoo):
    task = build_task("vqa", [*zoo["vqa"], "data.debias=rubi"])
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(2)])
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "region_features",
                                          "region_locations", "region_mask")}, heads=["question_only_answer_logits"])
    out.question_only_answer_logits.sum().backward()
    assert all(p.grad is None for p in model.vilbert.parameters())


def test_a_debias_mode_on_a_task_without_an_answer_prior_is_refused(zoo):
    with pytest.raises(ConfigError, match="data.debias=lmh: task nlvr2 has no answer prior"):
        build_task("nlvr2", [*zoo["nlvr2"], "data.debias=lmh"])
    with pytest.raises(ConfigError, match="data.debias: unknown mode 'lhm'"):
        build_task("vqa", [*zoo["vqa"], "data.debias=lhm"])


def test_the_command_line_refuses_a_debias_mode_on_nlvr2_in_one_line(zoo, tmp_path):
    out = tmp_path / "run"
    line = assert_refused(["finetune", "--task", "nlvr2", "model.preset=tiny", *zoo["nlvr2"], "data.debias=rubi",
                           f"train.output_dir={out}"], names=["data.debias"], watch=[tmp_path])
    assert "no answer prior" in line and not out.exists()
