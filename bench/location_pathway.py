"""Can the embedded ViLBERT learn a spatial relation from box locations when it is trained on one directly?

    python bench/location_pathway.py [--steps 800]

A fresh embedded model (no text initialisation) sees two regions with fixed, distinct features A and B, stored in
random order, and a fixed sentence; a linear head on pooled_text * pooled_vision (as the answer heads) is trained
to say whether A lies left of B. Only the 5-d box locations tell. If this is learnt, the location input reaches the
model and the co-attention can compare two regions' positions; a checkpoint that reads no geometry
(bench/geometry_probe.py) then lacks the training signal, not the pathway.
"""

from __future__ import annotations

import argparse

import torch

from vilbert import ViLBertConfig, ViLBertModel

BATCH = 64
SENTENCE = [101, 2003, 1037, 2187, 1997, 1038, 102]  # "[CLS] is a left of b [SEP]" in BERT's vocabulary
IMG_LOCATION = [0.0, 0.0, 1.0, 1.0, 1.0]


def relation_batch(features: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Region features [B, 3, D] (IMG, then A and B in random order), locations [B, 3, 5], label A-left-of-B [B]."""
    x_a, x_b = torch.rand(BATCH, generator=generator) * 0.8, torch.rand(BATCH, generator=generator) * 0.8
    swap = torch.rand(BATCH, generator=generator) < 0.5
    first, second = torch.where(swap, x_b, x_a), torch.where(swap, x_a, x_b)
    regions = features.expand(BATCH, 3, -1).clone()
    regions[swap, 1], regions[swap, 2] = features[2], features[1]

    def box(x: torch.Tensor) -> torch.Tensor:
        top = torch.rand(BATCH, generator=generator) * 0.5
        return torch.stack([x, top, x + 0.15, top + 0.3, torch.full((BATCH,), 0.045)], dim=-1)

    locations = torch.stack([torch.tensor(IMG_LOCATION).expand(BATCH, 5), box(first), box(second)], dim=1)
    return regions, locations, (x_a < x_b).long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = ViLBertConfig.from_preset("embedded", vocab_size=30522, v_feature_size=96, fixed_t_layer=0)
    model = ViLBertModel(config)
    features = torch.randn(3, 96, generator=generator).abs()  # IMG, A, B
    head = torch.nn.Linear(config.bi_hidden_size, 2)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=2e-4)
    ids = torch.tensor([SENTENCE]).expand(BATCH, -1)
    correct = 0
    for step in range(1, args.steps + 1):
        regions, locations, labels = relation_batch(features, generator)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                    region_features=regions, region_locations=locations,
                    region_mask=torch.ones(BATCH, 3, dtype=torch.long))
        logits = head(out.pooled_text * out.pooled_vision)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        correct += int((logits.argmax(-1) == labels).sum())
        if step % 100 == 0:
            print(f"steps {step - 99:4d}-{step:4d}: training accuracy {100 * correct / (100 * BATCH):5.1f} % "
                  f"(chance 50 %)", flush=True)
            correct = 0


if __name__ == "__main__":
    main()
