"""InfoNCE: the hand-computed 3x3 case, excluded rows, and two gloo ranks equal to one process."""

import math

import pytest
import torch
import torch.multiprocessing as mp

from tasks.ranking.contrastive import contrastive_loss
from tests.fixtures.contrastive_ranks import loss_and_grads, rank_worker, toy_problem
from tests.fixtures.local_ports import free_port


def _ce(logits, target):
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_info_nce_equals_the_hand_computed_3x3_case():
    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    image = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0, 1.0]])
    # similarities text·image: [[1, .6, 0], [0, .8, 0], [0, 0, 1]], times the scale 2
    text_to_image = [_ce([2.0, 1.2, 0.0], 0), _ce([0.0, 1.6, 0.0], 1), _ce([0.0, 0.0, 2.0], 2)]
    image_to_text = [_ce([2.0, 0.0, 0.0], 0), _ce([1.2, 1.6, 0.0], 1), _ce([0.0, 0.0, 2.0], 2)]
    expected = (sum(text_to_image) / 3 + sum(image_to_text) / 3) / 2
    assert contrastive_loss(text, image, torch.tensor(2.0)).item() == pytest.approx(expected, rel=1e-6)
    # an excluded row is neither a query nor a negative: the 2x2 problem of the other rows
    valid = torch.tensor([True, False, True])
    two = ([_ce([2.0, 0.0], 0), _ce([0.0, 2.0], 1)], [_ce([2.0, 0.0], 0), _ce([0.0, 2.0], 1)])
    assert contrastive_loss(text, image, torch.tensor(2.0), valid).item() == pytest.approx(
        (sum(two[0]) / 2 + sum(two[1]) / 2) / 2, rel=1e-5)


def test_two_gloo_ranks_give_the_single_process_loss_and_gradients(tmp_path):
    mp.spawn(rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    loss, grads = loss_and_grads(*toy_problem())
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        for got, want in zip(result["grads"], grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
