"""`vilbert report --json` writes the report's rows, and `bench/debias_table.py` turns the reports of runs named as
`make finetune TASK=vqa DEBIAS=... SEED=...` names them into the markdown table of docs/results.md (tiny runs)."""

import importlib.util
import json
from pathlib import Path

import pytest

from tasks.cli import main
from tasks.shapes.report import finetuning_rows
from tests.fixtures.tiny_shapes_runs import CONFIGS, TINY, write_tiny_shapes

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "debias_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("debias_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("debias_table")
    world, data = write_tiny_shapes(root, seed=2)
    out = root / "runs"
    for task in ("vqa", "vqa-cp"):
        for seed in (0, 1):
            run = out / f"{task}_embedded_lmh_seed{seed}"  # the Makefile's names for DEBIAS=lmh SEED=seed
            assert main(["finetune", "--task", task, "--config", str(CONFIGS / f"{task}_embedded.yaml"), *TINY,
                         *data, f"data.root={world / task}",
                         f"train.output_dir={run}", f"train.seed={seed}", "data.debias=lmh"]) == 0
            assert main(["report", "--run", str(run), "--task", task, "--json", str(run / "report.json")]) == 0
    return out


def test_report_json_holds_the_printed_rows(runs):
    run = runs / "vqa_embedded_lmh_seed0"
    record = json.loads((run / "report.json").read_text())
    rows = finetuning_rows(run, "vqa")
    assert record["task"] == "vqa" and record["run"] == str(run) and record["compare"] is None
    assert [(r["split"], r["metric"], r["value"], r["chance"]) for r in record["rows"]] == \
        [(*row.name.split(": "), row.value, row.chance) for row in rows]
    assert record["rows"][0]["metrics"]["prior_agreement"] == rows[0].metrics["prior_agreement"]


def test_the_table_gives_each_split_the_mean_and_both_seeds_beside_the_prior(runs, capsys):
    assert _script().main(["--runs", str(runs), "--modes", "lmh", "--seeds", "0", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| pretrained start, seeds 0, 1: mean (each seed) | lmh | question-type prior |"
    seeds = [json.loads((runs / f"vqa-cp_embedded_lmh_seed{s}" / "report.json").read_text())["rows"][0]
             for s in (0, 1)]
    a, b = (row["value"] for row in seeds)
    assert f"| changing priors: VQA accuracy | {(a + b) / 2:.1f} % ({a:.1f} / {b:.1f}) | {seeds[0]['chance']:.1f} % |" \
        in lines
    a, b = (row["metrics"]["prior_agreement"] for row in seeds)
    assert f"| changing priors: answer = the prior's | {(a + b) / 2:.1f} % ({a:.1f} / {b:.1f}) | |" in lines
    assert sum(line.startswith("| held-out test:") or line.startswith("| compositional:") for line in lines) == 4


def test_a_missing_or_foreign_report_is_one_line_naming_it(runs, tmp_path, capsys):
    script = _script()
    assert script.main(["--runs", str(runs), "--modes", "rubi", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vqa_embedded_rubi_seed0/report.json: no such report" in err
    assert "make finetune TASK=vqa DEBIAS=rubi SEED=0 TEXT_ONLY=0" in err
    assert script.main(["--runs", str(runs), "--modes", "lmh", "--seeds", "0", "--start", "text-only"]) == 2
    assert "has no text-only run beside it" in capsys.readouterr().err
    bad = tmp_path / "vqa_embedded_seed0"
    bad.mkdir()
    (bad / "report.json").write_text('{"rows": [{"split": "held-out test"}]}')
    assert script.main(["--runs", str(tmp_path), "--modes", "none", "--seeds", "0"]) == 2
    assert "not a VQA `vilbert report --json` file" in capsys.readouterr().err


def test_runs_made_with_a_grounding_weight_get_a_column_per_weight(runs, tmp_path, capsys):
    for task in ("vqa", "vqa-cp"):
        for seed in (0, 1):  # the Makefile's names for DEBIAS=lmh GROUNDING=1 SEED=seed
            run = tmp_path / f"{task}_embedded_lmh_grounding1_seed{seed}"
            run.mkdir()
            (run / "report.json").write_bytes((runs / f"{task}_embedded_lmh_seed{seed}" / "report.json").read_bytes())
    script = _script()
    assert script.main(["--runs", str(tmp_path), "--modes", "lmh", "--seeds", "0", "1", "--grounding", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| pretrained start, seeds 0, 1: mean (each seed) | lmh, grounding 1 | question-type prior |"
    assert script.main(["--runs", str(tmp_path), "--modes", "lmh", "--seeds", "0", "--grounding", "1", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "vqa_embedded_lmh_grounding0.5_seed0/report.json: no such report" in err
    assert "make finetune TASK=vqa DEBIAS=lmh GROUNDING=0.5 SEED=0 TEXT_ONLY=0" in err


def test_runs_from_the_grounded_pretraining_get_a_column_beside_the_default(runs, tmp_path, capsys):
    for name in ("", "_grounded"):  # the Makefile's names for DEBIAS=lmh SEED=seed [PRETRAIN=grounded]
        for task in ("vqa", "vqa-cp"):
            for seed in (0, 1):
                run = tmp_path / f"{task}_embedded{name}_lmh_seed{seed}"
                run.mkdir()
                (run / "report.json").write_bytes(
                    (runs / f"{task}_embedded_lmh_seed{1 - seed if name else seed}" / "report.json").read_bytes())
    script = _script()
    assert script.main(["--runs", str(tmp_path), "--modes", "lmh", "--pretrain", "embedded", "grounded"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| pretrained start, seeds 0, 1: mean (each seed) | PRETRAIN=embedded, lmh | "
                        "PRETRAIN=grounded, lmh | question-type prior |")
    cp = [json.loads((runs / f"vqa-cp_embedded_lmh_seed{s}" / "report.json").read_text())["rows"][0]["value"]
          for s in (0, 1)]
    row = next(line for line in lines if line.startswith("| changing priors: VQA accuracy"))
    assert row.split(" | ")[1:3] == [f"{sum(cp) / 2:.1f} % ({cp[0]:.1f} / {cp[1]:.1f})",
                                     f"{sum(cp) / 2:.1f} % ({cp[1]:.1f} / {cp[0]:.1f})"]
    (tmp_path / "vqa_embedded_grounded_lmh_seed1" / "report.json").unlink()
    assert script.main(["--runs", str(tmp_path), "--modes", "lmh", "--pretrain", "grounded"]) == 2
    err = capsys.readouterr().err.strip()
    assert "vqa_embedded_grounded_lmh_seed1/report.json: no such report" in err
    assert "make finetune TASK=vqa DEBIAS=lmh PRETRAIN=grounded SEED=1 TEXT_ONLY=0" in err
