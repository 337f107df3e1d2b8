"""Does a pretraining checkpoint read box geometry? Three probes on the shapes world's held-out captions.

    python bench/geometry_probe.py runs/pretrain_embedded/checkpoints/step-00001400 [--captions 1000]

1. Relation word: each relation caption ("a large red circle to the left of a small blue square.") is written in
   one of its two directions with equal odds (the other is "a small blue square to the right of a large red
   circle.", the same fact), so the sentence alone is at chance; the relation word is masked, and the MLM head's
   logit of the true word is compared with its opposite's (left/right, above/below).
2. Relation swap: the alignment head scores the caption against the same words with its two shapes swapped (false
   for the image: the world's relations are strict); chance 50 %.
3. Left-to-right colours: each single-piece colour word of "from left to right: a small red circle, ..." is
   masked and predicted among the world's colours, in images with two colours or more (where the order tells).
Each probe runs with the image's true box locations and with them shuffled among its regions (the features kept):
a model that reads geometry loses accuracy with the locations shuffled; one that does not, loses nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tasks.data.captions import load_captions
from tasks.data.regions import collate_visual, visual_input
from tasks.shapes.grounded_captions import OPPOSITE, RELATION, WORD
from tasks.shapes.world import COLOURS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_grounding import checkpoint_arguments, held_out  # noqa: E402

PROBES = ("relation word", "relation swap", "left-to-right colours")


def piece_ids(tokenizer, words) -> dict[str, int]:
    """{word: vocabulary id} of the words that are one word piece."""
    vocab = tokenizer.backend.get_vocab()
    return {w: vocab[w] for w in words if tokenizer.backend.tokenize(w) == [w]}


def visual(store, image_id: str, max_regions: int, shuffle: np.random.Generator | None) -> dict[str, torch.Tensor]:
    """One image's collated visual input; with `shuffle`, its boxes' locations permuted among its regions."""
    batch = collate_visual([visual_input(store.read(image_id), max_regions)])
    if shuffle is not None:
        regions = int(batch["region_mask"][0].sum()) - 1  # not the IMG token
        order = torch.from_numpy(shuffle.permutation(regions) + 1)
        batch["region_locations"][0, 1 : 1 + regions] = batch["region_locations"][0, order]
    return batch


@torch.no_grad()
def mlm_logits(model, tokenizer, text: str, max_length: int, position_of: Callable[[list[int]], int],
               inputs: dict) -> torch.Tensor:
    """The MLM logits at the word `position_of(ids)` picks, with that word masked."""
    encoded = tokenizer.encode([text], max_length)
    ids = torch.from_numpy(encoded.input_ids.astype(np.int64))
    position = position_of(ids[0].tolist())
    ids[0, position] = tokenizer.mask_id
    out = model(input_ids=ids, attention_mask=torch.from_numpy(encoded.attention_mask.astype(np.int64)),
                token_type_ids=torch.zeros_like(ids), **inputs)
    return out.mlm_logits[0, position]


@torch.no_grad()
def aligned_score(model, tokenizer, texts: list[str], max_length: int, inputs) -> torch.Tensor:
    """softmax(alignment_logits)[:, 0] of each text with the same image."""
    encoded = tokenizer.encode(texts, max_length)
    ids = torch.from_numpy(encoded.input_ids.astype(np.int64))
    repeated = {k: v.expand(len(texts), *v.shape[1:]) for k, v in inputs.items()}
    out = model(input_ids=ids, attention_mask=torch.from_numpy(encoded.attention_mask.astype(np.int64)),
                token_type_ids=torch.zeros_like(ids), **repeated)
    return out.alignment_logits.softmax(-1)[:, 0]


def main() -> None:
    args = checkpoint_arguments(__doc__, captions=1000)
    config, task, model = held_out(args.checkpoint)
    store, tokenizer = task.dataset("val").store, task.tokenizer
    length, regions = config.data.max_text_length, config.data.max_regions
    relation_ids = piece_ids(tokenizer, WORD.values())
    colour_ids = piece_ids(tokenizer, COLOURS)
    direction = np.random.default_rng(0)
    right = {name: [0, 0] for name in PROBES}  # with the true locations, with them shuffled
    counts = dict.fromkeys(PROBES, 0)

    def tests(text: str) -> list[tuple[str, Callable[[dict], bool]]]:
        """The probes a caption takes: (probe, whether the model gets it right with the given visual input)."""
        if found := RELATION.match(text):
            first, relation, second = found.groups()
            if direction.random() < 0.5:  # the same fact from the other shape
                first, relation, second = second, OPPOSITE[relation], first
            said = f"a {first} {relation} a {second}."
            word, opposite = relation_ids[WORD[relation]], relation_ids[WORD[OPPOSITE[relation]]]

            def relation_word(inputs: dict) -> bool:
                logits = mlm_logits(model, tokenizer, said, length, lambda ids: ids.index(word), inputs)
                return bool(logits[word] > logits[opposite])

            def relation_swap(inputs: dict) -> bool:
                scores = aligned_score(model, tokenizer, [said, f"a {second} {relation} a {first}."], length, inputs)
                return bool(scores[0] > scores[1])

            return [("relation word", relation_word), ("relation swap", relation_swap)]
        named = {w for w in text.replace(",", " ").replace(".", " ").split() if w in COLOURS}
        if not text.startswith("from left to right") or len(named) < 2:
            return []
        among = list(colour_ids.values())
        ids = tokenizer.encode([text], length).input_ids[0].tolist()

        def colour_at(place: int) -> Callable[[dict], bool]:
            def test(inputs: dict) -> bool:
                logits = mlm_logits(model, tokenizer, text, length, lambda _: place, inputs)
                return among[int(logits[among].argmax())] == ids[place]
            return test

        return [("left-to-right colours", colour_at(p)) for p, i in enumerate(ids) if i in among]

    for index, caption in enumerate(load_captions(config.data.val_captions)[: args.captions]):
        probes = tests(caption.text)
        if not probes:
            continue
        for column, shuffle in enumerate((None, np.random.default_rng([index, 1]))):
            inputs = visual(store, caption.image_id, regions, shuffle)
            for name, test in probes:
                right[name][column] += test(inputs)
        for name, _ in probes:
            counts[name] += 1
    print(f"{args.checkpoint}: held-out captions of {config.data.val_captions}")
    chance = {"relation word": 50.0, "relation swap": 50.0, "left-to-right colours": 100 / len(colour_ids)}
    for name, (true, shuffled) in right.items():
        total = max(counts[name], 1)
        print(f"  {name:<22} {100 * true / total:5.1f} % with the true boxes, {100 * shuffled / total:5.1f} % "
              f"with their locations shuffled (chance {chance[name]:.1f} %, {counts[name]} tests)")


if __name__ == "__main__":
    main()
