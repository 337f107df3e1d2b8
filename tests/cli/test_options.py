"""The command line's vocabulary (tasks/cli/options.py, import-light) says what the library defines."""

from features.extract import BATCH_PIXELS, PRECISIONS
from features.images import MAX_SIDE
from features.inputs import BOX_FORMATS
from features.published import EXPORTERS, ID_RULES, READERS
from tasks.cli import build_parser, options
from tasks.finetuning import TASK_TOKEN_IDS
from tasks.ranking.zero_shot import DEFAULT_TEMPLATES, SCORERS
from tasks.registry import TASKS
from tasks.shapes.tasks import EVAL_SPLITS
from vilbert.convert import SOURCES


def test_each_choice_list_equals_its_library_source():
    assert options.BOX_FORMATS == BOX_FORMATS
    assert set(options.PRECISIONS) == set(PRECISIONS)
    assert (options.BATCH_PIXELS, options.MAX_SIDE) == (BATCH_PIXELS, MAX_SIDE)
    assert set(options.FEATURE_READERS) == set(READERS) and set(options.FEATURE_EXPORTERS) == set(EXPORTERS)
    assert options.FEATURE_ID_RULES == ID_RULES
    assert options.CHECKPOINT_SOURCES == SOURCES
    assert set(options.TASK_TOKENS) == set(TASK_TOKEN_IDS)
    assert (options.ZERO_SHOT_SCORERS, options.ZERO_SHOT_TEMPLATES) == (SCORERS, DEFAULT_TEMPLATES)
    assert set(options.REPORT_TASKS) == set(EVAL_SPLITS)


def test_finetune_and_evaluate_take_every_registered_task_but_pretraining(monkeypatch):
    assert options.task_choices() == [name for name in TASKS if name != "pretrain"]
    monkeypatch.setitem(TASKS, "my-task", "my_package.my_task:MyTask")  # registered at run time
    parser = build_parser()
    for command in ("finetune", "evaluate"):
        args = parser.parse_args([command, "--task", "my-task", *(["--checkpoint", "c", "--split", "val"]
                                                                   if command == "evaluate" else [])])
        assert args.task == "my-task"
