"""Training-step speed of this model against the reference implementation (vilbert-multi-task), in one run.

    git -C <vilbert-multi-task git dir> archive HEAD vilbert/vilbert.py vilbert/utils.py | tar -x -C /tmp/ref
    PYTHONPATH=. python bench/reference_speed.py /tmp/ref                     # CPU, 1 thread, batch 8, fp32
    PYTHONPATH=. python bench/reference_speed.py /tmp/ref --device cuda --batch 0 --precision bf16

Two steps at the reference text and region lengths, each a full optimizer step (forward, backward, gradient clip,
AdamW, zero_grad) for both implementations, with the same weights (the reference's initialisation converted by
`vilbert.convert`, as in `bench/reference_parity.py`) and the same inputs:
- pretraining: our ViLBertForPreTraining against BertForMultiModalPreTraining, text 36, 37 regions (IMG + 36),
  15 % of tokens with an MLM label, 15 % of regions masked (KL to the detector's classes), alignment labels;
- VQA fine-tuning: our ViLBertForVLTasks (answer head only, as our trainer asks) against VILBertForVLTasks,
  text 23, 101 regions, soft-target BCE x number of answers on the answer logits.
`--batch 0` uses the reference batches (64 pretraining, 128 VQA); the default 8 suits a CPU. Both models run in
train mode with the same torch AdamW; timed blocks alternate between them (`--rounds`) so that load from other
processes hits both alike. Before timing, one eval-mode forward checks that both compute the same loss, and
FlopCounterMode counts each model's FLOPs by part, which shows where the two steps differ in work.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from tasks.finetuning import soft_bce_sum
from vilbert import ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks
from vilbert.convert import convert_reference_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_parity import import_reference, reference_config  # noqa: E402
from train_step import synthetic_text, synthetic_visual  # noqa: E402

SHAPES = {"pretrain": dict(batch=64, text=36, regions=37), "vqa": dict(batch=128, text=23, regions=101)}
MASK_PROBABILITY = 0.15
# (part, reference module, our module): the FLOP breakdown; what no part names is counted as "other"
PARTS = (
    ("trunk (embeddings, both streams, co-attention, poolers)", "bert", "vilbert"),
    ("MLM head (transform + vocab decoder)", "cls.predictions", "mlm_head"),
    ("region-class head", "cls.imagePredictions", "region_head"),
    ("alignment head", "cls.bi_seq_relationship", "alignment_head"),
    ("VQA answer head", "vil_prediction", "answer_head"),
)

# FlopCounterMode knows the CUDA attention kernels but not the CPU one that our attention runs on there
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, **kwargs: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, query, key, value, *args, **kwargs: sdpa_backward_flop_count(grad, query, key, value),
}

LossFn = Callable[[], torch.Tensor]


def converted_pair(ref_model: nn.Module, our_class: type, config: ViLBertConfig) -> nn.Module:
    """Our model of `our_class` holding the reference model's weights (every one of ours must be covered)."""
    ours = our_class(config)
    missing, _ = ours.load_state_dict(convert_reference_state_dict(ref_model.state_dict(), config), strict=False)
    if uncovered := [key for key in missing if key not in ours._tied_weights_keys]:
        raise RuntimeError(f"weights not covered by the reference state dict: {uncovered}")
    return ours


def model_inputs(config: ViLBertConfig, batch: int, length: int, regions: int, generator: torch.Generator) -> dict:
    """Full-length text and regions (the reference shapes are the padded batch shapes), seeded by `generator`."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        return {**synthetic_text(batch, length, config, "cpu"), **synthetic_visual(batch, regions, config, "cpu")}


def reference_args(x: dict) -> tuple:
    """The reference models' positional inputs."""
    return (x["input_ids"], x["region_features"], x["region_locations"], x["token_type_ids"], x["attention_mask"],
            x["region_mask"])


def to_device(values: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def pretraining_step(ref, config: ViLBertConfig, batch: int, length: int, regions: int, device: torch.device,
                     generator: torch.Generator) -> tuple[nn.Module, LossFn, nn.Module, LossFn]:
    """Both pretraining models and their losses on one batch: MLM + masked regions (KL) + alignment."""
    ref_model = ref.BertForMultiModalPreTraining(reference_config(ref, config))
    ours = converted_pair(ref_model, ViLBertForPreTraining, config)
    x = model_inputs(config, batch, length, regions, generator)
    masked_tokens = torch.rand(batch, length, generator=generator) < MASK_PROBABILITY
    masked_regions = torch.rand(batch, regions - 1, generator=generator) < MASK_PROBABILITY  # IMG never masked
    masked_tokens[0, 1] = masked_regions[0, 0] = True  # at least one of each
    region_targets = torch.softmax(torch.randn(batch, regions - 1, config.v_target_size, generator=generator), -1)
    alignment = torch.randint(0, 2, (batch,), generator=generator)
    ref_labels = {
        "masked_lm_labels": torch.where(masked_tokens, x["input_ids"], -1),
        "image_label": torch.where(masked_regions, 1, -1),
        "image_target": region_targets,
        "next_sentence_label": alignment,
    }
    our_labels = {
        "mlm_labels": torch.where(masked_tokens, x["input_ids"], -100),
        "region_labels": torch.cat([torch.zeros(batch, 1, dtype=torch.long), masked_regions.long()], dim=1),
        "region_targets": torch.cat([torch.zeros(batch, 1, config.v_target_size), region_targets], dim=1),
        "alignment_labels": alignment,
        # our pretraining collate counts these on the host, which spares the forward a device sync
        "labelled_counts": (int(masked_tokens.sum()), int(masked_regions.sum())),
    }
    x, ref_labels, our_labels = (to_device(values, device) for values in (x, ref_labels, our_labels))
    ref_model.to(device)
    ours.to(device)
    args = reference_args(x)
    return (ref_model, lambda: torch.cat(ref_model(*args, **ref_labels)).sum(),
            ours, lambda: ours(**x, **our_labels).loss)


def vqa_step(ref, config: ViLBertConfig, batch: int, length: int, regions: int, device: torch.device,
             generator: torch.Generator) -> tuple[nn.Module, LossFn, nn.Module, LossFn]:
    """Both task models and the VQA loss (soft-target BCE on the answer logits) on one batch."""
    ref_model = ref.VILBertForVLTasks(reference_config(ref, config), num_labels=config.num_labels)
    ours = converted_pair(ref_model, ViLBertForVLTasks, config)
    x = model_inputs(config, batch, length, regions, generator)
    answered = torch.rand(batch, config.num_labels, generator=generator) < 3 / config.num_labels
    targets = answered * torch.rand(batch, config.num_labels, generator=generator)  # soft scores in [0, 1)
    x, targets = to_device(x, device), targets.to(device)
    ref_model.to(device)
    ours.to(device)
    args = reference_args(x)
    return (ref_model, lambda: soft_bce_sum(ref_model(*args)[0], targets),
            ours, lambda: soft_bce_sum(ours(**x, heads=["answer_logits"]).answer_logits, targets))


def flops_by_part(counter: FlopCounterMode, root: str, side: int) -> dict[str, float]:
    """GFLOP per part of PARTS (side 1 = reference names, 2 = ours), and the rest under "other"."""
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    parts = {part[0]: counts.get(f"{root}.{part[side]}", 0) / 1e9 for part in PARTS}
    parts["other (other heads, losses)"] = max(counter.get_total_flops() / 1e9 - sum(parts.values()), 0.0)  # no -0.00
    return parts


def train_step(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, autocast) -> None:
    """One optimizer step as a trainer runs it: forward, backward, clip, AdamW, zero_grad."""
    with autocast:
        loss = loss_fn()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference_dir", type=Path, help="directory holding the reference's vilbert/vilbert.py")
    parser.add_argument("--preset", default="base", help="ViLBertConfig preset of both models")
    parser.add_argument("--batch", type=int, default=8, help="batch of both steps; 0 = the reference's (64, 128)")
    parser.add_argument("--steps", choices=("pretrain", "vqa", "both"), default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--timed", type=int, default=2, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed blocks per model")
    parser.add_argument("--threads", type=int, default=1, help="threads of a CPU run")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ref = import_reference(args.reference_dir)
    # the reference's task model has 3129 VQA and 1533 GQA answers whatever its config says
    config = ViLBertConfig.from_preset(args.preset, num_labels=3129, gqa_num_labels=1533)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"preset {args.preset}, {args.precision}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)

    summary = []
    for name, shape in SHAPES.items():
        if args.steps not in (name, "both"):
            continue
        batch = args.batch or shape["batch"]
        build = pretraining_step if name == "pretrain" else vqa_step
        with contextlib.redirect_stdout(sys.stderr):  # the reference prints its visual target
            ref_model, ref_loss, ours, our_loss = build(
                ref, config, batch, shape["text"], shape["regions"], device, torch.Generator().manual_seed(0)
            )
        models = {"reference": (ref_model, ref_loss), "ours": (ours, our_loss)}
        print(f"\n{name}: batch {batch}, text {shape['text']}, regions {shape['regions']}")

        flops, step_flops, losses = {}, {}, {}
        for side, (label, (model, loss_fn)) in enumerate(models.items(), start=1):
            model.eval()
            with torch.no_grad(), autocast, FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
                losses[label] = loss_fn().item()
            flops[label] = flops_by_part(counter, type(model).__name__, side)
            model.train()
            with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:  # one warm-up step, counted
                with autocast:
                    loss = loss_fn()
                loss.backward()
            step_flops[label] = counter.get_total_flops() / 1e9
            model.zero_grad(set_to_none=True)
        print(f"loss in eval mode: reference {losses['reference']:.6f}, ours {losses['ours']:.6f} "
              f"(difference {abs(losses['reference'] - losses['ours']):.1e})")
        print(f"{'forward GFLOP by part':<58}{'reference':>10}{'ours':>10}")
        for part in flops["reference"]:
            print(f"  {part:<56}{flops['reference'][part]:>10.2f}{flops['ours'][part]:>10.2f}")
        print(f"  {'whole step (forward + backward)':<56}{step_flops['reference']:>10.2f}{step_flops['ours']:>10.2f}")

        seconds: dict[str, list[float]] = {label: [] for label in models}  # per round
        optimizers = {label: torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                                               fused=device.type == "cuda")
                      for label, (model, _) in models.items()}

        for label in models:
            for _ in range(args.warmup):
                train_step(*models[label], optimizers[label], autocast)
        for round_ in range(args.rounds):
            order = list(models) if round_ % 2 == 0 else list(models)[::-1]
            for label in order:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.timed):
                    train_step(*models[label], optimizers[label], autocast)
                synchronize(device)
                seconds[label].append(time.perf_counter() - start)
        rates = {label: args.rounds * args.timed * batch / sum(seconds[label]) for label in models}
        per_round = ", ".join(f"{r / o:.2f}x" for r, o in zip(seconds["reference"], seconds["ours"], strict=True))
        ratio = rates["ours"] / rates["reference"]
        print(f"samples/s: reference {rates['reference']:.2f}, ours {rates['ours']:.2f}, ratio ours/reference "
              f"{ratio:.2f}x (per round {per_round}; {args.rounds} x {args.timed} timed steps each, after {args.warmup} warm-up)")
        summary.append(f"{name:<10}{batch:>6}{rates['reference']:>12.2f}{rates['ours']:>10.2f}{ratio:>8.2f}x")
        del models, optimizers, ref_model, ours, ref_loss, our_loss
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'step':<10}{'batch':>6}{'reference':>12}{'ours':>10}{'ratio':>9}   (samples/s, {args.precision})")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
