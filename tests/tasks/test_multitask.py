"""Multi-task training (tasks/multitask.py): the task schedule, stop-and-go, cleaning, resume, ranks, learning."""

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tasks.engine.checkpoints import list_checkpoints
from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.trainer import Trainer
from tasks.finetuning import ModelConfig
from tasks.multitask import (
    MemberConfig,
    MultiTask,
    MultiTaskConfig,
    MultiTaskSchedule,
    MultiTaskSettings,
    MultiTaskStopOnPlateau,
    clean_indices,
)
from tests.fixtures.local_ports import free_port
from tests.fixtures.run_logs import records
from tests.fixtures.tiny_12in1_data import write_gqa, write_jsonl, write_nlvr2, write_snli_ve
from tests.fixtures.tiny_task_data import write_store, write_vocab


def schedule(sampling="round-robin", sizes=(300, 100), stopped=(False, False), power=1.0, **kw):
    values = dict(batch_sizes=[10, 10], iterations=30, gap=4, grad_accumulation=1, rank=0, world_size=1, seed=0)
    values.update(kw)
    return MultiTaskSchedule(list(sizes), sampling=sampling, weights=[n ** power for n in sizes],
                             stopped=lambda: list(stopped), **values)


def members_of(plan):
    return np.bincount(plan.epoch_tasks(), minlength=2).tolist()


def test_samplers_give_each_task_its_share_of_an_epoch():
    round_robin = schedule()
    assert round_robin.epoch_tasks()[:4] == [0, 1, 0, 1] and members_of(round_robin) == [30, 30]
    assert members_of(schedule("proportional")) == [45, 15]  # 60 steps × 300/400 and × 100/400
    # temperature 2: weights √300 = 17.32 and √100 = 10, 60 × 17.32 / 27.32 = 38.04 → 38 and 22
    assert members_of(schedule("temperature", power=0.5)) == [38, 22]
    # a stopped task trains on iterations 0, 4, 8, ..., 28 of round-robin: 8 of 30
    assert members_of(schedule(stopped=(False, True))) == [30, 8]
    assert members_of(schedule("proportional", stopped=(True, False))) == [12, 15]  # every 4th of its 45 turns


def test_each_member_reads_its_own_epochs_whole_and_ranks_split_its_batches():
    plan = schedule(sizes=(40, 20), iterations=4)  # member 1 has 2 batches per epoch: it loops twice per epoch
    plan.set_position(0, 0)
    batches = list(plan)
    second = [key for batch, t in zip(batches, plan.epoch_tasks(), strict=True) if t == 1 for key in batch]
    assert [e for e, _ in second] == [0] * 20 + [1] * 20  # its own epochs 0 and 1
    assert sorted(i for _, (_, i) in second[:20]) == list(range(20))
    halves = []
    for rank in (0, 1):
        ranked = schedule(sizes=(40, 20), iterations=4, rank=rank, world_size=2)
        ranked.set_position(0, 0)
        halves.append(list(ranked))
    for whole, a, b in zip(batches, *halves, strict=True):
        assert sorted(whole) == sorted(a + b) and len(a) == len(b) == 5
    resumed = schedule(sizes=(40, 20), iterations=4)
    resumed.set_position(0, 3)
    assert list(resumed) == batches[3:]


def test_stop_and_go_stops_on_a_plateau_and_restarts_on_a_drop():
    controller = MultiTaskStopOnPlateau(patience=1, threshold=0.001, continue_threshold=0.005, cooldown=1)
    stops = []
    for score in [0.50, 0.60, 0.6003, 0.60, 0.599, 0.59, 0.59, 0.62]:
        controller.step(score)
        stops.append(controller.in_stop)
    # 0.6003 is no 0.1% gain: bad 1; the next bad one (2 > patience) stops; 0.599 is within 0.5% of the best
    # 0.6 (and its bad count is cleared by the cooldown); 0.59 falls 1.7% below it: training resumes
    assert stops == [False, False, False, True, True, False, False, False]
    assert controller.best == 0.62


def test_cleaning_removes_exactly_the_items_reading_held_out_images():
    assert clean_indices([("a",), ("b",), ("c", "d"), ("d", "e")], {"c", "x"}) == [0, 1, 3]


# ---------------------------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    ids = write_snli_ve(root / "snli") + write_nlvr2(root / "nlvr2") + write_gqa(root / "gqa")
    write_store(root / "f.h5", ids)
    write_vocab(root / "tok")
    return root


def member(base, name, batch=2, lr=2e-3, **data):
    folder = {"snli-ve": "snli", "nlvr2": "nlvr2"}[name]
    settings = {"root": str(base / folder), "features": [str(base / "f.h5")], "tokenizer": str(base / "tok"),
                "max_regions": 4, "max_text_length": 12, "eval_batch_size": 8, **data}
    return MemberConfig(name=name, resolved={"data": settings, "optim": {"lr": lr},
                                             "train": {"global_batch_size": batch, "epochs": 2}})


def multi_config(root, out, members, epochs=2, **multitask):
    no_dropout = {key: 0.0 for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "v_hidden_dropout_prob",
                                       "v_attention_probs_dropout_prob", "head_dropout_prob")}
    model = ModelConfig(preset="tiny", overrides={"task_specific_tokens": True, **no_dropout})
    train = TrainConfig(output_dir=str(root / out), epochs=epochs, num_workers=0, log_every=1, save_every=5,
                        eval_every=None, device="cpu", global_batch_size=2)
    return MultiTaskConfig(model=model, train=train, optim=OptimConfig(lr=2e-3, head_lr=4e-3, warmup=2),
                           multitask=MultiTaskSettings(**multitask), tasks=members)


class CrashingMultiTask(MultiTask):
    """Stops the process (as a kill would) after a number of training steps."""

    def __init__(self, config, crash_after):
        super().__init__(config)
        self.calls, self.crash_after = 0, crash_after

    def training_step(self, model, batch):
        self.calls += 1
        if self.calls > self.crash_after:
            raise KeyboardInterrupt
        return super().training_step(model, batch)


def test_a_killed_two_task_run_resumes_exactly(tiny):
    members = [member(tiny, "snli-ve"), member(tiny, "nlvr2", lr=1e-3)]
    full_config = multi_config(tiny, "full", members, stop_and_go=True)
    full = Trainer(MultiTask(full_config), full_config.train, full_config.optim).fit()
    assert full.state.step == 16  # 4 iterations (nlvr2: 8 items / 2) × 2 tasks × 2 epochs
    crashed = multi_config(tiny, "crashed", [member(tiny, "snli-ve"), member(tiny, "nlvr2", lr=1e-3)],
                           stop_and_go=True)
    with pytest.raises(KeyboardInterrupt):
        Trainer(CrashingMultiTask(crashed, 12), crashed.train, crashed.optim).fit()
    assert [p.name for p in list_checkpoints(crashed.train.output_dir)][-1] == "step-00000010"
    resumed_task = MultiTask(crashed)
    resumed = Trainer(resumed_task, crashed.train, crashed.optim).fit(resume=crashed.train.output_dir)
    keys = ("step", "loss", "lr", "snli-ve/train_loss", "nlvr2/train_loss")
    expected = [tuple(r.get(k) for k in keys) for r in records(full.run_dir)]
    assert [tuple(r.get(k) for k in keys) for r in records(resumed.run_dir)] == expected
    assert records(resumed.run_dir)[0]["snli-ve/train_loss"] is not None  # per-task lines: step 1 is snli-ve
    evaluations = records(resumed.run_dir, "eval")
    assert {"snli-ve/accuracy", "nlvr2/accuracy", "score"} <= set(evaluations[-1])
    assert evaluations[-1]["score"] == pytest.approx(
        (evaluations[-1]["snli-ve/accuracy"] + evaluations[-1]["nlvr2/accuracy"]) / 2)
    state = torch.load(list_checkpoints(resumed.run_dir)[-1] / "trainer_state.pt", weights_only=True)["task"]
    assert state["schedule"]["epoch"] == 1 and len(state["stop_and_go"]) == 2
    assert resumed_task.members[1].loss_scale == 1.0 and resumed_task.members[0].loss_scale == 2.0


def test_clean_train_sets_drops_training_items_on_held_out_images(tiny, tmp_path):
    entries = [json.loads(line) for line in (tiny / "snli" / "snli_ve_dev.jsonl").read_text().splitlines()]
    entries[0]["Flikr30kID"] = "1001.jpg"  # a dev hypothesis on a training image: its 2 training items go
    write_jsonl(tmp_path / "snli_ve_dev.jsonl", entries)
    for split in ("train", "test"):
        (tmp_path / f"snli_ve_{split}.jsonl").write_text((tiny / "snli" / f"snli_ve_{split}.jsonl").read_text())
    snli = member(tiny, "snli-ve", root=str(tmp_path))
    config = multi_config(tiny, "clean", [snli, member(tiny, "nlvr2")], clean_train_sets=True)
    task = MultiTask(config)
    dataset = task.dataset("train")
    assert task.removed == {"snli-ve": 2, "nlvr2": 0}
    assert [dataset.datasets[0].image_ids[i] for i in dataset.kept[0]] == [("1000",), ("1002",)] * 2
    assert len(dataset) == 4 + 8


def _rank_worker(rank, world_size, port, root, output_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pathlib import Path

    root = Path(root)
    config = multi_config(root, output_dir, [member(root, "snli-ve", batch=4), member(root, "nlvr2", batch=4)], 1)
    Trainer(MultiTask(config), config.train, config.optim).fit()
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_train_a_two_task_run_as_one_process(tiny):
    single = multi_config(tiny, "one", [member(tiny, "snli-ve", batch=4), member(tiny, "nlvr2", batch=4)], 1)
    one = Trainer(MultiTask(single), single.train, single.optim).fit()
    mp.start_processes(_rank_worker, args=(2, free_port(), str(tiny), "two"), nprocs=2, join=True,
                       start_method="spawn")
    two, ones = records(tiny / "two"), records(one.run_dir)
    assert [r["step"] for r in two] == list(range(1, 9)) and one.state.step == 8  # 4 iterations × 2 tasks
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in ones], rtol=1e-5)


def test_a_tiny_multi_task_run_learns_evaluates_per_task_and_seeds_single_task_runs(tiny, tmp_path, capsys):
    import yaml
    from safetensors.torch import load_file

    from tasks.cli import main
    from tasks.registry import build_task
    from tasks.runners.checkpoint import read_checkpoint
    from tasks.runners.predict import checkpoint_task

    common = {"features": [str(tiny / "f.h5")], "tokenizer": str(tiny / "tok"), "max_regions": 4,
              "max_text_length": 12, "eval_batch_size": 8, "train_split": "train", "val_split": "train"}
    for name, folder in (("snli-ve", "snli"), ("gqa", "gqa")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "data": {"root": str(tiny / folder), **common}, "optim": {"lr": 1e-3},
            "train": {"global_batch_size": 6, "epochs": 30}}))
    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "overrides": {"task_specific_tokens": True}},
        "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "num_workers": 0, "device": "cpu",
                  "log_every": 8, "save_every": 1000, "eval_every": 1000, "global_batch_size": 2},
        "optim": {"lr": 3e-3, "head_lr": 1e-2, "warmup": 0.1},
        "tasks": [{"name": "snli-ve", "config": str(tmp_path / "snli-ve.yaml"), "overrides": ["data.max_regions=4"]},
                  {"name": "gqa", "config": str(tmp_path / "gqa.yaml")}]}))
    assert main(["finetune", "--task", "multi", "--config", str(multi)]) == 0
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    assert checkpoint.name == "step-00000060"  # 30 iterations (30 epochs × 1 batch of 6) × 2 tasks
    assert main(["evaluate", "--task", "multi", "--checkpoint", str(checkpoint), "--split", "train"]) == 0
    metrics = json.loads((checkpoint / "eval-train" / "metrics.json").read_text())
    # chance: 33% (3 labels, 2 items each); GQA's most frequent training answer is 2 of 6
    assert metrics["snli-ve/accuracy"] > 60 and metrics["gqa/accuracy"] > 60
    record = json.loads((checkpoint / "run.json").read_text())
    assert record["tasks"] == ["snli-ve", "gqa"] and record["task_tokens"] == {"snli-ve": "snli-ve", "gqa": "gqa"}
    # predict builds a member with its own settings; a single-task run from the multi-task checkpoint keeps
    # the task's head and its 12-in-1 token (13 for SNLI-VE)
    assert checkpoint_task(read_checkpoint(checkpoint), "snli-ve", str(tiny / "tok")).config.data.val_split == "train"
    single = build_task("snli-ve", str(tmp_path / "snli-ve.yaml"), [f"model.init={checkpoint}"]).build_model()
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert torch.equal(single.tri_head.weight, saved["tri_head.weight"])
    token = single.vilbert.embeddings.task_embeddings.weight
    assert torch.equal(token[13], saved["vilbert.embeddings.task_embeddings.weight"][13])


def test_command_line_errors_are_one_line(tmp_path, capsys):
    from tasks.cli import main

    assert main(["finetune", "--task", "snli-ve", "--clean-train-sets"]) == 2
    assert "only a multi-task run" in capsys.readouterr().err
    assert main(["multitask-baselines", "--run", str(tmp_path)]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err


def test_member_overrides_reach_every_member_after_its_own(tiny, tmp_path):
    import yaml

    common = {"features": [str(tiny / "f.h5")], "tokenizer": str(tiny / "tok"), "max_regions": 4,
              "max_text_length": 12}
    for name, folder in (("snli-ve", "snli"), ("nlvr2", "nlvr2")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"data": {"root": str(tiny / folder), **common}}))
    other = tmp_path / "other.h5"
    other.write_bytes((tiny / "f.h5").read_bytes())  # another feature store (make's BOXES=detected)
    members = [MemberConfig(name="snli-ve", config=str(tmp_path / "snli-ve.yaml"), overrides=["data.max_regions=3"]),
               MemberConfig(name="nlvr2", config=str(tmp_path / "nlvr2.yaml"), overrides=[f"data.features=[{tiny}]"])]
    config = multi_config(tmp_path, "run", members, member_overrides=[f"data.features=[{other}]"])
    task = MultiTask(config)
    assert [m.task.config.data.features for m in task.members] == [[str(other)], [str(other)]]
    assert task.members[0].task.config.data.max_regions == 3  # a member's own override still holds
    assert [spec.resolved["data"]["features"] for spec in config.tasks] == [[str(other)], [str(other)]]
