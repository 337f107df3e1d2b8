"""End-to-end pretraining through `vilbert pretrain` on a tiny model and tiny data (seconds on CPU)."""

import json

import numpy as np
import pytest
import torch
import yaml
from tiny_pretrain_data import write_pretraining_data

from tasks import cli
from tasks.engine.checkpoints import STATE_FILE, list_checkpoints
from tasks.engine.config import load_config
from tasks.engine.trainer import Trainer
from tasks.pretraining import PretrainConfig, PretrainingTask


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_pretraining_data(tmp_path_factory.mktemp("pretrain_data"))


def write_config(tmp_path, paths, **train):
    config = {
        "model": {"preset": "tiny"},
        "data": {
            "tokenizer": str(paths["vocab"]),
            "train_features": str(paths["train_features"]),
            "train_captions": str(paths["train_captions"]),
            "val_features": str(paths["val_features"]),
            "val_captions": str(paths["val_captions"]),
            "max_text_length": 16,
            "max_regions": 9,
            "eval_batch_size": 8,
            "retrieval_chunk": 5,
        },
        "train": {"output_dir": str(tmp_path / "run"), "epochs": 8, "global_batch_size": 16, "num_workers": 0,
                  "log_every": 3, "device": "cpu", **train},
        "optim": {"lr": 3e-3, "warmup": 0.1},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(run_dir, kind):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def test_pretrain_command_trains_logs_checkpoints_and_loss_falls(tmp_path, paths, capsys):
    config = write_config(tmp_path, paths)
    assert cli.main(["pretrain", "--config", str(config), "train.eval_every=12"]) == 0
    run = tmp_path / "run"
    train = records(run, "train")
    assert train[-1]["step"] == 24  # 48 pairs / 16 × 8 epochs
    losses = [r["loss"] for r in train]
    assert np.mean(losses[-2:]) < 0.8 * losses[0]  # steps 19-24 against steps 1-3
    assert {"mlm_loss", "region_loss", "alignment_loss", "lr", "samples_per_s", "grad_norm"} <= set(train[0])
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [12, 24]
    for key in ("mlm_accuracy", "region_accuracy", "alignment_accuracy", "retrieval_r1", "retrieval_r5",
                "retrieval_r10"):
        assert 0 <= evals[-1][key] <= 100
    assert evals[-1]["retrieval_r10"] >= evals[-1]["retrieval_r1"]
    last = list_checkpoints(run)[-1]
    assert last.name == "step-00000024"
    assert {"config.json", "model.safetensors", STATE_FILE, "run_config.yaml", "run.json"} <= {
        p.name for p in last.iterdir()}
    # the run record: in the run directory and the checkpoint, the stores' extractors in train, val order
    expected = {"task": "pretrain", "task_token": None, "architecture": "pretraining", "feature_extractor": [
        {"detector": "synthetic", "file": paths[f"{split}_features"].name} for split in ("train", "val")]}
    assert json.loads((run / "run.json").read_text()) == expected == json.loads((last / "run.json").read_text())
    saved = load_config(run / "config.yaml", PretrainConfig)
    assert saved.train.eval_every == 12 and saved.model.preset == "tiny"
    from vilbert import ViLBertForPreTraining

    assert ViLBertForPreTraining.from_pretrained(last).config.hidden_size == 32
    out = capsys.readouterr().out
    assert "run directory" in out and "best mlm_accuracy" in out


@pytest.mark.parametrize("grouping", [[], ["train.group_by_length=true", "data.negatives=image"]], ids=["fixed-length", "length-grouped"])
def test_pretraining_resume_reproduces_the_uninterrupted_losses(tmp_path, paths, monkeypatch, grouping):
    overrides = ["train.epochs=2", "train.log_every=1", "train.save_every=3", "train.eval_at_end=false",
                 "train.eval_every=100", *grouping]
    config = load_config(write_config(tmp_path, paths), PretrainConfig, [*overrides, f"train.output_dir={tmp_path}/a"])
    full = Trainer(PretrainingTask(config), config.train, config.optim).fit()

    crashed = load_config(write_config(tmp_path, paths), PretrainConfig, [*overrides, f"train.output_dir={tmp_path}/b"])
    calls = {"n": 0}
    original = PretrainingTask.training_step

    def dies_at_step_5(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(PretrainingTask, "training_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        Trainer(PretrainingTask(crashed), crashed.train, crashed.optim).fit()
    monkeypatch.setattr(PretrainingTask, "training_step", original)
    assert cli.main(["pretrain", "--config", str(write_config(tmp_path, paths)), *overrides,
                     f"train.output_dir={tmp_path}/b", "--resume"]) == 0
    assert [r["loss"] for r in records(tmp_path / "b", "train")] == [r["loss"] for r in records(full.run_dir, "train")]
    a = torch.load(list_checkpoints(tmp_path / "a")[-1] / STATE_FILE, weights_only=True)
    b = torch.load(list_checkpoints(tmp_path / "b")[-1] / STATE_FILE, weights_only=True)
    assert a["state"] == b["state"]


def test_strict_missing_images_fail_before_training(tmp_path, paths, capsys):
    captions = json.loads(paths["train_captions"].read_text())
    captions["not_in_store"] = "a red thing"
    bad = tmp_path / "caption_train.json"
    bad.write_text(json.dumps(captions))
    config = write_config(tmp_path, paths)
    args = ["pretrain", "--config", str(config), f"data.train_captions={bad}", "train.epochs=1"]
    assert cli.main([*args, "--strict"]) == 2
    assert "'not_in_store'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written
    assert cli.main(args) == 0  # without --strict: dropped with a warning


def test_unknown_config_key_is_one_line_error(tmp_path, paths, capsys):
    assert cli.main(["pretrain", "--config", str(write_config(tmp_path, paths)), "train.bach=3"]) == 2
    assert "train.bach" in capsys.readouterr().err


def test_store_without_cls_prob_is_rejected(tmp_path, paths, capsys):
    from tiny_pretrain_data import make_images, write_store

    plain = write_store(tmp_path / "plain.h5", make_images(48, seed=0), cls_prob=False)
    assert cli.main(["pretrain", "--config", str(write_config(tmp_path, paths)), f"data.train_features={plain}"]) == 2
    assert "cls_prob" in capsys.readouterr().err


@pytest.mark.parametrize("objective, weight", [(1, 1.0), (2, 0.0)])
def test_objective_2_weights_the_alignment_loss_zero(tmp_path, paths, objective, weight):
    config = load_config(write_config(tmp_path, paths), PretrainConfig, [f"data.objective={objective}"])
    task = PretrainingTask(config)
    model = task.build_model()
    batch = task.collate([task.dataset("train").sample(i, 0) for i in range(8)])
    step = task.training_step(model, batch)
    counts = task.label_counts(batch)
    assert counts["alignment"] == 8
    torch.testing.assert_close(step.loss_sums["alignment"], weight * step.metrics["alignment_loss"] * 8)
    torch.testing.assert_close(step.loss_sums["mlm"], step.metrics["mlm_loss"] * counts["mlm"])
    torch.testing.assert_close(step.loss_sums["region"], step.metrics["region_loss"] * counts["region"])
    assert step.metrics["alignment_loss"] > 0
