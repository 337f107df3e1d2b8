"""`vilbert report --task vqa` on a tiny shapes world: each split's accuracy beside the question-type prior, the
per-type rows and the prior-agreement rate, for the run and a compared run; and the same for `--task vqa-cp`."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.cli import main
from tasks.shapes.report import _task_for, finetuning_rows, last_checkpoint
from tests.fixtures.tiny_shapes_runs import CONFIGS, TINY, write_tiny_shapes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    world, data = write_tiny_shapes(root, seed=1)
    made = {}
    for task, name, seed, mode in (("vqa", "a", 0, "none"), ("vqa", "b", 1, "none"), ("vqa-cp", "a", 0, "none"),
                                   ("vqa", "lmh", 0, "lmh")):
        out = root / f"{task}_{name}"
        assert main(["finetune", "--task", task, "--config", str(CONFIGS / f"{task}_embedded.yaml"),
                     *TINY, *data, f"data.root={world / task}", f"train.output_dir={out}",
                     f"train.seed={seed}", f"data.debias={mode}"]) == 0
        made[task, name] = out
    return made


def test_each_split_reports_the_prior_beside_accuracy_per_type_and_the_agreement(runs, capsys):
    rows = finetuning_rows(runs["vqa", "a"], "vqa")
    assert [row.name.split(":")[0] for row in rows] == ["held-out test", "compositional"]
    for row, root in zip(rows, ("test", "compositional"), strict=True):
        task = _task_for(runs["vqa", "a"], "vqa", root)
        assert row.chance == pytest.approx(task.chance("val")["accuracy"])
        assert row.chance == pytest.approx(row.metrics["prior_accuracy"])
        labels = {label: (value, prior) for label, value, prior in row.details}
        assert labels["question type 'what color is the'"] == (row.metrics["question_type/what color is the"],
                                                              row.metrics["prior_question_type/what color is the"])
        assert labels["answer = the question-type prior's"][0] == row.metrics["prior_agreement"]
    assert main(["report", "--run", str(runs["vqa", "a"]), "--task", "vqa", "--compare", str(runs["vqa", "b"])]) == 0
    out = capsys.readouterr().out
    assert "pretrained" in out and "text-only" in out
    line = next(line for line in out.splitlines() if "answer = the question-type prior's" in line)
    assert len(re.findall(r"\d+\.\d %", line)) == 2  # this run's and the compared run's agreement
    assert out.splitlines()[-1] == f"checkpoint {last_checkpoint(runs['vqa', 'a'])}"


def test_the_changing_priors_run_reports_its_test_split_against_its_train_prior(runs):
    (row,) = finetuning_rows(runs["vqa-cp", "a"], "vqa-cp")
    assert row.name.startswith("changing priors")
    assert row.chance == pytest.approx(row.metrics["prior_accuracy"])
    assert 0 <= row.metrics["prior_agreement"] <= 100


def test_a_debiased_run_reports_its_split_folders_with_the_prior_of_its_training_split(runs):
    rows = finetuning_rows(runs["vqa", "lmh"], "vqa")  # the split folders hold no training files
    plain = finetuning_rows(runs["vqa", "a"], "vqa")
    assert [row.chance for row in rows] == [row.chance for row in plain]


def test_each_split_is_scored_on_all_its_questions_not_the_minval_role(runs, tmp_path):
    """The report's "val" is the split folder's whole val2014 file; the trainer's "val" role (data.val_split:
    minval, the last data.minval_size questions) must not cut it."""
    run = tmp_path / "run"
    shutil.copytree(runs["vqa", "a"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["minval_size"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = finetuning_rows(run, "vqa", checkpoint=last_checkpoint(runs["vqa", "a"]))
    world = Path(config["data"]["root"])
    for row, folder in zip(rows, ("test", "compositional"), strict=True):
        questions = json.loads((world / folder / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
        assert len(questions["questions"]) > 2
        assert row.metrics["num_questions"] == len(questions["questions"])
