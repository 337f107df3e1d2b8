"""Run directories never lose what a run did not write, and a refused --resume writes nothing (issue 24)."""

from __future__ import annotations

import dataclasses

import pytest

from tasks.engine.checkpoints import list_checkpoints
from tasks.engine.config import OptimConfig, TrainConfig
from tasks.engine.trainer import Trainer
from tasks.errors import ConfigError, ResumeError
from tests.fixtures.cli_check import snapshot
from tests.tasks.engine.test_trainer import RegressionTask, train_config


def _photos(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (folder / "notes.txt").write_text("my notes\n")
    return folder



def test_overwrite_refuses_a_folder_that_holds_no_run_and_deletes_nothing(tmp_path):
    folder = _photos(tmp_path / "dataset")
    before = snapshot([folder])
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds no run") as error:
            Trainer(RegressionTask(), train_config(tmp_path, "dataset"), OptimConfig()).fit(overwrite=overwrite)
        assert "nothing there is removed" in str(error.value)
        assert snapshot([folder]) == before


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    config = train_config(tmp_path, "run", epochs=1)
    Trainer(RegressionTask(), config, OptimConfig()).fit()
    run_dir = tmp_path / "run"
    (run_dir / "notes.txt").write_text("why I ran this\n")
    (run_dir / "plots").mkdir()
    Trainer(RegressionTask(), config, OptimConfig()).fit(overwrite=True)
    assert (run_dir / "notes.txt").read_text() == "why I ran this\n" and (run_dir / "plots").is_dir()
    assert list_checkpoints(run_dir)


@dataclasses.dataclass
class RunConfig:
    train: TrainConfig
    optim: OptimConfig


def _crashed_run(tmp_path):
    train = train_config(tmp_path, "run")
    with pytest.raises(KeyboardInterrupt):
        Trainer(RegressionTask(crash_after_calls=10), train, OptimConfig(), RunConfig(train, OptimConfig())).fit()
    run_dir = tmp_path / "run"
    assert list_checkpoints(run_dir)
    return train, run_dir


def test_resume_with_another_config_is_refused_naming_what_differs_and_writes_nothing(tmp_path):
    train, run_dir = _crashed_run(tmp_path)
    before = snapshot([run_dir])
    other = OptimConfig(lr=1e-3)
    with pytest.raises(ResumeError, match=r"optim\.lr 0\.0001 -> 0\.001"):
        Trainer(RegressionTask(), train, other, RunConfig(train, other)).fit(resume=run_dir)
    assert snapshot([run_dir]) == before
    longer = dataclasses.replace(train, epochs=3, num_workers=0)  # how long it runs may change
    result = Trainer(RegressionTask(), longer, OptimConfig(), RunConfig(longer, OptimConfig())).fit(resume=run_dir)
    assert result.state.step == 12


def test_a_refused_resume_of_a_truncated_checkpoint_leaves_config_and_run_record_as_they_were(tmp_path):
    train, run_dir = _crashed_run(tmp_path)
    state = list_checkpoints(run_dir)[-1] / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = snapshot([run_dir])
    with pytest.raises(ResumeError, match="cannot read trainer state"):
        Trainer(RegressionTask(), train, OptimConfig(), RunConfig(train, OptimConfig())).fit(resume=run_dir)
    assert snapshot([run_dir]) == before


