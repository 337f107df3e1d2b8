"""The Makefile's shapes-world commands: what `make finetune` passes reaches the configs it is meant for."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.engine.config import apply_override
from tasks.multitask import MultiTaskConfig

ROOT = Path(__file__).resolve().parents[2]


def planned_command(*make_args: str, marker: str) -> list[str]:
    """The arguments of the first command `make -n` plans that contains `marker`."""
    planned = subprocess.run(["make", "-n", *make_args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    command = next(c for c in planned.replace("\\\n", " ").splitlines() if marker in c)
    return shlex.split(command)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_detected_boxes_reach_every_member_of_the_multi_task_run():
    args = planned_command("finetune", "TASK=multi", "BOXES=detected", marker="--task multi")
    assert "train.output_dir=runs/multi_embedded_detected" in args
    config = MultiTaskConfig()
    for override in (a for a in args if a.startswith("multitask.")):
        apply_override(config, override)
    assert config.multitask.member_overrides == ["data.features=[data/shapes/features_detected.h5]"]
