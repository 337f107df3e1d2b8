"""Referring expressions: refer-toolkit files → IoU targets, loss, and accuracy of the chosen box."""

import pickle

import pytest
import torch

from features.errors import FeaturesError
from tasks.errors import AnnotationError, ConfigError
from tasks.finetuning import ModelConfig
from tasks.refexp import RefCOCOgTask, RefCOCOPlusTask, RefExpConfig, RefExpDataConfig, iou_targets, read_refs
from tests.fixtures.tiny_task_data import write_json, write_refcoco, write_store, write_vocab


@pytest.fixture
def refcoco(tmp_path):
    info = write_refcoco(tmp_path / "refcoco+")
    write_store(tmp_path / "det.h5", info["image_ids"], boxes=info["boxes"])
    gt_boxes = {i: [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                    for a in info["annotations"] if str(a["image_id"]) == i] for i in info["image_ids"]}
    write_store(tmp_path / "gt.h5", info["image_ids"], boxes=gt_boxes, seed=1)
    write_vocab(tmp_path / "tok")
    return tmp_path


def _task(root, cls=RefCOCOPlusTask, **data):
    data = {"root": str(root / "refcoco+"), "features": [str(root / "det.h5")], "gt_features": [str(root / "gt.h5")],
            "tokenizer": str(root / "tok"), "max_regions": 8, "eval_batch_size": 3, **data}
    return cls(RefExpConfig(model=ModelConfig(preset="tiny"), data=RefExpDataConfig(**data)))


def test_reads_sentences_of_a_split_with_xyxy_boxes(refcoco):
    root = refcoco / "refcoco+"
    val = read_refs(root / "refs(unc).p", root / "instances.json", "val")
    assert len(val) == 4  # 2 refs × 2 sentences
    assert val[0].text == "man on the left" and val[0].box == (11.0, 10.0, 41.0, 30.0)
    with pytest.raises(ConfigError, match=r"no expressions in split 'test'.*testA"):
        read_refs(root / "refs(unc).p", root / "instances.json", "test")


def test_training_targets_keep_iou_at_least_half_and_eval_targets_are_raw():
    boxes = torch.tensor([[0.0, 0, 100, 80], [0.0, 0, 10, 10], [0.0, 0, 10, 5], [50.0, 50, 60, 60]])
    referred = torch.tensor([0.0, 0, 10, 10])
    raw = iou_targets(boxes, referred, training=False)
    assert raw.tolist() == pytest.approx([100 / 8000, 1.0, 0.5, 0.0])
    assert iou_targets(boxes, referred, training=True).tolist() == pytest.approx([0.0, 1.0, 0.5, 0.0])


def test_training_regions_join_detected_and_ground_truth_boxes(refcoco):
    task = _task(refcoco)
    train, val = task.dataset("train"), task.dataset("val")
    sample = train[0]
    assert sample["boxes"].shape == (1 + 3 + 2, 4)  # IMG + 3 detected + 2 GT
    assert sample["target"].max().item() == pytest.approx(1.0)  # the GT box itself
    assert val[0]["boxes"].shape == (1 + 3, 4)
    assert torch.equal(sample["boxes"][0], torch.tensor([0.0, 0, 100, 80]))  # IMG token = whole image


def test_training_step_and_evaluation(refcoco):
    task = _task(refcoco)
    model = task.build_model()
    batch = task.collate([task.dataset("train")[i] for i in range(4)])
    out = task.training_step(model, batch)
    assert out.loss_sums["loss"].ndim == 0 and out.loss_sums["loss"].item() > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        optimizer.zero_grad()
        task.training_step(model, batch).loss_sums["loss"].backward()
        optimizer.step()
    model.eval()
    assert task.training_step(model, batch).loss_sums["loss"].item() < out.loss_sums["loss"].item()
    predictions = task.predict(model, "val")
    metrics = task.evaluate(model, "val")
    assert metrics["num_expressions"] == 4
    assert metrics["accuracy"] == pytest.approx(100 * sum(p["iou"] >= 0.5 for p in predictions) / 4)


def test_umd_splits_for_refcocog(tmp_path):
    info = write_refcoco(tmp_path / "refcoco+", refs_name="refs(umd).p", splits=("train", "val", "test"))
    write_store(tmp_path / "det.h5", info["image_ids"], boxes=info["boxes"])
    write_vocab(tmp_path / "tok")
    task = _task(tmp_path, RefCOCOgTask, refs_file="refs(umd).p", gt_features=[])
    assert len(task.dataset("test")) == 4


def test_malformed_refs_give_one_clear_error(tmp_path):
    write_json(tmp_path / "instances.json", {"annotations": [{"id": 1, "bbox": [0, 0, 1, 1]}]})
    with open(tmp_path / "refs.p", "wb") as f:
        pickle.dump([{"ref_id": 0, "image_id": 1, "split": "val", "sentences": []}], f, protocol=2)
    with pytest.raises(AnnotationError, match=r"refs.p: refs\[0\] has no 'ann_id'"):
        read_refs(tmp_path / "refs.p", tmp_path / "instances.json", "val")
    with open(tmp_path / "refs.p", "wb") as f:
        pickle.dump([{"ref_id": 0, "ann_id": 9, "image_id": 1, "split": "val", "sentences": [{"sent": "x"}]}], f)
    with pytest.raises(AnnotationError, match="ann_id 9"):
        read_refs(tmp_path / "refs.p", tmp_path / "instances.json", "val")
    with open(tmp_path / "evil.p", "wb") as f:
        f.write(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(FeaturesError, match="refused"):
        read_refs(tmp_path / "evil.p", tmp_path / "instances.json", "val")
