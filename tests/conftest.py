"""Shared test settings: one thread, seeded, offline."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_multitask_checkpoint(tmp_path_factory):
    """One tiny multi-task checkpoint of every kind of task the demo serves (tests/fixtures/tiny_multitask.py),
    built once."""
    from tests.fixtures.tiny_multitask import write_multitask_checkpoint

    return write_multitask_checkpoint(tmp_path_factory.mktemp("multitask"))


@pytest.fixture
def small_disk(tmp_path):
    """A real full disk: a 256 KiB tmpfs at tmp_path/disk (root only; skipped with the reason elsewhere)."""
    from tests.fixtures.small_disk import mounted

    with mounted(tmp_path / "disk") as disk:
        yield disk
