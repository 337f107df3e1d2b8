"""Debiasing losses for answer-classifier tasks (VQA, VQA-CP, GQA, Genome QA): `data.debias: none | rubi | lmh`.

Both are training-time changes of the loss; evaluation and prediction read the fused answer logits alone.

- `rubi` (Cadene et al., NeurIPS 2019): a question-only branch (the model's `question_only_branch`, on the
  text stream before its first co-attention layer, mean-pooled and *detached*, so it has not seen the image and
  never trains the question encoder) gives logits q; the fused logits z are
  masked by sigmoid(q) and the task loss is taken on z * sigmoid(q), plus the task loss of the branch's own
  classifier c(q). Answers the question alone predicts well get a mask near 1 and a small gradient through the
  fused branch; the fused branch has to learn what the question does not give.
- `lmh` (Learned-Mixin +H, Clark et al., EMNLP 2019): the bias model is the per-question-type answer prior b
  (the mean training target of each answer among the training questions of that type), smoothed as the paper's
  code does: each answer's (b, 1 - b) gets a learned sigma = sigmoid(s) added (s starts at -1, sigma = 0.27). The
  model's per-answer Bernoulli is mixed with that smoothed prior raised to a learned power g(x) >= 0 (softplus of
  a gate on the fused vector); for BCE targets the mixture is the logit z + g(x) · log((b + sigma) / (1 - b + sigma)),
  and the loss is BCE on it summed over answers, plus `entropy_weight` times the entropy of
  sigmoid(g(x) · log((b + sigma) / (1 - b + sigma))) *averaged* over answers (the +H penalty, which keeps g from
  shrinking the prior to nothing). Both details matter: an unsmoothed prior that is 0 for most answers of a
  type (clamped, its logit near -9) and an entropy summed over answers (which pays g to grow) leave the model's
  own logit of every answer the prior rules out without a gradient, so z alone, what evaluation reads, ranks
  those answers first (measured: docs/results.md, "Language priors").

A task takes part by setting `FinetuneTask.debias_supported`, giving each training item its question-type row
(`AnswerPrior.row`) and calling `debias_loss` in its training step; `model_settings` adds the branches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from tasks.errors import ConfigError

DEBIAS_MODES = ("none", "rubi", "lmh")
SMOOTHED_FLOOR = 1e-6  # the smoothed prior's terms are floored here before their log (sigma -> 0 would give log 0)


def check_mode(mode: str, task: str, supported: bool) -> None:
    """Refuse an unknown mode, or any mode but `none` on a task without an answer prior, naming the key."""
    if mode not in DEBIAS_MODES:
        raise ConfigError(f"data.debias: unknown mode {mode!r}; expected one of {', '.join(DEBIAS_MODES)}")
    if mode != "none" and not supported:
        raise ConfigError(f"data.debias={mode}: task {task} has no answer prior to debias against (debiasing "
                          "applies to vqa, vqa-cp, gqa and genome-qa)")


def model_settings(mode: str, num_labels: int) -> dict[str, object]:
    """The model config fields the mode's branches need."""
    if mode == "rubi":
        return {"question_only_labels": num_labels}
    if mode == "lmh":
        return {"mixin_gate": True}
    return {}


def heads(mode: str, answer_head: str) -> list[str]:
    """The model outputs a training step of this mode reads."""
    extra = {"rubi": ["question_only_logits", "question_only_answer_logits"],
             "lmh": ["mixin_gate_logit", "mixin_smoothing_logit"]}
    return [answer_head, *extra.get(mode, [])]


class AnswerPrior:
    """The per-question-type answer prior of a training set: row t, column j is the mean target of answer j over
    the training questions of type t. `row(type)` of an unseen type is the prior of every question."""

    def __init__(self, question_types: Sequence[str], targets: Iterable[Mapping[int, float]], num_labels: int):
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(num_labels, dtype=torch.float64))
        counts: dict[str, int] = defaultdict(int)
        total, count = torch.zeros(num_labels, dtype=torch.float64), 0
        for question_type, target in zip(question_types, targets, strict=True):
            row = sums[question_type]
            for label, score in target.items():
                row[label] += score
                total[label] += score
            counts[question_type] += 1
            count += 1
        if count == 0:
            raise ConfigError("data.debias: the training split has no questions to build the answer prior from")
        self.types = sorted(sums)
        self._row = {name: i for i, name in enumerate(self.types)}
        rows = [sums[name] / counts[name] for name in self.types] + [total / count]
        self.table = torch.stack(rows).float()  # [T + 1, C]; the last row: every question

    def row(self, question_type: str) -> int:
        return self._row.get(question_type, len(self.types))


def soft_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")


def rubi_loss(fused_logits: torch.Tensor, question_only_logits: torch.Tensor,
              question_only_answer_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE (summed) of the masked fused logits z * sigmoid(q), plus BCE of the question-only classifier c(q)."""
    masked = fused_logits.float() * torch.sigmoid(question_only_logits.float())
    return soft_bce(masked, target) + soft_bce(question_only_answer_logits, target)


def lmh_loss(logits: torch.Tensor, gate_logit: torch.Tensor, smoothing_logit: torch.Tensor, prior: torch.Tensor,
             target: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """BCE (summed) of z + g · log((b + sigma) / (1 - b + sigma)), g = softplus(gate), sigma = sigmoid(smoothing),
    plus `entropy_weight` times the entropy of sigmoid(g · log(...)) averaged over answers, summed over questions.
    `prior` b is [B, C], each question's type row; `smoothing_logit` s is one learned value ([1], or per question [B])."""
    b = prior.float()
    sigma = torch.sigmoid(smoothing_logit.float()).reshape(-1, 1)  # [B, 1] or [1, 1]
    prior_logit = torch.log((b + sigma).clamp(min=SMOOTHED_FLOOR)) - torch.log((1 - b + sigma).clamp(min=SMOOTHED_FLOOR))
    scaled = F.softplus(gate_logit.float()).unsqueeze(1) * prior_logit  # [B, C]
    loss = soft_bce(logits.float() + scaled, target)
    if entropy_weight:
        p = torch.sigmoid(scaled)
        entropy = -(p * F.logsigmoid(scaled) + (1 - p) * F.logsigmoid(-scaled))  # [B, C]
        loss = loss + entropy_weight * entropy.mean(dim=1).sum()
    return loss


def debias_loss(mode: str, out: object, answer_head: str, target: torch.Tensor, prior_rows: torch.Tensor | None,
                prior: AnswerPrior | None, entropy_weight: float) -> torch.Tensor:
    """The training loss (summed over the batch) of `mode` on a model output holding `heads(mode, answer_head)`."""
    logits = getattr(out, answer_head)
    if mode == "none":
        return soft_bce(logits, target)
    if mode == "rubi":
        return rubi_loss(logits, out.question_only_logits, out.question_only_answer_logits, target)
    if prior is None or prior_rows is None:
        raise ConfigError("data.debias=lmh: the task gave no answer prior")
    table = prior.table.to(logits.device)
    return lmh_loss(logits, out.mixin_gate_logit, out.mixin_smoothing_logit, table[prior_rows], target, entropy_weight)
