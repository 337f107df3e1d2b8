"""The training engine on a toy regression task: exact resume, NaN stop, checkpoints, schedule.

DDP equivalence (two gloo ranks through `Trainer.fit`, one process, accumulation) is tests/tasks/engine/test_exactness.py's,
on the real tasks.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tasks.engine.checkpoints import STATE_FILE, list_checkpoints
from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.optimization import build_optimizer, build_scheduler, parameter_groups
from tasks.engine.sampler import ResumableDistributedSampler
from tasks.engine.task import StepOutput, Task, TaskDataset
from tasks.engine.trainer import Trainer, TrainingDiverged
from tasks.errors import ConfigError
from tasks.finetuning import model_parameter_groups
from tests.fixtures.run_logs import records


class NoisyRegression(TaskDataset):
    """y = x·w + noise; the noise is drawn per (epoch, index), like pretraining masking."""

    def __init__(self, size=64, seed=0):
        rng = np.random.default_rng(123)
        self.x = rng.normal(size=(size, 6)).astype(np.float32)
        self.y = self.x @ rng.normal(size=6).astype(np.float32)
        self.seed = seed

    def __len__(self):
        return len(self.x)

    def sample(self, index, epoch):
        noise = np.random.default_rng([self.seed, epoch, index]).normal(scale=0.1)
        return self.x[index], np.float32(self.y[index] + noise)


class RegressionTask(Task):
    name = "regression"
    main_metric = "val_mse"
    higher_is_better = False

    def __init__(self, dropout=0.1, crash_after_calls=None, nan_at_call=None):
        self.dropout, self.crash_after_calls, self.nan_at_call = dropout, crash_after_calls, nan_at_call
        self.calls = 0
        self.data = NoisyRegression()

    def build_model(self):
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Dropout(self.dropout), nn.ReLU(), nn.Linear(16, 1))

    def dataset(self, split):
        return self.data

    def collate(self, samples):
        x, y = zip(*samples, strict=True)
        return {"x": torch.from_numpy(np.stack(x)), "y": torch.tensor(y)}

    def training_step(self, model, batch):
        self.calls += 1
        if self.crash_after_calls is not None and self.calls > self.crash_after_calls:
            raise KeyboardInterrupt  # the process dies here: nothing after the last checkpoint survives
        error = model(batch["x"]).squeeze(-1) - batch["y"]
        loss = (error**2).sum()
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return StepOutput({"loss": loss}, {"abs_error": error.abs().mean()})

    def evaluate(self, model, split, progress=None):
        x = torch.from_numpy(self.data.x[:16])
        return {"val_mse": float(((model(x).squeeze(-1) - torch.from_numpy(self.data.y[:16])) ** 2).mean())}


def train_config(tmp_path, name, **overrides):
    values = dict(output_dir=str(tmp_path / name), epochs=2, global_batch_size=16, grad_accumulation=2,
                  num_workers=0, log_every=1, save_every=4, eval_every=4, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def test_resume_after_kill_reproduces_the_uninterrupted_losses(tmp_path):
    optim = OptimConfig(lr=3e-2, warmup=2)
    full = Trainer(RegressionTask(), train_config(tmp_path, "full"), optim).fit()
    assert full.state.step == 8  # 64 samples / 16 per step × 2 epochs

    crashed = train_config(tmp_path, "crashed")
    with pytest.raises(KeyboardInterrupt):  # 5 steps × 2 micro-steps survive; the checkpoint is at step 4
        Trainer(RegressionTask(crash_after_calls=10), crashed, optim).fit()
    assert [p.name for p in list_checkpoints(crashed.output_dir)] == ["step-00000004"]
    resumed = Trainer(RegressionTask(), crashed, optim).fit(resume=crashed.output_dir)

    expected = [(r["step"], r["loss"], r["lr"]) for r in records(full.run_dir)]
    got = [(r["step"], r["loss"], r["lr"]) for r in records(resumed.run_dir)]
    assert [s for s, _, _ in got] == list(range(1, 9))  # lines past the checkpoint were replaced, not duplicated
    assert got == expected  # bitwise: same data order, same masking noise, same dropout
    for a, b in zip(full.run_dir.joinpath("checkpoints").iterdir(), resumed.run_dir.joinpath("checkpoints").iterdir(),
                    strict=True):
        assert a.name == b.name


def test_resume_mid_epoch_with_workers_matches_too(tmp_path):
    optim = OptimConfig(lr=3e-2, warmup=0.25)
    config = dict(epochs=1, global_batch_size=8, grad_accumulation=1, num_workers=1, save_every=3, eval_every=None)
    full = Trainer(RegressionTask(), train_config(tmp_path, "full", **config), optim).fit()
    crashed = train_config(tmp_path, "crashed", **config)
    with pytest.raises(KeyboardInterrupt):
        Trainer(RegressionTask(crash_after_calls=5), crashed, optim).fit()
    resumed = Trainer(RegressionTask(), crashed, optim).fit(resume=list_checkpoints(crashed.output_dir)[-1])
    assert [r["loss"] for r in records(resumed.run_dir)] == [r["loss"] for r in records(full.run_dir)]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = train_config(tmp_path, "nan", log_every=2, save_every=2, eval_every=None)
    with pytest.raises(TrainingDiverged, match=r"step 3\b.*step-00000002"):
        Trainer(RegressionTask(nan_at_call=5), config, OptimConfig(lr=1e-2)).fit()  # call 5 = step 3
    assert [p.name for p in list_checkpoints(config.output_dir)] == ["step-00000002"]


def test_resuming_from_a_directory_without_checkpoints_is_a_resume_error(tmp_path):
    from tasks.errors import ResumeError, TasksError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match="no checkpoint to resume from") as error:
        Trainer(RegressionTask(), train_config(tmp_path, "run"), OptimConfig()).fit(resume=tmp_path / "empty")
    assert isinstance(error.value, TasksError)  # the CLI reports it as one line, exit 2


def test_checkpoints_hold_weights_state_and_config_and_keep_last_k_and_best(tmp_path):
    config = train_config(tmp_path, "ckpt", epochs=4, save_every=2, eval_every=2, keep_last=1)
    result = Trainer(RegressionTask(), config, OptimConfig(lr=1e-2), run_config=config).fit()
    names = [p.name for p in list_checkpoints(config.output_dir)]
    best = f"step-{result.state.best_step:08d}"
    assert names[-1] == "step-00000016" and best in names and len(names) <= 2
    last = list_checkpoints(config.output_dir)[-1]
    assert (last / "model.safetensors").is_file() and (last / "run_config.yaml").is_file()
    state = torch.load(last / STATE_FILE, weights_only=True)
    assert state["state"]["step"] == 16 and state["state"]["epoch"] == 4 and state["state"]["step_in_epoch"] == 0
    assert (result.run_dir / "config.yaml").is_file()
    evals = records(result.run_dir, "eval")
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert result.state.best_value == min(r["val_mse"] for r in evals)
    assert not [p for p in (result.run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_no_weight_decay_on_biases_and_layernorm():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    optimizer = build_optimizer(parameter_groups(model, OptimConfig(weight_decay=0.01)), OptimConfig())
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in plain["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert optimizer.defaults["betas"] == (0.9, 0.98)


def test_head_lr_gives_the_pooled_heads_their_own_groups_keeping_the_decay_split():
    from vilbert import ViLBertConfig, ViLBertForVLTasks

    model = ViLBertForVLTasks(ViLBertConfig.from_preset("tiny"))
    config = OptimConfig(lr=2e-5, head_lr=1e-4, weight_decay=0.01)
    optimizer = build_optimizer(model_parameter_groups(model, config), config)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [(g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]
    assert [(lr, wd) for lr, wd, _ in by_group] == [(2e-5, 0.01), (2e-5, 0.0), (1e-4, 0.01), (1e-4, 0.0)]
    heads = ("answer_head.", "gqa_answer_head.", "binary_head.", "pair_head.", "tri_head.")
    assert by_group[2][2] | by_group[3][2] == {n for n in names.values() if n.startswith(heads)}
    assert "answer_head.layer_norm.weight" in by_group[3][2] and "pair_head.bias" in by_group[3][2]
    assert "pair_head.weight" in by_group[2][2] and "answer_head.classifier.weight" in by_group[2][2]
    assert "region_score_head.weight" in by_group[0][2]  # the reference's vision_logit keeps the base lr
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)

    plain = build_optimizer(model_parameter_groups(model, OptimConfig(lr=2e-5, head_lr=None)), OptimConfig(lr=2e-5))
    assert [g["lr"] for g in plain.param_groups] == [2e-5, 2e-5]
    scheduler = build_scheduler(optimizer, warmup=2, total=4)
    assert scheduler.get_last_lr() == pytest.approx([1e-5, 1e-5, 5e-5, 5e-5])  # the schedule scales every group


def test_text_lr_gives_the_bert_initialised_text_stream_its_own_groups():
    from vilbert import ViLBertConfig, ViLBertForPreTraining

    model = ViLBertForPreTraining(ViLBertConfig.from_preset("tiny", task_specific_tokens=True))
    config = OptimConfig(lr=1e-3, text_lr=1e-4, weight_decay=0.01)
    optimizer = build_optimizer(model_parameter_groups(model, config), config)
    names = {id(p): n for n, p in model.named_parameters()}
    text = {names[id(p)] for g in optimizer.param_groups if g["lr"] == 1e-4 for p in g["params"]}
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (1e-3, 0.01), (1e-3, 0.0), (1e-4, 0.01), (1e-4, 0.0)]
    assert text == {n for n in names.values()
                    if n.startswith(("vilbert.embeddings.", "vilbert.encoder.text_layers."))} - {
        "vilbert.embeddings.task_embeddings.weight"}
    assert "vilbert.embeddings.word_embeddings.weight" in text  # also the tied MLM decoder, as in BERT
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)


def test_schedule_warms_up_linearly_then_decays_to_zero():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup=4, total=12)
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(lrs[4:], [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert scheduler.get_last_lr()[0] == 0.0


def test_sampler_shards_cover_each_global_batch_and_resume_skips_done_steps():
    single = list(ResumableDistributedSampler(50, 8, rank=0, world_size=1, seed=3))
    shards = [list(ResumableDistributedSampler(50, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(single) == 48 and all(len(s) == 24 for s in shards)
    for step in range(6):
        together = {i for s in shards for _, i in s[step * 4 : (step + 1) * 4]}
        assert together == {i for _, i in single[step * 8 : (step + 1) * 8]}
    sampler = ResumableDistributedSampler(50, 8, rank=0, world_size=1, seed=3)
    sampler.set_position(epoch=0, start_step=2)
    assert list(sampler) == single[16:] and len(sampler) == 32
    sampler.set_position(epoch=1, start_step=0)
    assert [i for _, i in sampler] != [i for _, i in single] and all(e == 1 for e, _ in sampler)


def test_group_by_length_needs_text_lengths_from_the_task(tmp_path):
    config = train_config(tmp_path, "grouped", epochs=1, group_by_length=True)
    with pytest.raises(ConfigError, match="group_by_length.*text_lengths"):
        Trainer(RegressionTask(), config, OptimConfig()).fit()


def test_length_grouped_sampler_covers_the_epoch_in_short_batches_and_resumes():
    lengths = np.random.default_rng(0).integers(5, 40, size=203)
    plain = [i for _, i in ResumableDistributedSampler(203, 8, rank=0, world_size=1, seed=3)]
    grouped = [i for _, i in ResumableDistributedSampler(203, 8, rank=0, world_size=1, seed=3, lengths=lengths,
                                                         group_window=5)]
    assert sorted(grouped) == sorted(plain)  # the same samples this epoch, each once
    batches = np.array(grouped).reshape(-1, 8)
    padded = lambda rows: sum(lengths[b].max() * len(b) for b in rows)  # noqa: E731
    assert padded(batches) < 0.8 * padded(np.array(plain).reshape(-1, 8))
    assert not all(np.diff(lengths[batches].max(1)) <= 0)  # batch order shuffled, not longest first
    shards = [[i for _, i in ResumableDistributedSampler(203, 8, rank=r, world_size=2, seed=3, lengths=lengths,
                                                           group_window=5)] for r in range(2)]
    for step, batch in enumerate(batches):  # each global batch is split over the ranks
        assert set(shards[0][step * 4 : step * 4 + 4]) | set(shards[1][step * 4 : step * 4 + 4]) == set(batch)
    sampler = ResumableDistributedSampler(203, 8, rank=0, world_size=1, seed=3, lengths=lengths, group_window=5)
    sampler.set_position(epoch=0, start_step=7)
    assert [i for _, i in sampler] == grouped[56:]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_checkpoints_the_scaler(tmp_path, precision):
    config = train_config(tmp_path, precision, epochs=1, precision=precision, save_every=None, eval_every=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Trainer(RegressionTask(), config, OptimConfig(lr=1e-2)).fit()
    losses = [r["loss"] for r in records(result.run_dir)]
    assert len(losses) == 4 and all(np.isfinite(losses))
    state = torch.load(result.last_checkpoint / STATE_FILE, weights_only=True)
    assert ("scale" in state["scaler"]) == (precision == "fp16")  # a GradScaler only for fp16
    skipped = round(math.log2(2.0**16 / state["scaler"]["scale"])) if precision == "fp16" else 0
    assert state["scheduler"]["last_epoch"] == 4 - skipped  # the schedule advances only with real updates
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
