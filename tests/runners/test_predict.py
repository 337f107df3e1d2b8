"""`vilbert predict` end to end: tiny fine-tuned checkpoints, regions extracted in-process, every output mode; a
converted 12-in-1 checkpoint goes through vmb-x152-fpn and asks for its weights."""

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from features.detectors import DETECTORS
from features.extract import extract
from features.images import read_image
from features.inputs import ImageInput
from features.store import FeatureStore
from tasks.cli import main
from tasks.engine.run_record import write_run_record
from tasks.runners.checkpoint import CheckpointInfo, read_checkpoint
from tasks.runners.predict import detect_regions, detector_name, grid_boxes
from tests.fixtures.tiny_checkpoints import TINY_FINETUNE, save_checkpoint, write_image
from tests.fixtures.tiny_detector import TinyDetector
from tests.fixtures.tiny_task_data import write_karpathy, write_refcoco, write_vocab, write_vqa

IMAGE_HW = (90, 120)  # the new image: another size than the training images


def _extract_store(tmp, image_ids):
    """The training features, through the real pipeline with the tiny detector (the store records its name)."""
    images = [ImageInput(str(i), str(write_image(tmp / "images" / f"{i}.png", (80, 100), k)))
              for k, i in enumerate(image_ids)]
    extract(images, tmp / "f.h5", TinyDetector(), workers=0, progress=False, float32=True)
    return tmp / "f.h5"


def _finetune(task, tmp, data, run_name=None):
    run = tmp / (run_name or f"run-{task}")
    assert main(["finetune", "--task", task, *TINY_FINETUNE, f"train.output_dir={run}", f"data.tokenizer={tmp / 'tok'}",
                 *data]) == 0
    return sorted((run / "checkpoints").iterdir())[-1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny checkpoint per task, trained a couple of steps on features of the tiny detector."""
    tmp = tmp_path_factory.mktemp("predict")
    (tmp / "images").mkdir()
    write_vocab(tmp / "tok")
    vqa = write_vqa(tmp / "vqa")["image_ids"]
    flickr = write_karpathy(tmp / "flickr" / "dataset_flickr30k.json")
    refcoco = write_refcoco(tmp / "refcoco")["image_ids"]
    store = _extract_store(tmp, [str(i) for i in vqa] + flickr + refcoco)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DETECTORS, "tiny-test", "tests.fixtures.tiny_detector:build_tiny")
        features = f"data.features=[{store}]"
        result = {
            "vqa": _finetune("vqa", tmp, [f"data.root={tmp / 'vqa'}", features, "data.min_answer_count=1",
                                          "data.minval_size=4"]),
            "retrieval": _finetune("retrieval", tmp, [f"data.root={tmp / 'flickr'}", features,
                                                      "data.max_text_length=12", "data.val_split=test"]),
            "refcoco": _finetune("refcoco", tmp, [f"data.root={tmp / 'refcoco'}", features, "data.gt_features=[]"]),
            # RefCOCO+ trained on the same files, in folders without "+" in their names
            "refcoco+": _finetune("refcoco+", tmp, [f"data.root={tmp / 'refcoco'}", features, "data.gt_features=[]"],
                                  run_name="run-plus"),
        }
    result["store"] = store
    result["image"] = write_image(tmp / "new.png", IMAGE_HW, seed=99)
    result["tmp"] = tmp
    return result


@pytest.fixture(autouse=True)
def _tiny_detector_registered(monkeypatch):
    monkeypatch.setitem(DETECTORS, "tiny-test", "tests.fixtures.tiny_detector:build_tiny")


def _predict(capsys, checkpoint, image, *args):
    code = main(["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--random-detector",
                 "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _predict_json(capsys, checkpoint, image, *args):
    code, out, err = _predict(capsys, checkpoint, image, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def _whole_and_quarter(hw):
    h, w = hw
    return [[0.0, 0.0, float(w), float(h)], [0.0, 0.0, w / 2, h / 2]]


def test_question_gives_top_k_answers_of_the_checkpoint_vocabulary_best_first(checkpoints, capsys):
    result = _predict_json(capsys, checkpoints["vqa"], checkpoints["image"], "--question", "what color is the cat",
                           "--top-k", "3")
    vocabulary = list(json.loads((checkpoints["vqa"] / "config.json").read_text())["id2label"].values())
    answers = result["answers"]
    assert len(answers) == 3 and {a["answer"] for a in answers} <= set(vocabulary)
    scores = [a["score"] for a in answers]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    # the detector came from the run's feature store; its boxes are in the new image's pixels
    assert result["detector"] == "tiny-test" and result["image_hw"] == list(IMAGE_HW)
    assert result["boxes"] == _whole_and_quarter(IMAGE_HW)
    code, out, _ = _predict(capsys, checkpoints["vqa"], checkpoints["image"], "--question", "what color is the cat")
    assert code == 0 and "Q: what color is the cat" in out
    shown = min(5, len(vocabulary))  # the default top 5, capped by the vocabulary size
    assert [line.split()[0] for line in out.splitlines()[2:]] == [f"{i}." for i in range(1, shown + 1)]


def test_expression_chooses_one_of_the_candidate_boxes_and_draws_it(checkpoints, capsys):
    tmp = checkpoints["tmp"]
    boxes = [[10, 5, 40, 30], [60, 20, 50, 60], [0, 45, 30, 40]]  # xywh, inside the 120x90 image
    (tmp / "boxes.json").write_text(json.dumps({"new": boxes, "other": [[0, 0, 1, 1]]}))
    out_png = tmp / "drawn" / "expr.png"
    result = _predict_json(capsys, checkpoints["refcoco"], checkpoints["image"], "--expression", "man on the left",
                           "--boxes", str(tmp / "boxes.json"), "--box-format", "xywh", "--out", str(out_png))
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in boxes]
    candidates = [[0.0, 0.0, 120.0, 90.0], *xyxy]  # the IMG row is the whole image
    assert result["boxes"] == xyxy
    assert result["box"] in candidates and result["box"] == result["top"][0]["box"]
    assert len(result["top"]) == 3 and all(t["box"] in candidates for t in result["top"])
    assert [t["score"] for t in result["top"]] == sorted((t["score"] for t in result["top"]), reverse=True)
    with Image.open(out_png) as drawn:
        assert drawn.format == "PNG" and drawn.size[0] == 640  # 120 px wide, drawn at a readable 640 px
        scale = 640 / IMAGE_HW[1]
        x1, y1, x2, y2 = (round(v * scale) for v in result["box"])
        assert drawn.convert("RGB").getpixel((x1 + 1, (y1 + y2) // 2)) == (255, 40, 40)  # the chosen box, red
    assert not [p for p in out_png.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_captions_are_ranked_by_pair_score_as_a_permutation(checkpoints, capsys):
    captions = ["a man holding a red ball", "two dogs sitting", "a big tree", "a black car"]
    (checkpoints["tmp"] / "captions.txt").write_text("\n".join(captions[:2]) + "\n\n" + "\n".join(captions[2:]))
    result = _predict_json(capsys, checkpoints["retrieval"], checkpoints["image"],
                           "--captions", str(checkpoints["tmp"] / "captions.txt"))
    ranked = result["captions"]
    assert sorted(c["caption"] for c in ranked) == sorted(captions)
    assert [c["caption"] for c in ranked] == [captions[c["index"]] for c in ranked]
    scores = [c["score"] for c in ranked]
    assert scores == sorted(scores, reverse=True)
    assert sum(c["probability"] for c in ranked) == pytest.approx(1.0, abs=1e-5)
    code, out, _ = _predict(capsys, checkpoints["retrieval"], checkpoints["image"],
                            "--captions", str(checkpoints["tmp"] / "captions.txt"))
    assert code == 0 and out.splitlines()[2].endswith(ranked[0]["caption"])


def test_detect_regions_matches_the_extraction_pipeline(checkpoints):
    image = checkpoints["tmp"] / "images" / "1000.png"
    regions = detect_regions(TinyDetector(), read_image(image))
    stored = FeatureStore(checkpoints["tmp"] / "f.h5").read("1000")
    assert regions.image_hw == stored.image_hw
    np.testing.assert_allclose(regions.boxes, stored.boxes)
    np.testing.assert_allclose(regions.features, stored.features, rtol=1e-6)


def test_given_boxes_outside_or_without_area_are_clipped_with_extractions_warning(tmp_path, caplog):
    image = read_image(write_image(tmp_path / "a.png", (48, 64), seed=1))
    boxes = np.array([[-5, 0, 80, 20], [10, 10, 10, 30]], np.float32)  # past the right edge; no width
    with caplog.at_level("WARNING"):
        regions = detect_regions(TinyDetector(), image, boxes)
    assert "1 given box(es) reached outside the 64x48 image and were clipped; 1 have no area" in caplog.text
    assert regions.boxes[0].tolist() == [0, 0, 64, 20]


def test_mobilenet_without_boxes_falls_back_to_a_grid_with_a_notice(tmp_path, capsys, caplog):
    save_checkpoint(tmp_path / "ckpt", answers=["yes", "no", "two"], v_feature_size=96)
    image = write_image(tmp_path / "a.png", (48, 64), seed=1)
    capsys.readouterr()  # drop what saving printed
    code, out, err = _predict(capsys, tmp_path / "ckpt", image, "--question", "how many", "--json",
                              "--tokenizer", str(write_vocab(tmp_path / "tok")), "--option", "random_init=true")
    assert code == 0, err
    result = json.loads(out)
    assert result["detector"] == "mobilenet-v2"  # chosen by the checkpoint's 96-d features
    assert "3x3 grid" in err
    # no run record: the detector is assumed from the feature width, with one warning line saying so
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "assuming mobilenet-v2 for its 96-d features" in warnings[0]
    np.testing.assert_allclose(result["boxes"], grid_boxes((48, 64)), atol=0.01)
    assert len(result["answers"]) == 3
    # a plain JSON list of boxes is this image's boxes
    (tmp_path / "list.json").write_text(json.dumps([[0, 0, 32, 24], [10, 10, 64, 48]]))
    code, out, err = _predict(capsys, tmp_path / "ckpt", image, "--question", "how many", "--json",
                              "--tokenizer", str(tmp_path / "tok"), "--option", "random_init=true",
                              "--boxes", str(tmp_path / "list.json"), "--box-format", "xyxy")
    assert code == 0 and "grid" not in err
    assert json.loads(out)["boxes"] == [[0, 0, 32, 24], [10, 10, 64, 48]]


def test_models_with_task_tokens_get_the_chosen_12_in_1_task_id(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", answers=["yes", "no", "two"], task_specific_tokens=True)
    image = write_image(tmp_path / "a.png", (40, 50), seed=3)
    capsys.readouterr()
    common = ["--question", "how many", "--json", "--tokenizer", str(write_vocab(tmp_path / "tok")),
              "--detector", "tiny-test"]
    vqa = _predict_json(capsys, tmp_path / "ckpt", image, *common)  # VQA's token (1) by default
    same = _predict_json(capsys, tmp_path / "ckpt", image, *common, "--task-token", "vqa")
    other = _predict_json(capsys, tmp_path / "ckpt", image, *common, "--task-token", "refcoco")
    assert vqa["answers"] == same["answers"]
    assert [a["score"] for a in other["answers"]] != [a["score"] for a in vqa["answers"]]


@pytest.mark.parametrize("case, expected", [
    ("missing-checkpoint", "no such directory"),
    ("no-answer-list", "no VQA answer list"),
    ("pretraining-expression", "pretraining checkpoint has no region_score_head"),
    ("unreadable-image", "not an image"),
    ("boxes-without-image", "no boxes for image 'a'"),
    ("feature-size-mismatch", "expects 16-d"),
    ("random-detector-weights", "random weights"),
    ("task-answers-another-mode", "--task refcoco does not answer --question"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case, expected):
    tok = str(write_vocab(tmp_path / "tok"))
    image = write_image(tmp_path / "a.png", (40, 50), seed=2)
    checkpoint = tmp_path / "ckpt"
    args = ["--question", "what color"]
    extra = ["--random-detector"]
    if case != "missing-checkpoint":
        save_checkpoint(checkpoint, answers=None if case == "no-answer-list" else ["red", "blue"],
                         pretraining=case == "pretraining-expression",
                         v_feature_size=16 if case == "feature-size-mismatch" else 7)
    if case == "pretraining-expression":
        args = ["--expression", "the red one"]
    if case == "unreadable-image":
        image = tmp_path / "b.jpg"
        image.write_text("not a jpeg")
    if case == "boxes-without-image":
        (tmp_path / "boxes.json").write_text(json.dumps({"b": [[0, 0, 5, 5]]}))
        args += ["--boxes", str(tmp_path / "boxes.json"), "--box-format", "xyxy"]
    if case == "random-detector-weights":
        extra = []
    if case == "task-answers-another-mode":
        args += ["--task", "refcoco"]
    capsys.readouterr()  # drop what saving printed
    code = main(["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--tokenizer", tok,
                 "--detector", "tiny-test", "--device", "cpu", *extra, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("vilbert predict: error:") and expected in err[0], err


# ------------------------------------------------------------------------------------------------- run records


@pytest.mark.parametrize("task, token", [("vqa", "vqa"), ("retrieval", "retrieval-flickr30k"),
                                         ("refcoco", "refcoco"), ("refcoco+", "refcoco+")])
def test_every_run_records_its_task_token_and_feature_extractor(checkpoints, task, token):
    checkpoint = checkpoints[task]
    extractor = FeatureStore(checkpoints["store"]).extractor
    assert extractor["detector"] == "tiny-test"
    expected = {"task": task, "task_token": token, "feature_extractor": [extractor], "architecture": "tasks"}
    run_dir = checkpoint.parent.parent
    assert json.loads((run_dir / "run.json").read_text()) == expected
    assert json.loads((checkpoint / "run.json").read_text()) == expected
    info = read_checkpoint(checkpoint)
    assert (info.task, info.task_token, info.feature_extractor, info.is_pretraining) == (task, token, extractor, False)


def test_a_refcoco_plus_checkpoint_predicts_as_refcoco_plus_whatever_its_path(checkpoints, capsys):
    checkpoint = checkpoints["refcoco+"]
    assert "+" not in str(checkpoint)
    result = _predict_json(capsys, checkpoint, checkpoints["image"], "--expression", "the left one")
    assert result["task"] == "refcoco+" and result["detector"] == "tiny-test"
    chosen = _predict_json(capsys, checkpoint, checkpoints["image"], "--expression", "the left one", "--task", "refcoco")
    assert chosen["task"] == "refcoco"
    # the task token is the one the run recorded: the default and an explicit --task-token refcoco+ agree
    same = _predict_json(capsys, checkpoint, checkpoints["image"], "--expression", "the left one",
                         "--task-token", "refcoco+")
    assert same["top"] == result["top"]


def test_the_detector_comes_from_the_run_record_not_the_training_store(checkpoints, capsys, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(checkpoints["vqa"], moved)
    run_config = yaml.safe_load((moved / "run_config.yaml").read_text())
    run_config["data"]["features"] = [str(tmp_path / "gone.h5")]  # the training store is not on this machine
    (moved / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    result = _predict_json(capsys, moved, checkpoints["image"], "--question", "what color")
    assert result["task"] == "vqa" and result["detector"] == "tiny-test"
    (moved / "run.json").unlink()  # no record: nothing names a detector for 7-d features
    code, _, err = _predict(capsys, moved, checkpoints["image"], "--question", "what color")
    assert code == 2 and err.strip() == (f"vilbert predict: error: --checkpoint {moved}: no detector recorded for "
                                         "its 7-d features; pass --detector NAME")


def test_a_pretraining_checkpoint_ranks_captions_zero_shot_by_its_record(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "pre", pretraining=True)
    image = write_image(tmp_path / "a.png", (40, 50), seed=4)
    (tmp_path / "captions.txt").write_text("a red ball\ntwo dogs\na tree\n")
    common = ["--captions", str(tmp_path / "captions.txt"), "--tokenizer", str(write_vocab(tmp_path / "tok"))]
    capsys.readouterr()
    unrecorded = _predict_json(capsys, checkpoint, image, *common, "--detector", "tiny-test")
    assert unrecorded["task"] == "retrieval"  # the default for captions; zero-shot by the alignment head
    write_run_record(checkpoint, {"task": "pretrain", "task_token": None, "architecture": "pretraining",
                                  "feature_extractor": [{"detector": "tiny-test"}]})
    recorded = _predict_json(capsys, checkpoint, image, *common)
    assert recorded["task"] == "pretrain" and recorded["detector"] == "tiny-test"
    for ranked in (unrecorded["captions"], recorded["captions"]):
        assert all(0 < c["score"] < 1 for c in ranked)
        assert sum(c["probability"] for c in ranked) == pytest.approx(1.0, abs=1e-5)
    assert [c["caption"] for c in recorded["captions"]] == [c["caption"] for c in unrecorded["captions"]]
    assert [c["score"] for c in recorded["captions"]] == pytest.approx([c["score"] for c in unrecorded["captions"]])


# --------------------------------------------------------------------------------- checkpoints without the head


def _drop_head(checkpoint, head):
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith(f"{head}.")}, checkpoint / "model.safetensors",
              metadata={"format": "pt"})


@pytest.mark.parametrize("kind, expected", [
    ("pretraining", "a pretraining checkpoint has no answer_head (needed by vqa)"),
    ("headless", "model.safetensors has no answer_head weights (needed by vqa)"),
])
def test_evaluate_and_predict_refuse_a_checkpoint_without_the_task_head(tmp_path, capsys, kind, expected):
    checkpoint = save_checkpoint(tmp_path / "ckpt", answers=["red", "blue"], pretraining=kind == "pretraining")
    if kind == "headless":
        _drop_head(checkpoint, "answer_head")
    capsys.readouterr()
    assert main(["evaluate", "--task", "vqa", "--checkpoint", str(checkpoint), "--split", "minval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vilbert evaluate: error:") and expected in err[0], err
    code, _, err = _predict(capsys, checkpoint, write_image(tmp_path / "a.png", (40, 50), seed=5),
                            "--question", "what color", "--detector", "tiny-test",
                            "--tokenizer", str(write_vocab(tmp_path / "tok")))
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def _converted(directory, v_feature_size, visual_features=None, **settings):
    """A tiny ViLBertForVLTasks saved as `vilbert convert` leaves it: config.json, no run_config.yaml."""
    from vilbert import ViLBertConfig, ViLBertForVLTasks

    config = ViLBertConfig.from_preset("tiny", v_feature_size=v_feature_size, num_labels=2, **settings)
    config.update({"id2label": {0: "yes", 1: "no"}, "label2id": {"yes": 0, "no": 1}})
    ViLBertForVLTasks(config).save_pretrained(directory)
    if visual_features is not None:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "visual_features": visual_features}))
    return directory


@pytest.mark.parametrize("config, run_config, expected", [
    ({"visual_features": {"detector": "vmb-x152-fpn"}}, {}, "vmb-x152-fpn"),  # recorded by vilbert convert
    ({}, {}, "vmb-x152-fpn"),  # converted (no run config), 2048-d: a vilbert-multi-task checkpoint
    ({"answer_head_type": "beta"}, {}, "butd-r101-c4"),  # converted vilbert_beta: BUTD features
    ({}, {"data": {}}, "butd-r101-c4"),  # trained here, store unknown: the size's default
])
def test_detector_for_a_checkpoint(tmp_path, config, run_config, expected):
    info = CheckpointInfo(tmp_path, {"v_feature_size": 2048, **config}, run_config)
    assert detector_name(info) == expected
    assert detector_name(info, "mobilenet-v2") == "mobilenet-v2"


def test_predict_with_a_converted_12_in_1_checkpoint_uses_the_vmb_detector(tmp_path, capsys):
    checkpoint = _converted(tmp_path / "ckpt", 32, {"detector": "vmb-x152-fpn"}, task_specific_tokens=True)
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(image)
    common = ["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--question", "is it red",
              "--tokenizer", str(write_vocab(tmp_path / "tok")), "--device", "cpu", "--option", "preset=tiny"]
    capsys.readouterr()
    assert main([*common, "--random-detector", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["detector"] == "vmb-x152-fpn" and len(result["boxes"]) > 0
    assert {a["answer"] for a in result["answers"]} == {"yes", "no"}

    assert main(common) == 2  # no --weights: the error names the file to get
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vmb-x152-fpn has random weights" in err[0] and "detectron_model.pth" in err[0]
