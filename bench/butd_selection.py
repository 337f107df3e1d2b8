"""Time BUTD box selection (rule A, fixed-36, VMB) on detector-sized score matrices: 300 proposals x 1601 classes.

    python bench/butd_selection.py [--images 8] [--device cpu|cuda]
"""

import argparse
import time

import torch

from features.selection import BUTD_RULE, VMB_RULE, fixed_k_rule, select_regions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--proposals", type=int, default=300)
    parser.add_argument("--classes", type=int, default=1601)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    xy = torch.rand(args.images, args.proposals, 2) * 600
    boxes = list(torch.cat([xy, xy + 16 + torch.rand_like(xy) * 300], dim=2).to(args.device))
    # peaked distributions, like a trained detector's: a few plausible classes per proposal
    logits = torch.randn(args.images, args.proposals, args.classes) * 2
    logits[..., 1:6] += 6 * torch.rand(args.images, args.proposals, 5)
    scores = list(torch.softmax(logits, dim=-1).to(args.device))
    for rule in (BUTD_RULE, fixed_k_rule(36), VMB_RULE):
        select_regions(boxes, scores, rule)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            kept = select_regions(boxes, scores, rule)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        per_image = (time.perf_counter() - start) / args.repeats / args.images
        print(f"{rule.name:>9}: {per_image * 1e3:7.2f} ms/image  ({1 / per_image:7.1f} images/s), "
              f"boxes/image {sum(len(k) for k, _ in kept) / args.images:.1f}")


if __name__ == "__main__":
    main()
