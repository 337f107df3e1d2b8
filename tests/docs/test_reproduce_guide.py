"""docs/reproduce.md, command by command, on tiny files in the published formats.

The commands are read from the guide's ```sh blocks, so the guide cannot drift from what is tested. Substitutions:
the packaged base config becomes a tiny one, and fine-tuning / evaluation get tiny-run settings appended.
"""

import json
import pickle
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.cli import main
from tasks.vqa import build_vocabulary, read_split
from tests.fixtures.published_sources import write_vilbert_lmdb
from tests.fixtures.tiny_task_data import CAPTIONS, write_json, write_refcoco, write_vocab, write_vqa
from vilbert import ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks
from vilbert.convert import export_reference_state_dict

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "reproduce.md"
RUN = ["train.global_batch_size=4", "train.max_steps=1", "train.num_workers=0", "train.device=cpu",
       "data.max_regions=5", "data.eval_batch_size=4"]
TINY_DATA = {"vqa": ["data.min_answer_count=1", "data.minval_size=4"], "retrieval": ["data.max_text_length=12"],
             "refcoco+": []}


def guide_sections() -> dict[str, list[str]]:
    """Section number -> the commands of its ```sh blocks, continuation lines joined."""
    sections, current = {}, None
    in_block = False
    for line in GUIDE.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"## (\d+)\. ", line)
        if heading:
            current = heading.group(1)
        elif line.startswith("```sh"):
            in_block, pending = True, ""
        elif line.startswith("```") and in_block:
            in_block = False
        elif in_block:
            pending += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                sections.setdefault(current, []).append(pending.strip())
                pending = ""
    return sections


def run_command(command: str, tiny_json: Path) -> None:
    argv = shlex.split(command.replace("bert_base_6layer_6conect.json", str(tiny_json)))
    assert argv[0] == "vilbert"
    argv = argv[1:]
    if argv[0] in ("finetune", "evaluate"):
        task = argv[argv.index("--task") + 1]
        argv += RUN + TINY_DATA[task]
    if argv[0] == "features":
        argv.append("--no-progress")
    assert main(argv) == 0, command


def _lmdb(path: Path, boxes: dict[str, np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = [{"id": image_id, "h": 80, "w": 100, "boxes": b.astype(np.float32),
             "features": rng.standard_normal((len(b), 16)).astype(np.float32)} for image_id, b in boxes.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_vilbert_lmdb(path, rows)


def _grid_boxes(ids) -> dict[str, np.ndarray]:
    return {str(i): np.array([[0, 0, 50, 40], [50, 0, 100, 40], [0, 40, 50, 80], [10, 10, 90, 70]], np.float32)
            for i in ids}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The guide's folder layout with tiny files in the published formats, and section 1 (convert) run in it."""
    root = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        data = Path("datasets")
        info = write_vqa(data / "VQA")
        answers = build_vocabulary(read_split(data / "VQA", "train") + read_split(data / "VQA", "val"), 1)
        labels = list(reversed(answers))  # the released order differs from this project's frequency order
        (data / "VQA" / "cache").mkdir()
        (data / "gqa" / "cache").mkdir(parents=True)
        with open(data / "VQA" / "cache" / "trainval_label2ans.pkl", "wb") as f:
            pickle.dump(labels, f)
        config = ViLBertConfig.from_preset("tiny", num_labels=len(labels))
        with open(data / "gqa" / "cache" / "trainval_label2ans.pkl", "wb") as f:
            pickle.dump([f"gqa answer {i}" for i in range(config.gqa_num_labels)], f)
        write_vocab(Path("bert-base-uncased"))
        features = data / "coco" / "features_100"
        test_ids = [i for i in info["image_ids"] if i > 200]
        _lmdb(features / "COCO_trainval_resnext152_faster_rcnn_genome.lmdb",
              _grid_boxes(i for i in info["image_ids"] if i < 200), 0)
        _lmdb(features / "COCO_test_resnext152_faster_rcnn_genome.lmdb", _grid_boxes(test_ids), 1)

        flickr = data / "flickr30k"
        images = []
        for i in range(9):
            split = ("train", "val", "test")[i % 3]
            images.append({"filename": f"{1000 + i}.jpg", "imgid": i, "split": split,
                           "sentences": [{"raw": CAPTIONS[(i + j) % len(CAPTIONS)]} for j in range(2)]})
        write_json(flickr / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
        _lmdb(flickr / "flickr30k_resnext152_faster_rcnn_genome.lmdb", _grid_boxes(1000 + i for i in range(9)), 2)
        train = np.array([1000 + i for i in range(0, 9, 3)])
        with open(flickr / "hard_negative.pkl", "wb") as f:
            pickle.dump({"train_image_list": train, "train_hard_pool": np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]])}, f)

        refer = write_refcoco(data / "refcoco+")
        unc = data / "refcoco" / "refcoco+_unc"
        _lmdb(unc / "refcoco+_resnext152_faster_rcnn_genome.lmdb", refer["boxes"], 3)
        gt = {}
        for ann in refer["annotations"]:
            x, y, w, h = ann["bbox"]
            gt.setdefault(str(ann["image_id"]), []).append([x, y, x + w, y + h])
        _lmdb(unc / "refcoco+_gt_resnext152_faster_rcnn_genome.lmdb", {k: np.array(v) for k, v in gt.items()}, 4)

        Path("models").mkdir()
        torch.save(export_reference_state_dict(ViLBertForVLTasks(config)), "models/multi_task_model.bin")
        torch.save(export_reference_state_dict(ViLBertForPreTraining(config)), "models/pretrained_model.bin")
        fields = {k: v for k, v in config.to_dict().items()
                  if k in ViLBertConfig.__dataclass_fields__ and k not in ("id2label", "label2id", "dtype")}
        tiny_json = root / "tiny.json"
        tiny_json.write_text(json.dumps(fields))

        sections = guide_sections()
        assert sorted(sections) == ["1", "2", "3", "4"]
        for command in sections["1"]:
            run_command(command, tiny_json)
        yield {"root": root, "sections": sections, "tiny_json": tiny_json, "labels": labels}


def test_models_are_converted_with_labels_and_tokenizer(published):
    config = json.loads((published["root"] / "models/vilbert-12in1/config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(published["labels"]))] == published["labels"]
    assert len(config["gqa_answers"]) == 11 and config["visual_features"]["detector"] == "vmb-x152-fpn"
    assert (published["root"] / "models/vilbert-pretrained/vocab.txt").is_file()


@pytest.mark.parametrize("section, outputs", [
    ("2", ["models/vilbert-12in1/eval-minval/metrics.json", "models/vilbert-12in1/eval-test-dev/predictions.json",
           "runs/vqa/checkpoints"]),
    ("3", ["models/vilbert-12in1/eval-test/metrics.json", "models/vilbert-pretrained/eval-test/metrics.json",
           "runs/retrieval/checkpoints"]),
    ("4", ["models/vilbert-12in1/eval-val/metrics.json", "runs/refcoco+/checkpoints",
           "features/refcoco+_gt_boxes.json"]),
])
def test_guide_section_runs(published, section, outputs, monkeypatch):
    monkeypatch.chdir(published["root"])
    for command in published["sections"][section]:
        run_command(command, published["tiny_json"])
    for output in outputs:
        assert (published["root"] / output).exists(), output
    if section == "2":
        submission = json.loads((published["root"] / outputs[1]).read_text())
        assert {p["answer"] for p in submission} <= set(published["labels"])
