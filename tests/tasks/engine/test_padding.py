"""Batches padded to their longest item give every registered task the outputs, losses and gradients of fixed
padding (issue 23), and length-grouped orders stay exact: deterministic, sharded and resumable.

Every task's collate cuts text and regions to the batch's longest item; `pad_to` pads the same batch back out to
(at least) the configured lengths, as the reference's datasets do. Under masked attention the real positions see
the same inputs, so per-item outputs, each loss term and the gradients agree within 1e-5 (fp32).
"""

import numpy as np
import pytest
import torch
from torch import nn

from tasks.engine.evaluation import in_dataset_order
from tasks.engine.padding import longest, pad_to, pad_to_multiple
from tasks.engine.sampler import ResumableDistributedSampler, length_order
from tests.fixtures.task_zoo import ZOO_TASKS, build_task, write_zoo

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "region_features", "region_locations", "region_mask")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"))


def _model(task):
    torch.manual_seed(0)
    model = task.build_model().train()
    for module in model.modules():  # away from BERT's 0.02 init, so that padding mistakes show in the outputs
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return model


def _run(task, model, batch):
    """Loss terms, gradients and the real positions' trunk outputs of one batch."""
    model.zero_grad(set_to_none=True)
    output = task.training_step(model, batch)
    sum(output.loss_sums.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        trunk = model.vilbert(**{k: batch[k] for k in MODEL_INPUTS})
    length, regions = batch["attention_mask"].bool(), batch["region_mask"].bool()
    outputs = {"text": trunk.text_hidden[length], "vision": trunk.vision_hidden[regions],
               "pooled_text": trunk.pooled_text, "pooled_vision": trunk.pooled_vision}
    return {k: v.detach() for k, v in output.loss_sums.items()}, grads, outputs


@pytest.mark.parametrize("name", ZOO_TASKS)
def test_batches_padded_to_their_longest_item_give_the_fixed_padding_results(name, zoo):
    task = build_task(name, zoo[name])
    dataset = task.dataset("train")
    batch = task.collate([dataset.sample(i % len(dataset), 0) for i in range(4)])
    real = longest(batch)
    assert batch["attention_mask"].shape[1] == real["text"] and batch["region_mask"].shape[1] == real["regions"]
    data = task.config.data
    fixed = pad_to(batch, task.padded_keys, text=max(real["text"] + 2, data.max_text_length),
                   regions=max(real["regions"] + 2, task.max_regions))
    assert fixed["attention_mask"].shape[1] > real["text"] and fixed["region_mask"].shape[1] > real["regions"]
    model = _model(task)
    losses, grads, outputs = _run(task, model, batch)
    fixed_losses, fixed_grads, fixed_outputs = _run(task, model, fixed)
    assert sorted(losses) == sorted(fixed_losses)
    for key, value in losses.items():
        torch.testing.assert_close(value, fixed_losses[key], rtol=1e-5, atol=1e-6, msg=f"{name}: loss {key}")
    for key, value in outputs.items():
        torch.testing.assert_close(value, fixed_outputs[key], rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")
    assert sorted(grads) == sorted(fixed_grads)
    flat = torch.cat([g.flatten() for g in grads.values()])
    other = torch.cat([fixed_grads[n].flatten() for n in grads])
    assert flat.norm() > 0 and (other - flat).norm() <= 1e-5 * flat.norm(), f"{name}: gradients differ"


def test_padding_to_a_multiple_rounds_each_axis_up_and_pads_labels_with_their_ignore_value(zoo):
    task = build_task("pretrain", zoo["pretrain"])
    dataset = task.dataset("train")
    batch = task.collate([dataset.sample(i, 0) for i in range(3)])
    real = longest(batch)
    bucketed = pad_to_multiple(batch, task.padded_keys, 32)
    assert bucketed["input_ids"].shape[1] == bucketed["mlm_labels"].shape[1] == 32 > real["text"]
    assert bucketed["region_mask"].shape[1] == bucketed["region_targets"].shape[1] == 32 > real["regions"]
    assert (bucketed["mlm_labels"][:, real["text"]:] == -100).all()
    assert (bucketed["region_labels"][:, real["regions"]:] == -100).all()
    assert (bucketed["region_mask"][:, real["regions"]:] == 0).all()
    with pytest.raises(ValueError, match="cannot cut the text axis"):
        pad_to(batch, task.padded_keys, text=real["text"] - 1)


def _lengths(n=240, seed=3):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(10, 101, n), rng.integers(4, 20, n)], axis=1)  # regions, then text


def test_length_grouped_batches_are_short_deterministic_and_the_same_on_every_rank_and_resume():
    lengths = _lengths()
    order = ResumableDistributedSampler(240, 8, 0, 1, seed=5, lengths=lengths, group_window=10)
    order.set_position(1, 0)
    epoch = order.epoch_order()
    assert sorted(epoch) == list(range(240))  # every sample once
    again = ResumableDistributedSampler(240, 8, 0, 1, seed=5, lengths=lengths, group_window=10)
    again.set_position(1, 0)
    np.testing.assert_array_equal(again.epoch_order(), epoch)  # a function of (seed, epoch) alone
    order.set_position(2, 0)
    assert not np.array_equal(order.epoch_order(), epoch)  # and another epoch is another order
    batches = epoch.reshape(-1, 8)
    padded_rows = lengths[batches, 0].max(1).sum() * 8
    random_rows = lengths[np.arange(240).reshape(-1, 8), 0].max(1).sum() * 8
    assert padded_rows < 0.75 * random_rows  # grouped batches pad much less than random ones
    ranks = []
    for rank in (0, 1):  # two ranks take alternate items of each global batch; a resume at step 4 continues
        sampler = ResumableDistributedSampler(240, 8, rank, 2, seed=5, lengths=lengths, group_window=10)
        sampler.set_position(1, 4)
        ranks.append([index for _, index in sampler])
    np.testing.assert_array_equal(np.stack(ranks, axis=1).reshape(-1), epoch[4 * 8:])


def test_evaluation_runs_longest_first_and_returns_predictions_in_dataset_order():
    class Items:
        region_counts = np.array([5, 9, 5, 2])
        text_lengths = np.array([3, 1, 7, 4])

        def __len__(self):
            return 4

    order = length_order(Items())
    assert order.tolist() == [1, 2, 0, 3]  # most regions first, then longest text
    made = [f"p{i}" for i in order]
    assert in_dataset_order(made, order) == ["p0", "p1", "p2", "p3"]


@pytest.mark.parametrize("name", ["vqa", "refcoco", "nlvr2"])
def test_sorted_evaluation_predicts_what_one_item_at_a_time_does(name, zoo):
    task = build_task(name, zoo[name])
    model = _model(task).eval()
    task.data.eval_batch_size = 3
    batched = task.predict(model, "val")
    task.data.eval_batch_size = 1
    single = task.predict(model, "val")
    assert len(batched) == len(single) > 1
    if name == "vqa":  # in the split's order, whatever order the batches ran in
        assert [p["question_id"] for p in batched] == [q.question_id for q in task.dataset("val").questions]
    for got, expected in zip(batched, single, strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            else:
                assert got[key] == value, key
