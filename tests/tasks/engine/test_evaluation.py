"""What the fine-tuning tasks share: the evaluation pass over a split."""

import pytest
import torch
from torch import nn

from tasks.engine.evaluation import eval_batches, eval_mode


def test_eval_batches_run_in_eval_mode_in_order_and_restore_training():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    dataset = [{"x": torch.tensor([float(i), 0.0]), "id": i} for i in range(5)]

    def collate(samples):
        return {"x": torch.stack([s["x"] for s in samples]), "id": [s["id"] for s in samples]}

    seen = []
    for batch in eval_batches(model, dataset, collate, batch_size=2):
        assert not model.training and batch["x"].device == next(model.parameters()).device
        seen += batch["id"]
    assert seen == [0, 1, 2, 3, 4] and model.training


def test_eval_mode_restores_the_mode_after_an_error():
    model = nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training
    with eval_mode(model.eval()):
        pass
    assert not model.training
