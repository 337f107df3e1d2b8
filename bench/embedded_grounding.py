"""Does an embedded pretraining checkpoint use the image? Three checks on the shapes world's held-out captions.

    python bench/embedded_grounding.py runs/pretrain_embedded/checkpoints/step-00001400

1. Masked colour and shape words: every colour (or shape) word of a caption is replaced by [MASK] and predicted
   with the caption's own image and with another image. A model that grounds words in regions loses accuracy
   with the wrong image; a language-only model does not.
2. Live pooler units: the fraction of `pooled_text` / `pooled_vision` units above zero (ReLU poolers). The
   alignment head and every pooled-output task head see their product, so dead units are lost capacity.
3. Alignment margins: the mean logit difference (aligned minus mismatched) on aligned and on mismatched pairs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from tasks.data.regions import build_visual_input, collate_visual
from tasks.engine.config import load_config
from tasks.pretraining import IGNORE, PretrainConfig, PretrainingTask
from tasks.shapes.world import COLOURS, KINDS
from vilbert import ViLBertForPreTraining


def word_ids(tokenizer, words) -> list[int]:
    """Vocabulary ids of the words that are a single word piece (e.g. "cyan" is two and is left out)."""
    vocab = tokenizer.backend.get_vocab()
    return [vocab[w] for w in words if tokenizer.backend.tokenize(w) == [w]]


def visual_batch(dataset, image_ids, max_regions):
    regions = [dataset.store.read(i) for i in image_ids]
    return collate_visual([build_visual_input(r.features, r.boxes, r.image_hw, max_regions) for r in regions],
                          pad_to=max_regions)


@torch.no_grad()
def masked_word_accuracy(model, dataset, words, indices, images, max_regions, batch=100) -> float:
    tokenizer = dataset.tokenizer
    targets = torch.tensor(word_ids(tokenizer, words))
    correct = total = 0
    for start in range(0, len(indices), batch):
        rows = indices[start : start + batch]
        ids = torch.from_numpy(dataset.text[rows].astype(np.int64))  # [B, L]
        chosen = torch.isin(ids, targets)
        labels = torch.where(chosen, ids, IGNORE)
        masked = torch.where(chosen, tokenizer.mask_id, ids)
        out = model(input_ids=masked, attention_mask=(ids != tokenizer.pad_id).long(),
                    token_type_ids=torch.zeros_like(ids), mlm_labels=labels,
                    **visual_batch(dataset, images[start : start + batch], max_regions))
        correct += int((out.mlm_logits.argmax(-1) == labels[chosen]).sum())
        total += int(chosen.sum())
    return 100.0 * correct / max(total, 1)


def checkpoint_arguments(description: str, captions: int) -> argparse.Namespace:
    """A pretraining checkpoint, how many held-out captions to read, torch's threads (set here)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a pretraining checkpoint directory (with run_config.yaml)")
    parser.add_argument("--captions", type=int, default=captions, help=f"held-out captions read (default {captions})")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def held_out(checkpoint: Path) -> tuple[PretrainConfig, PretrainingTask, ViLBertForPreTraining]:
    """The checkpoint's run config, its pretraining task on the held-out (val) captions only, the model in eval."""
    config = load_config(checkpoint / "run_config.yaml", PretrainConfig)
    config.data.train_captions = None  # held-out data only
    return config, PretrainingTask(config), ViLBertForPreTraining.from_pretrained(checkpoint).eval()


def main() -> None:
    args = checkpoint_arguments(__doc__, captions=600)
    config, task, model = held_out(args.checkpoint)
    dataset = task.dataset("val")
    max_regions = config.data.max_regions

    count = min(args.captions, len(dataset))
    indices = np.arange(count)
    own = [dataset.captions[i].image_id for i in indices]
    rng = np.random.default_rng(0)
    other = []
    for i in indices:  # another image of the held-out set, never the caption's own
        j = int(rng.integers(count))
        while dataset.captions[j].image_id == own[i]:
            j = int(rng.integers(count))
        other.append(dataset.captions[j].image_id)
    print(f"{args.checkpoint}: {count} held-out captions")
    for name, words in (("colour", list(COLOURS)), ("shape", list(KINDS))):
        chance = 100 / len(word_ids(dataset.tokenizer, words))  # a uniform guess among the words tested
        true = masked_word_accuracy(model, dataset, words, indices, own, max_regions)
        wrong = masked_word_accuracy(model, dataset, words, indices, other, max_regions)
        print(f"  masked {name} words: {true:5.1f} % with the true image, {wrong:5.1f} % with another "
              f"(chance {chance:.1f} %)")

    with torch.no_grad():
        batch = task.collate([dataset.sample(int(i), 0) for i in indices])
        out = model(**batch)
    live_text = (out.pooled_text > 0).float().mean().item()
    live_vision = (out.pooled_vision > 0).float().mean().item()
    print(f"  live pooler units: pooled_text {100 * live_text:.0f} %, pooled_vision {100 * live_vision:.0f} %")
    margin = out.alignment_logits[:, 0] - out.alignment_logits[:, 1]
    labels = batch["alignment_labels"]
    print(f"  alignment logit margin: {margin[labels == 0].mean():+.2f} on aligned pairs, "
          f"{margin[labels == 1].mean():+.2f} on mismatched")


if __name__ == "__main__":
    main()
