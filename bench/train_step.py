"""Training-step throughput at the reference shapes, and the data loader's own rate beside it.

Two steps, each a full optimizer step as the trainer runs it (autocast forward, backward, clip, fused AdamW on
CUDA, zero_grad):
- pretraining: ViLBertForPreTraining, batch 64, text 36, 37 regions (IMG + 36), 15 % MLM / MRM labels,
  alignment labels;
- VQA fine-tuning: ViLBertForVLTasks answer head, batch 128, text 23, 101 regions (IMG + 100), BCE on soft
  scores (× number of answers, as the reference).
Both in fp32 and bf16 autocast. Then the pretraining input pipeline alone (feature store read → masking →
collate, through the trainer's DataLoader settings) on a synthetic store, in samples/s, so one can see whether
the step would be input-bound.

    python bench/train_step.py --device cuda                 # base preset, reference shapes
    python bench/train_step.py --device cpu --preset tiny --batch-scale 0.125 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tasks.engine.config import OptimConfig
from tasks.engine.optimization import build_optimizer
from tasks.finetuning import model_parameter_groups

SHAPES = {"pretrain": dict(batch=64, text=36, regions=37), "vqa": dict(batch=128, text=23, regions=101)}


def synthetic_visual(batch: int, regions: int, config, device) -> dict[str, torch.Tensor]:
    return {
        "region_features": torch.randn(batch, regions, config.v_feature_size, device=device),
        "region_locations": torch.rand(batch, regions, 5, device=device),
        "region_mask": torch.ones(batch, regions, dtype=torch.long, device=device),
    }


def synthetic_text(batch: int, length: int, config, device) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(5, config.vocab_size, (batch, length), device=device),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long, device=device),
    }


def pretraining_batch(batch: int, length: int, regions: int, config, device) -> dict:
    inputs = {**synthetic_text(batch, length, config, device), **synthetic_visual(batch, regions, config, device)}
    mlm = torch.where(torch.rand(batch, length, device=device) < 0.15, inputs["input_ids"], -100)
    region_labels = torch.where(torch.rand(batch, regions, device=device) < 0.15, 1, -100)
    region_labels[:, 0] = -100
    targets = torch.softmax(torch.randn(batch, regions, config.v_target_size, device=device), -1)
    alignment = torch.randint(0, 2, (batch,), device=device)
    # counted once here, as the pretraining collate counts on the host, so the timed step has no device sync
    counts = (int((mlm != -100).sum()), int((region_labels == 1).sum()))
    return {**inputs, "mlm_labels": mlm, "region_labels": region_labels, "region_targets": targets,
            "alignment_labels": alignment, "labelled_counts": counts}


def pretraining_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def vqa_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    targets = batch["answer_targets"]
    inputs = {k: v for k, v in batch.items() if k != "answer_targets"}
    logits = model(**inputs, heads=("answer_logits",)).answer_logits
    return F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]


def time_steps(model, batch, loss_fn, dtype, steps: int, warmup: int, device) -> float:
    """Samples per second of full optimizer steps."""
    optimizer = build_optimizer(model_parameter_groups(model, OptimConfig()), OptimConfig(), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    model.train()

    def step():
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(batch["input_ids"]) / (time.perf_counter() - start)


def loader_rate(config, batch: int, length: int, regions: int, workers: int, batches: int) -> float:
    """Samples/s of the pretraining input pipeline on a synthetic store with the model's widths."""
    from features.store import FeatureStore, FeatureStoreWriter
    from tasks.data.captions import Caption
    from tasks.data.tokenization import load_tokenizer
    from tasks.engine.sampler import EpochKeyedDataset
    from tasks.pretraining import PretrainingDataset, collate_pretraining

    images = batch * 4
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        words = [f"w{i}" for i in range(200)]
        (Path(tmp) / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
        with FeatureStoreWriter(Path(tmp) / "f.h5", config.v_feature_size, cls_prob_dim=config.v_target_size) as w:
            for i in range(images):
                boxes = np.sort(rng.uniform(0, 500, (regions - 1, 4)).astype(np.float32), axis=1)
                probs = rng.dirichlet(np.ones(config.v_target_size), regions - 1).astype(np.float32)
                w.add(str(i), (500, 500), rng.normal(size=(regions - 1, config.v_feature_size)), boxes,
                      cls_prob=probs)
        captions = [Caption(str(i), " ".join(rng.choice(words, length))) for i in range(images)]
        dataset = PretrainingDataset(captions, FeatureStore(Path(tmp) / "f.h5"), load_tokenizer(tmp), length,
                                     regions, objective=1)
        loader = DataLoader(
            EpochKeyedDataset(dataset), batch_size=batch, collate_fn=functools.partial(collate_pretraining, max_regions=regions),
            sampler=[(e, i) for e in range(batches) for i in range(images)][: batch * batches],
            num_workers=workers, persistent_workers=False, prefetch_factor=4 if workers else None,
        )
        iterator = iter(loader)
        next(iterator)  # worker start-up is not throughput
        start = time.perf_counter()
        count = sum(len(b["input_ids"]) for b in iterator)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="base", help="ViLBertConfig preset (smaller ones for CPU runs)")
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiply the reference batch sizes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for the input-pipeline rate")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    from vilbert import ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = ViLBertConfig.from_preset(args.preset)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"preset {args.preset}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'step':<10}{'batch':>6}{'text':>6}{'regions':>9}{'precision':>11}{'samples/s':>12}")
    for name, shape in SHAPES.items():
        batch = max(1, int(shape["batch"] * args.batch_scale))
        for precision in args.precisions.split(","):
            dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
            torch.manual_seed(0)
            if name == "pretrain":
                model = ViLBertForPreTraining(config).to(device)
                data = pretraining_batch(batch, shape["text"], shape["regions"], config, device)
                loss_fn = pretraining_loss
            else:
                model = ViLBertForVLTasks(config).to(device)
                data = {**synthetic_text(batch, shape["text"], config, device),
                        **synthetic_visual(batch, shape["regions"], config, device),
                        "answer_targets": torch.rand(batch, config.num_labels, device=device).lt(0.01).float()}
                loss_fn = vqa_loss
            if args.compile:
                model = torch.compile(model)
            rate = time_steps(model, data, loss_fn, dtype, args.steps, args.warmup, device)
            print(f"{name:<10}{batch:>6}{shape['text']:>6}{shape['regions']:>9}{precision:>11}{rate:>12.1f}")
            del model, data
    batch = max(1, int(SHAPES["pretrain"]["batch"] * args.batch_scale))
    rate = loader_rate(config, batch, SHAPES["pretrain"]["text"], SHAPES["pretrain"]["regions"], args.workers, 8)
    print(f"input pipeline (pretraining, store → masking → collate, {args.workers} workers, batch {batch}): "
          f"{rate:.1f} samples/s")


if __name__ == "__main__":
    main()
