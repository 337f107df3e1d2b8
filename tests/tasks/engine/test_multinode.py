"""Past one machine (issue 23): torchrun with a c10d rendezvous trains two "nodes" of one process each, over
gloo on the loopback interface, with the single-process losses; and a rank killed mid-run under
`torchrun --max-restarts 1` restarts the group from the last checkpoint and ends with the uninterrupted losses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

from tests.fixtures.local_ports import free_port
from tests.fixtures.run_logs import records
from tests.fixtures.task_zoo import write_zoo

ROOT = Path(__file__).resolve().parents[3]
# a restarted group must not read the last attempt's addresses from the rendezvous store (pytorch/pytorch#135712)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT),
       "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    path = root / "overrides.json"
    path.write_text(json.dumps(write_zoo(root, ["pretrain"])["pretrain"]))
    return path


def _torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(run_dir)]


def _single(overrides, run_dir) -> list[tuple[int, float]]:
    subprocess.run([sys.executable, "-m", "tests.fixtures.elastic_run", str(overrides), str(run_dir)], cwd=ROOT,
                   env=ENV, check=True, timeout=300)
    return _losses(run_dir)


def _assert_same(got, expected):
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4]
    for (_, loss), (_, reference) in zip(got, expected, strict=True):
        assert loss == pytest.approx(reference, rel=1e-5)


def test_two_nodes_under_a_c10d_rendezvous_train_with_the_single_process_losses(overrides, tmp_path):
    # The rendezvous store lives in this process, as a store on its own machine would: when a node hosts it, the
    # host's agent may exit while the other node's agent still talks to it (it then aborts, rc -6).
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    options = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-conf", "is_host=false", "--rdzv-id", "two-nodes", "--local-addr",
               "127.0.0.1"]
    run = ["-m", "tests.fixtures.elastic_run", str(overrides), str(tmp_path / "two")]
    nodes = [subprocess.Popen(_torchrun(*options, *run), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    del store
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    _assert_same(_losses(tmp_path / "two"), _single(overrides, tmp_path / "one"))


def test_a_killed_rank_restarts_the_group_from_the_last_checkpoint_with_the_uninterrupted_losses(overrides,
                                                                                                 tmp_path):
    logs = tmp_path / "logs"
    killed = subprocess.run(
        _torchrun("--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1", "--log-dir",
                  str(logs), "--redirects", "3", "-m", "tests.fixtures.elastic_run", str(overrides),
                  str(tmp_path / "killed"), "3"),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    ranks = "".join(f"== {path}\n{path.read_text()[-1500:]}" for path in sorted(logs.rglob("stderr.log")))
    assert killed.returncode == 0, killed.stderr[-2000:] + ranks
    attempts = sorted(path.name for path in logs.glob("*/attempt_*"))
    assert attempts == ["attempt_0", "attempt_1"]  # the agent saw rank 1 die and started the group again
    _assert_same(_losses(tmp_path / "killed"), _single(overrides, tmp_path / "one"))
