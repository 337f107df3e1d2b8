"""A full disk, for real: a small tmpfs mounted for the test (root only; skipped with the reason elsewhere).

Every output ends in one line (`no space left on device while writing X`), exit 2, no traceback, no segfault
from HDF5's shutdown, and nothing half-written left at the output (issue 24).
"""

from __future__ import annotations

import subprocess

import pytest

from features.errors import DiskFullError
from tasks.engine.config import OptimConfig
from tasks.engine.trainer import Trainer
from tests.fixtures.cli_check import error_lines, run_cli
from tests.fixtures.published_sources import make_rows, write_vilbert_lmdb
from tests.fixtures.tiny_task_data import write_store
from tests.tasks.engine.test_trainer import RegressionTask, train_config


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs at tmp_path/disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def _refused_full(argv, disk):
    code, _, stderr = run_cli(argv, subprocess=True)
    lines = error_lines(stderr)
    assert code == 2, f"exit {code} (139 is HDF5's segfault at exit):\n{stderr}"
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert "no space left on device while writing" in lines[0], lines[0]
    assert [p.name for p in disk.iterdir() if ".tmp-" in p.name] == []
    return lines[0]


def test_import_onto_a_full_disk_is_one_line_without_a_segfault(tmp_path, small_disk):
    source = write_vilbert_lmdb(tmp_path / "src.lmdb", make_rows(40, k=20, dim=256))
    _refused_full(["features", "import", "--from", "vilbert-lmdb", str(source), "--out", str(small_disk / "a.h5"),
                   "--no-progress"], small_disk)


@pytest.mark.parametrize("to, name", [("vilbert-lmdb", "out.lmdb"), ("butd-tsv", "out.tsv")])
def test_export_onto_a_full_disk_is_one_line(tmp_path, small_disk, to, name):
    store = write_store(tmp_path / "feats.h5", [str(i) for i in range(60)], boxes_per_image=20, feature_dim=256)
    _refused_full(["features", "export", "--to", to, str(store), "--out", str(small_disk / name)], small_disk)
    assert not (small_disk / name).exists()


def test_a_checkpoint_onto_a_full_disk_is_a_disk_full_error(small_disk):
    class Wide(RegressionTask):
        def build_model(self):  # about 1 MiB of weights: more than the disk holds
            import torch.nn as nn

            return nn.Sequential(nn.Linear(6, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 1))

    config = train_config(small_disk.parent, "disk", epochs=1)
    with pytest.raises(DiskFullError, match="no space left on device while writing"):
        Trainer(Wide(), config, OptimConfig()).fit()
