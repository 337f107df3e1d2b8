"""The shapes-world detector: trained in seconds on a tiny world, loaded through the registry, extracting features
on new images without a boxes file, resuming exactly, and choosing boxes for `vilbert predict` without --boxes."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from features.detector_training import TrainingSettings, train_detector
from features.detectors import build_detector
from features.errors import FeaturesError
from features.images import read_image
from features.mobilenet_rcnn import MobileNetRCNN, RCNNConfig, build_trunk
from features.selection import SelectionRule
from features.store import FeatureStore
from tasks.cli import main
from tasks.runners.predict import grid_boxes
from tasks.shapes.detector import detection_samples, world_record
from tasks.shapes.targets import add_class_targets
from tasks.shapes.world import NUM_CLASSES, write_shapes_world
from tests.fixtures.cli_check import assert_refused
from tests.fixtures.tiny_task_data import write_vocab

TRAIN = ["--steps", "40", "--batch-size", "4", "--detect-short-side", "128", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny world (40 images), a detector trained 40 steps on its 28 training images, and 6 images of another
    seed plus a blank one as the new images."""
    tmp = tmp_path_factory.mktemp("shapes-detector")
    torch.manual_seed(0)  # the heads' initialisation, whatever ran before
    write_shapes_world(tmp / "world", seed=0, num_images=40, progress=False)
    assert main(["train-detector", "--world", str(tmp / "world"), "--out", str(tmp / "detector"), *TRAIN]) == 0
    write_shapes_world(tmp / "other", seed=1, num_images=8, progress=False)
    new = tmp / "new"
    new.mkdir()
    for k in range(6):
        shutil.copy(tmp / "other" / "images" / f"{k}.png", new / f"other-{k}.png")
    Image.new("RGB", (128, 128), (205, 205, 205)).save(new / "blank.png")
    return tmp


def _max_confidence(detector, path):
    """The best foreground score of any proposal on one image (the rule's threshold set to 0)."""
    detector.config.selection = SelectionRule(**{**detector.config.selection, "conf_threshold": 0.0}).as_dict()
    prepared = detector.prepare(read_image(path).pixels)
    (regions,) = detector(prepared.pixels[None], [prepared])
    return float(regions.objects_conf.max())


def test_cli_writes_a_detector_directory_that_loads_through_the_registry(trained, capsys):
    config = json.loads((trained / "detector" / "config.json").read_text())
    assert config["config"]["world"]["version"] == 1 and len(config["config"]["classes"]) == NUM_CLASSES
    results = config["results"]
    assert 0.0 <= results["map50"] <= 1.0 and results["images"] == 4 and results["train_images"] == 28
    weights = load_file(str(trained / "detector" / "model.safetensors"))
    assert "roi_heads.box_predictor.cls_score.weight" in weights
    assert weights["roi_heads.box_predictor.cls_score.weight"].shape[0] == NUM_CLASSES
    detector = build_detector("shapes", weights=str(trained / "detector"))
    assert detector.feature_dim == 96 and detector.cls_prob_dim == NUM_CLASSES
    assert detector.extractor_info()["boxes"] == "detected"


def test_extract_needs_no_boxes_and_lists_a_blank_image_among_the_failures(trained, capsys):
    detector = build_detector("shapes", weights=str(trained / "detector"))
    blank = _max_confidence(detector, trained / "new" / "blank.png")
    shapes = min(_max_confidence(detector, p) for p in sorted((trained / "new").glob("other-*.png")))
    assert shapes > blank  # even 40 steps make the detector surer of a shape than of an empty background
    threshold = (shapes + blank) / 2
    out = trained / "new.h5"
    code = main(["extract", "--detector", "shapes", "--weights", str(trained / "detector"), "--images",
                 str(trained / "new"), "--out", str(out), "--workers", "0", "--no-progress",
                 "--option", f"conf_threshold={threshold}"])
    assert code == 0
    failures = [json.loads(line) for line in open(f"{out}.errors.jsonl")]
    assert [f["image_id"] for f in failures] == ["blank"] and "found nothing" in failures[0]["reason"]
    store = FeatureStore(out)
    assert sorted(store.ids) == [f"other-{k}" for k in range(6)]
    for image_id in store.ids:
        regions = store.read(image_id)
        assert 1 <= len(regions.boxes) <= 10 and regions.cls_prob.shape == (len(regions.boxes), NUM_CLASSES)
        assert np.allclose(regions.cls_prob.sum(axis=1), 1.0, atol=1e-2)
        chosen = regions.cls_prob[np.arange(len(regions.boxes)), regions.objects_id]  # float16 in the store
        assert np.allclose(chosen, regions.objects_conf, atol=2e-3)
        assert (chosen >= regions.cls_prob[:, 1:].max(axis=1) - 2e-3).all()
        assert (regions.objects_conf >= threshold - 1e-6).all()
        assert (regions.boxes[:, :2] >= 0).all() and (regions.boxes[:, 2:] <= 128).all()
    # the same features as the given-box MobileNetV2 pooler on those boxes: one pipeline, whatever found the boxes
    boxes = {i: store.read(i).boxes.tolist() for i in store.ids}
    (trained / "found.json").write_text(json.dumps(boxes))
    assert main(["extract", "--images", str(trained / "new"), "--out", str(trained / "given.h5"), "--workers", "0",
                 "--no-progress", "--boxes", str(trained / "found.json"), "--box-format", "xyxy"]) == 0
    given = FeatureStore(trained / "given.h5")
    for image_id in store.ids:
        assert np.allclose(given.read(image_id).features, store.read(image_id).features, atol=1e-2)


def test_training_resumes_exactly_after_an_interruption(trained, tmp_path, monkeypatch):
    samples = detection_samples(trained / "world", ("train",))[:8]
    settings = TrainingSettings(steps=6, batch_size=4, checkpoint_every=3, warmup_steps=2)
    world = world_record(trained / "world")
    trunk = build_trunk()

    def fresh():
        torch.manual_seed(0)
        return MobileNetRCNN(RCNNConfig(classes=world["classes"], world=world, detect_short_side=128), trunk)

    straight = fresh()
    train_detector(straight, samples, tmp_path / "straight", settings, progress=False)
    interrupted = fresh()
    calls = {"n": 0}
    forward = type(interrupted.heads).forward

    def dies_at_step_5(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return forward(self, *args)

    monkeypatch.setattr(type(interrupted.heads), "forward", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_detector(interrupted, samples, tmp_path / "resumed", settings, progress=False)
    monkeypatch.setattr(type(interrupted.heads), "forward", forward)
    resumed = fresh()  # a new process: only the run directory carries over
    train_detector(resumed, samples, tmp_path / "resumed", settings, progress=False)
    for key, value in straight.heads_state_dict().items():
        assert torch.equal(value, resumed.heads_state_dict()[key]), key
    assert not torch.equal(straight.heads_state_dict()["roi_heads.box_predictor.cls_score.weight"],
                           fresh().heads_state_dict()["roi_heads.box_predictor.cls_score.weight"])


def test_bad_detector_directories_are_one_line_and_exit_2(trained, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained / "detector", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file at all")
    code = main(["extract", "--detector", "shapes", "--weights", str(corrupt), "--images", str(trained / "new"),
                 "--out", str(tmp_path / "f.h5"), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(corrupt / "model.safetensors") in err
    assert not (tmp_path / "f.h5").exists()
    code = main(["extract", "--detector", "shapes", "--weights", str(tmp_path / "nowhere"), "--images",
                 str(trained / "new"), "--out", str(tmp_path / "f.h5"), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nowhere" in err and "make detector" in err


def test_train_detector_refuses_a_users_folder_as_out_or_run_dir_before_training(trained, tmp_path):
    """--out a folder of the user's (or the world itself) is refused before any training; a --run-dir holding
    anything but a detector run is left untouched; a damaged training state is one line."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    argv = ["train-detector", "--world", str(trained / "world"), *TRAIN, "--random-trunk"]
    assert_refused([*argv, "--out", str(mine)], names=[str(mine), "did not write"], watch=[tmp_path])
    assert_refused([*argv, "--out", str(trained / "world")], names=[str(trained / "world"), "input"],
                   watch=[tmp_path])
    line = assert_refused([*argv, "--out", str(tmp_path / "detector"), "--run-dir", str(mine)],
                          names=[str(mine), "holds no detector run"], watch=[tmp_path])
    assert "nothing there is touched" in line
    samples = detection_samples(trained / "world", ("train",))[:4]
    settings = TrainingSettings(steps=2, batch_size=4)
    detector = MobileNetRCNN(RCNNConfig(classes=world_record(trained / "world")["classes"], detect_short_side=128),
                             build_trunk(random_init=True))
    train_detector(detector, samples, tmp_path / "run", settings, progress=False)
    (tmp_path / "run" / "state.pt").write_bytes((tmp_path / "run" / "state.pt").read_bytes()[:300])  # a cut copy
    with pytest.raises(FeaturesError, match="state.pt: not a readable training state"):
        train_detector(detector, samples, tmp_path / "run", settings, progress=False)


@pytest.fixture(scope="module")
def vqa_checkpoint(trained):
    """A tiny VQA model fine-tuned 2 steps on the world's ground-truth-box MobileNetV2 features."""
    world = trained / "world"
    assert main(["extract", "--images", str(world / "images"), "--out", str(trained / "gt.h5"), "--workers", "0",
                 "--no-progress", "--boxes", str(world / "gt_boxes.json"), "--box-format", "xyxy"]) == 0
    add_class_targets(trained / "gt.h5", world)
    write_vocab(trained / "tok")
    run = trained / "run-vqa"
    assert main(["finetune", "--task", "vqa", "model.preset=tiny", "model.overrides={v_feature_size: 96}",
                 "train.global_batch_size=4", "train.max_steps=2", "train.num_workers=0", "train.device=cpu",
                 "data.max_regions=6", "data.eval_batch_size=4", f"data.root={world / 'vqa'}",
                 f"data.features=[{trained / 'gt.h5'}]", "data.min_answer_count=1", "data.minval_size=4",
                 f"data.tokenizer={trained / 'tok'}", f"train.output_dir={run}"]) == 0
    return sorted((run / "checkpoints").iterdir())[-1]


def _predict(capsys, checkpoint, image, *args):
    code = main(["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--question",
                 "what color is the circle?", "--device", "cpu", "--json", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_without_boxes_uses_the_world_detector_and_the_grid_only_without_one(
        trained, vqa_checkpoint, tmp_path, monkeypatch, capsys):
    record = json.loads((vqa_checkpoint / "run.json").read_text())
    assert record["feature_extractor"][0]["world"]["version"] == 1
    image = trained / "new" / "other-0.png"
    monkeypatch.chdir(tmp_path)  # the detector's default place is data/shapes/detector under the working directory
    code, out, err = _predict(capsys, vqa_checkpoint, image)
    assert code == 0 and "grid" in err and "make detector" in err
    assert np.allclose(json.loads(out)["boxes"], grid_boxes((128, 128))[:5], atol=0.01)  # IMG token + 5 boxes
    shutil.copytree(trained / "detector", tmp_path / "data" / "shapes" / "detector")
    code, out, err = _predict(capsys, vqa_checkpoint, image, "--option", "conf_threshold=0.0")
    result = json.loads(out)
    assert code == 0 and "grid" not in err and result["detector"] == "shapes"
    detected = build_detector("shapes", weights=str(tmp_path / "data" / "shapes" / "detector"), conf_threshold=0.0)
    prepared = detected.prepare(read_image(image).pixels)
    (regions,) = detected(prepared.pixels[None], [prepared])
    assert len(regions.boxes) == 10 and np.allclose(result["boxes"], regions.boxes[:5].numpy(), atol=0.01)
    # --boxes still wins, and a detector of another world version is refused in one line
    (tmp_path / "boxes.json").write_text("[[10, 10, 60, 60], [70, 20, 120, 90]]")
    code, out, err = _predict(capsys, vqa_checkpoint, image, "--boxes", str(tmp_path / "boxes.json"),
                              "--box-format", "xyxy")
    result = json.loads(out)
    assert code == 0 and result["detector"] == "mobilenet-v2" and result["boxes"] == [[10, 10, 60, 60],
                                                                                      [70, 20, 120, 90]]
    config = tmp_path / "data" / "shapes" / "detector" / "config.json"
    document = json.loads(config.read_text())
    document["config"]["world"]["version"] = 2
    config.write_text(json.dumps(document))
    code, out, err = _predict(capsys, vqa_checkpoint, image)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "version 2" in err
    assert "data/shapes/detector/config.json" in err
