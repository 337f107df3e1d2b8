"""Throughput of one ViLBERT training step (forward, backward, AdamW) on random inputs.

    PYTHONPATH=. python bench/model_step.py --preset tiny --model pretrain --batch 8 --steps 5
    PYTHONPATH=. python bench/model_step.py --preset base --model vqa --batch 64 --text-len 23 --regions 101 \
        --dtype bf16 --device cuda --compile

Prints samples/s (median step time after warm-up) and the FLOPs of one step per sample, counted with
torch.utils.flop_counter.FlopCounterMode (matmuls and attention; forward + backward).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from vilbert import PRESETS, ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks


def make_batch(config: ViLBertConfig, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    b, length, regions = args.batch, args.text_len, args.regions
    batch = {
        "input_ids": torch.randint(1, config.vocab_size, (b, length), device=device),
        "attention_mask": torch.ones(b, length, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(b, length, dtype=torch.long, device=device),
        "region_features": torch.randn(b, regions, config.v_feature_size, device=device),
        "region_locations": torch.rand(b, regions, 5, device=device),
        "region_mask": torch.ones(b, regions, device=device),
    }
    if args.model == "pretrain":  # 15% of tokens and of regions (never the IMG token) carry labels
        mlm = torch.randint(0, config.vocab_size, (b, length), device=device)
        batch["mlm_labels"] = torch.where(torch.rand(b, length, device=device) < 0.15, mlm, -100)
        selected = torch.rand(b, regions, device=device) < 0.15
        selected[:, 0] = False
        batch["region_labels"] = selected.long()
        batch["region_targets"] = torch.softmax(torch.randn(b, regions, config.v_target_size, device=device), -1)
        batch["alignment_labels"] = torch.randint(0, 2, (b,), device=device)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--model", default="pretrain", choices=["pretrain", "vqa"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=36)
    parser.add_argument("--regions", type=int, default=37)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ViLBertConfig.from_preset(args.preset)
    model = (ViLBertForPreTraining if args.model == "pretrain" else ViLBertForVLTasks)(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    batch = make_batch(config, args, device)
    answers = torch.rand(args.batch, config.num_labels, device=device)
    forward = torch.compile(model) if args.compile else model

    def step() -> None:
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
        )
        with autocast:
            if args.model == "pretrain":
                loss = forward(**batch).loss
            else:
                logits = forward(**batch, heads=["answer_logits"]).answer_logits
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), answers)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    synchronize()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    seconds = statistics.median(times)
    flops = counter.get_total_flops() / args.batch
    parameters = sum(p.numel() for p in model.parameters())
    print(f"preset={args.preset} model={args.model} params={parameters / 1e6:.2f}M batch={args.batch} "
          f"text_len={args.text_len} regions={args.regions} dtype={args.dtype} device={args.device} "
          f"compile={args.compile}")
    print(f"step {seconds * 1e3:.1f} ms  {args.batch / seconds:.1f} samples/s  "
          f"{flops / 1e9:.3f} GFLOP/sample (fwd+bwd)  {flops * args.batch / seconds / 1e12:.3f} TFLOP/s")


if __name__ == "__main__":
    main()
