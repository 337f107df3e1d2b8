"""`bench/gpu_suite.py --smoke` runs every benchmark it can on a CPU in seconds, so the GPU suite cannot rot
before a GPU is lent (issue 23): a benchmark broken by a code change fails here."""

import importlib.util
import json
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"


def test_gpu_suite_smoke_runs_every_benchmark_on_cpu(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--smoke", "--out", str(tmp_path / "suite.json")])
    suite.main()
    results = json.loads((tmp_path / "suite.json").read_text())
    ran = {run["name"]: run for run in results["runs"]}
    assert results["device"] == "CPU" and results["smoke"]
    for name in ("train_step tiny fp32", "extract butd tiny", "extract vmb tiny"):
        assert ran[name]["finished"], ran[name]["output"][-2000:]
    assert "samples/s" in ran["train_step tiny fp32"]["output"]
    assert ran["realistic_speed tiny"]["output"] == "skipped: needs --reference"  # no checkout in the test suite
    table = capsys.readouterr().out
    assert "| run | seconds | finished | last lines |" in table and "| extract vmb tiny |" in table
