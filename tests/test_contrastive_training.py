"""The contrastive switch in pretraining and retrieval fine-tuning: the term is added, logged and learned."""

import json

import numpy as np
import pytest
from test_pretrain import records, write_config
from test_retrieval import _task, flickr  # noqa: F401  (fixture)
from tiny_pretrain_data import write_pretraining_data

from tasks import cli
from tasks.engine.checkpoints import list_checkpoints


def test_pretraining_with_contrastive_weight_learns_a_dual_encoder(tmp_path):
    paths = write_pretraining_data(tmp_path / "data")
    config = write_config(tmp_path, paths)
    assert cli.main(["pretrain", "--config", str(config), "data.contrastive_weight=1.0", "train.epochs=20"]) == 0
    run = tmp_path / "run"
    train = records(run, "train")
    contrastive = [r["contrastive_loss"] for r in train]
    assert np.mean(contrastive[-3:]) < 0.85 * np.mean(contrastive[:3])  # from about ln 8 (8 aligned pairs)
    final = records(run, "eval")[-1]
    assert {"retrieval_dual_r1", "retrieval_dual_r5", "retrieval_dual_r10", "retrieval_r1"} <= set(final)
    assert final["retrieval_dual_r1"] > 100 / 12  # above chance among the 12 held-out images
    saved = json.loads((list_checkpoints(run)[-1] / "config.json").read_text())
    assert saved["dual_embedding_size"] == 256


def test_retrieval_step_adds_the_contrastive_term_over_true_pairs(flickr):  # noqa: F811
    task = _task(flickr, contrastive_weight=0.5)
    model = task.build_model().eval()  # no dropout: the two steps see the same function
    assert model.config.dual_embedding_size == 256
    dataset = task.dataset("train")
    batch = task.collate([dataset[i] for i in range(3)])
    out = task.training_step(model, batch)
    plain = _task(flickr).training_step(model, batch)
    assert out.metrics["contrastive_loss"].item() > 0
    # per-sample sums over the batch's 3 samples: the contrastive mean counts once per sample
    assert out.loss_sums["loss"].item() == pytest.approx(
        plain.loss_sums["loss"].item() + 3 * 0.5 * out.metrics["contrastive_loss"].item(), rel=1e-5)
