"""Training curves as a picture: what is read from metrics.jsonl, what each panel plots, `vilbert report --plot`."""

import json

import numpy as np
import pytest
from PIL import Image

from tasks.cli import main
from tasks.errors import DataError
from tasks.figures.curves import curves_figure, read_run, recall_curves


def _write_run(directory, scale=1.0):
    directory.mkdir(parents=True)
    records = [{"kind": "train", "step": s, "epoch": 0, "loss": scale * 4 / s, "mlm_loss": scale * 3 / s,
                "lr": 1e-4 * s / 30, "samples_per_s": 50.0 + s, "grad_norm": 1.0} for s in (10, 20, 30)]
    records.append({"kind": "eval", "step": 30, "epoch": 0, "accuracy": 60.0 * scale, "num_questions": 300.0,
                    "accuracy/yes/no": 80.0, "question_type/what color": 90.0 * scale,
                    "question_type/how many": 40.0, "prior_question_type/what color": 50.0,
                    "prior_question_type/how many": 20.0, "prior_accuracy/yes/no": 50.0, "r1": 30.0, "r5": 70.0,
                        "r10": 90.0, "i2t_r1": 35.0,
                    "i2t_r5": 75.0, "i2t_r10": 95.0})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def test_every_logged_metric_gets_a_panel_with_its_values(tmp_path):
    run = read_run(_write_run(tmp_path / "a"))
    fig = curves_figure([run])
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"loss", "mlm_loss", "lr", "samples_per_s", "grad_norm", "eval: accuracy",
                           "eval: accuracy/yes/no", "eval: r1", "eval: r5", "eval: r10", "eval: i2t_r1",
                           "eval: i2t_r5", "eval: i2t_r10", "accuracy by question type", "retrieval recall@K"}
    (loss,) = panels["loss"].lines
    np.testing.assert_allclose(loss.get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(loss.get_ydata(), [0.4, 0.2, 4 / 30])
    np.testing.assert_allclose(panels["eval: accuracy"].lines[0].get_ydata(), [60.0])
    bars = sorted(patch.get_width() for patch in panels["accuracy by question type"].patches)
    assert bars == [40.0, 90.0]
    (ticks,) = panels["accuracy by question type"].collections  # the question-type prior, one tick per bar
    assert sorted(ticks.get_offsets()[:, 0].tolist()) == [20.0, 50.0]
    recall = {line.get_label(): list(line.get_ydata()) for line in panels["retrieval recall@K"].lines}
    assert recall == {"a: caption -> image": [30.0, 70.0, 90.0], "a: image -> caption": [35.0, 75.0, 95.0]}


def test_compared_runs_overlay_in_the_same_panels(tmp_path):
    runs = [read_run(_write_run(tmp_path / "a")), read_run(_write_run(tmp_path / "b", scale=0.5))]
    fig = curves_figure(runs)
    (loss,) = [ax for ax in fig.axes if ax.get_title() == "loss"]
    assert [line.get_label() for line in loss.lines] == ["a", "b"]
    np.testing.assert_allclose(loss.lines[1].get_ydata(), [0.2, 0.1, 2 / 30])
    (types,) = [ax for ax in fig.axes if ax.get_title() == "accuracy by question type"]
    assert sorted(p.get_width() for p in types.patches) == [40.0, 40.0, 45.0, 90.0]


def test_recall_curves_group_by_family_sorted_by_k():
    assert recall_curves({"retrieval_r10": 9.0, "retrieval_r1": 1.0, "retrieval_r5": 5.0, "loss": 2.0}) == {
        "retrieval_r": ([1, 5, 10], [1.0, 5.0, 9.0])}


def test_bad_logs_fail_naming_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl: cannot read"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1}\n{"loss": 2\n')
    with pytest.raises(DataError, match="metrics.jsonl:2: not a JSON line"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_run(tmp_path)


def test_report_plot_only_writes_the_figure(tmp_path, capsys):
    a, b = _write_run(tmp_path / "a"), _write_run(tmp_path / "b", scale=0.5)
    out = tmp_path / "figs" / "curves.png"
    assert main(["report", "--run", str(a), "--compare", str(b), "--plot", str(out), "--plot-only"]) == 0
    assert f"curves -> {out}" in capsys.readouterr().err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1680, 1200)  # 4 columns x 4.2 in, 4 rows x 3 in, 100 dpi
        assert np.asarray(image.convert("L")).std() > 10
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]
    assert main(["report", "--run", str(tmp_path / "missing"), "--plot", str(tmp_path / "x.png"), "--plot-only"]) == 2
    assert "metrics.jsonl: cannot read" in capsys.readouterr().err
    assert main(["report", "--run", str(a), "--plot-only"]) == 2
    assert not (tmp_path / "x.png").exists()
