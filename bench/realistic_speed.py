"""Training speed against vilbert-multi-task on realistic text and region lengths, in one run (issue 23).

    git -C <vilbert-multi-task git dir> archive HEAD vilbert/vilbert.py vilbert/utils.py | tar -x -C /tmp/ref
    PYTHONPATH=. python bench/realistic_speed.py /tmp/ref                      # CPU, 1 thread, batch 8, base preset
    PYTHONPATH=. python bench/realistic_speed.py /tmp/ref --compile            # + ours under torch.compile
    PYTHONPATH=. python bench/realistic_speed.py /tmp/ref --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --features trainval.h5 --captions train_captions.tsv                   # lengths from real files

Full optimizer steps (forward, backward, gradient clip, AdamW, zero_grad) of the reference and of ours on the
same samples with the same weights (the reference's initialisation converted by `vilbert.convert`). The
reference pads every batch to its datasets' fixed shapes (text 36 / 23, 37 / 101 regions); ours groups the same
samples by region count and text length (`ResumableDistributedSampler` with lengths) and pads each batch to its
longest item (`tasks.engine.padding`), optionally compiled (`--compile`, inductor, lengths rounded up to
multiples of `--multiple`). Timed blocks alternate between the sides. Three workloads:
- `pretrain`: Conceptual-Captions-like caption lengths, 36 boxes (+ IMG), MLM + masked regions + alignment;
- `vqa-adaptive`: VQA-v2-like question lengths, 10-100 boxes per image (bottom-up attention's adaptive features);
- `vqa-100`: the same questions with 100 boxes per image (the 12-in-1 features): only text padding differs.

Length distributions, when no file is given (word counts; + 2 for [CLS] and [SEP], + 1 for a question mark,
x 1.1 for word pieces, cut to the reference's maximum):
- Conceptual Captions: mean 10.3 words per caption (Sharma et al., ACL 2018, "Conceptual Captions", Table 2:
  token mean 10.3), modelled as 3 + Poisson(7.3);
- VQA v2 questions: mean 6.2 words, most between 4 and 10 (Antol et al., ICCV 2015, "VQA", Sec. 3.1;
  Goyal et al. 2017 keep v1's questions), modelled as 3 + Poisson(3.2);
- adaptive boxes: 10 to 100 per image at the 0.2 confidence threshold (Anderson et al., CVPR 2018, Sec. 3.1);
  the paper gives no mean, so a uniform draw on [10, 100] stands in (pass `--features` for the real counts).
`--captions` (TSV/JSON lines/JSON of captions), `--questions` (the VQA questions JSON) and `--features` (our
HDF5 store: boxes per image) replace them with the files' own lengths.
Reported: samples/s of each side and the ratio, forward+backward GFLOP per sample (FlopCounterMode), the graphs
compiled, and a profile of one step of each side by part (torch.profiler, self CPU time by module kind).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tasks.engine.padding import MODEL_PADDED_KEYS, REGIONS, TEXT, cut_to_longest, pad_to_multiple
from tasks.engine.sampler import ResumableDistributedSampler
from tasks.finetuning import soft_bce_sum
from vilbert import ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_parity import import_reference, reference_config  # noqa: E402
from reference_speed import CPU_ATTENTION_FLOPS, converted_pair, synchronize, to_device  # noqa: E402

WORKLOADS = {
    "pretrain": dict(text=36, regions=37, lengths="captions", boxes="fixed36"),
    "vqa-adaptive": dict(text=23, regions=101, lengths="questions", boxes="adaptive"),
    "vqa-100": dict(text=23, regions=101, lengths="questions", boxes="fixed100"),
}
PRETRAIN_KEYS = {**MODEL_PADDED_KEYS, "mlm_labels": (TEXT, -100), "region_labels": (REGIONS, -100),
                 "region_targets": (REGIONS, 0)}
ANSWERS = 3129


# ------------------------------------------------------------------------------------------------ lengths

def text_tokens(words: np.ndarray, question: bool, maximum: int) -> np.ndarray:
    """Word counts -> token counts: x 1.1 word pieces, + [CLS] [SEP] (+ "?"), cut to the reference's maximum."""
    return np.minimum(np.ceil(words * 1.1).astype(int) + 2 + int(question), maximum)


def caption_words(args, n: int, rng: np.random.Generator) -> np.ndarray:
    if args.captions:
        from tasks.data.captions import load_captions

        texts = [c.text for c in load_captions(args.captions)]
        return np.array([len(texts[i].split()) for i in rng.integers(len(texts), size=n)])
    return 3 + rng.poisson(7.3, n)  # mean 10.3 (Sharma et al. 2018)


def question_words(args, n: int, rng: np.random.Generator) -> np.ndarray:
    if args.questions:
        questions = json.loads(Path(args.questions).read_text())["questions"]
        return np.array([len(questions[i]["question"].split()) for i in rng.integers(len(questions), size=n)])
    return 3 + rng.poisson(3.2, n)  # mean 6.2 (Antol et al. 2015)


def box_counts(args, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "fixed36":
        return np.full(n, 36)
    if kind == "fixed100":
        return np.full(n, 100)
    if args.features:
        from features.store import FeatureStore

        store = FeatureStore(args.features)
        counts = np.array([store.num_boxes(i) for i in store.ids])
        return np.minimum(counts[rng.integers(len(counts), size=n)], 100)
    return rng.integers(10, 101, n)  # 10 to 100 (Anderson et al. 2018)


# ------------------------------------------------------------------------------------------------ samples

def make_samples(name: str, shape: dict, args, config: ViLBertConfig, rng: np.random.Generator) -> list[dict]:
    """`args.samples` items at the reference's full padding (text `shape["text"]`, regions `shape["regions"]`),
    real lengths drawn from the workload's distributions; masks mark the real part."""
    n = args.samples
    words = caption_words(args, n, rng) if shape["lengths"] == "captions" else question_words(args, n, rng)
    lengths = text_tokens(words, shape["lengths"] == "questions", shape["text"])
    rows = 1 + box_counts(args, shape["boxes"], n, rng)
    items = []
    for length, regions in zip(lengths, rows, strict=True):
        text_mask = torch.arange(shape["text"]) < length
        region_mask = torch.arange(shape["regions"]) < regions
        ids = torch.where(text_mask, torch.from_numpy(rng.integers(5, config.vocab_size, shape["text"])), 0)
        item = {"input_ids": ids, "attention_mask": text_mask.long(), "token_type_ids": torch.zeros_like(ids),
                "region_features": torch.from_numpy(rng.standard_normal((shape["regions"], config.v_feature_size),
                                                                        dtype=np.float32)) * region_mask[:, None],
                "region_locations": torch.from_numpy(rng.random((shape["regions"], 5), dtype=np.float32))
                * region_mask[:, None],
                "region_mask": region_mask.long()}
        if name == "pretrain":
            masked = (torch.from_numpy(rng.random(shape["text"])) < 0.15) & text_mask
            masked[1] = True
            item["mlm_labels"] = torch.where(masked, ids, -100)
            chosen = (torch.from_numpy(rng.random(shape["regions"])) < 0.15) & region_mask
            chosen[0], chosen[1] = False, True
            item["region_labels"] = torch.where(chosen, 1, -100)
            item["region_targets"] = torch.softmax(
                torch.from_numpy(rng.standard_normal((shape["regions"], config.v_target_size), dtype=np.float32)), -1)
            item["alignment_labels"] = torch.tensor(int(rng.integers(2)))
        else:
            target = torch.zeros(ANSWERS)
            target[torch.from_numpy(rng.integers(ANSWERS, size=3))] = torch.rand(3)
            item["target"] = target
        items.append(item)
    return items


def collate(items: list[dict], pretraining: bool, longest: bool, multiple: int) -> dict:
    """Stack items (fixed padding, as the reference's datasets); with `longest`, cut to the batch's longest item
    (and round up to `multiple`)."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    if pretraining:
        batch["labelled_counts"] = (int((batch["mlm_labels"] != -100).sum()), int((batch["region_labels"] == 1).sum()))
    if longest:
        keys = PRETRAIN_KEYS if pretraining else MODEL_PADDED_KEYS
        batch = cut_to_longest(batch, keys)
        if multiple > 1:
            batch = pad_to_multiple(batch, keys, multiple)
    return batch


def reference_batch(batch: dict) -> tuple[tuple, dict]:
    """The reference models' positional inputs and (pretraining) label keywords."""
    args = (batch["input_ids"], batch["region_features"], batch["region_locations"], batch["token_type_ids"],
            batch["attention_mask"], batch["region_mask"])
    if "mlm_labels" not in batch:
        return args, {}
    return args, {"masked_lm_labels": torch.where(batch["mlm_labels"] == -100, -1, batch["mlm_labels"]),
                  "image_label": torch.where(batch["region_labels"][:, 1:] == 1, 1, -1),
                  "image_target": batch["region_targets"][:, 1:], "next_sentence_label": batch["alignment_labels"]}


# ------------------------------------------------------------------------------------------------ models

def build(ref, name: str, config: ViLBertConfig) -> tuple[nn.Module, nn.Module]:
    if name == "pretrain":
        ref_model = ref.BertForMultiModalPreTraining(reference_config(ref, config))
        return ref_model, converted_pair(ref_model, ViLBertForPreTraining, config)
    ref_model = ref.VILBertForVLTasks(reference_config(ref, config), num_labels=config.num_labels)
    return ref_model, converted_pair(ref_model, ViLBertForVLTasks, config)


def reference_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    args, labels = reference_batch(batch)
    if labels:
        return torch.stack([term.sum() for term in model(*args, **labels)]).sum()
    return soft_bce_sum(model(*args)[0], batch["target"])


def our_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in MODEL_PADDED_KEYS}
    if "mlm_labels" in batch:
        return model(**inputs, **{k: batch[k] for k in ("mlm_labels", "region_labels", "region_targets",
                                                          "alignment_labels", "labelled_counts")}).loss
    return soft_bce_sum(model(**inputs, heads=["answer_logits"]).answer_logits, batch["target"])


def per_sample_vqa(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Each sample's soft-target BCE summed over the answers."""
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["target"], reduction="none").sum(1)


def step(model: nn.Module, loss_fn, batch: dict, optimizer: torch.optim.Optimizer, autocast) -> None:
    with autocast:
        loss = loss_fn(model, batch)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def gflop_per_sample(model: nn.Module, loss_fn, batches: list[dict]) -> float:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        for batch in batches:
            loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9 / sum(len(b["input_ids"]) for b in batches)


def profile_by_part(model: nn.Module, loss_fn, batch: dict, device: torch.device) -> dict[str, float]:
    """Self milliseconds (CPU, or the GPU's on CUDA) of one forward + backward, grouped by operator kind."""
    groups = {"matmul (linear, bmm)": ("addmm", "mm", "bmm", "matmul", "linear"),
              "attention (sdpa, softmax)": ("attention", "softmax"),
              "layer norm": ("layer_norm",), "elementwise (gelu, add, mul, dropout)": ("gelu", "add", "mul", "div",
                                                                                       "dropout", "relu", "sub"),
              "loss (cross entropy, bce, kl)": ("cross_entropy", "nll", "binary_cross", "kl_div", "log_softmax")}
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    parts = dict.fromkeys([*groups, "other"], 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        part = next((p for p, keys in groups.items() if any(k in name for k in keys)), "other")
        parts[part] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference_dir", type=Path, help="directory holding the reference's vilbert/vilbert.py")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32, help="samples per workload (one timed block each side)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed blocks per side")
    parser.add_argument("--window", type=int, default=8, help="length-grouping window in batches")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile (inductor)")
    parser.add_argument("--multiple", type=int, default=8, help="compiled side: lengths rounded up to this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument("--captions"), parser.add_argument("--questions"), parser.add_argument("--features")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    ref = import_reference(args.reference_dir)
    config = ViLBertConfig.from_preset(args.preset, num_labels=ANSWERS, gqa_num_labels=1533,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                       v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)
    print(f"device {device}, {args.precision}, preset {args.preset}, batch {args.batch}, {args.samples} samples per "
          f"block, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()} (dropout off on both sides so that losses compare)", flush=True)
    results = {}
    for name in args.workloads.split(","):
        shape = WORKLOADS[name]
        pretraining = name == "pretrain"
        rng = np.random.default_rng(0)
        items = make_samples(name, shape, args, config, rng)
        lengths = np.stack([[int(i["region_mask"].sum()), int(i["attention_mask"].sum())] for i in items], axis=1).T
        torch.manual_seed(0)
        with contextlib.redirect_stdout(sys.stderr):
            ref_model, ours = build(ref, name, config)
        ref_model.to(device), ours.to(device)
        # the reference: shuffled batches at fixed padding; ours: the same samples, length-grouped, cut to longest
        fixed_order = np.random.default_rng(1).permutation(len(items))
        sampler = ResumableDistributedSampler(len(items), args.batch, 0, 1, seed=1, lengths=lengths,
                                              group_window=args.window)
        grouped_order = sampler.epoch_order()
        batches = {
            "reference": [to_device(collate([items[i] for i in fixed_order[s:s + args.batch]], pretraining, False, 1),
                                    device) for s in range(0, len(items) - args.batch + 1, args.batch)],
            "ours": [to_device(collate([items[i] for i in grouped_order[s:s + args.batch]], pretraining, True, 1),
                               device) for s in range(0, len(grouped_order) - args.batch + 1, args.batch)],
        }
        sides = {"reference": (ref_model, reference_loss), "ours": (ours, our_loss)}
        if args.compile:
            batches["ours compiled"] = [to_device(collate([items[i] for i in grouped_order[s:s + args.batch]],
                                                          pretraining, True, args.multiple), device)
                                        for s in range(0, len(grouped_order) - args.batch + 1, args.batch)]
            sides["ours compiled"] = (torch.compile(ours), our_loss)

        # the same batch both ways: reference at fixed padding, ours cut to its longest item (eval mode)
        check = [items[i] for i in fixed_order[: args.batch]]
        ref_model.eval(), ours.eval()
        with torch.no_grad():
            fixed = to_device(collate(check, pretraining, False, 1), device)
            cut = to_device(collate(check, pretraining, True, 1), device)
            if pretraining:  # per-term means summed, on both sides
                got, expected = our_loss(ours, cut), reference_loss(ref_model, fixed)
                difference = float((got - expected).abs() / expected.abs())
            else:
                got = per_sample_vqa(ours(**{k: cut[k] for k in MODEL_PADDED_KEYS}, heads=["answer_logits"])
                                     .answer_logits, cut)
                expected = per_sample_vqa(ref_model(*reference_batch(fixed)[0])[0], fixed)
                difference = float(((got - expected).abs() / expected.abs()).max())
        ref_model.train(), ours.train()
        print(f"\n{name}: text {shape['text']} / regions {shape['regions']} (reference padding); ours pads to "
              f"{np.mean([b['attention_mask'].shape[1] for b in batches['ours']]):.1f} tokens and "
              f"{np.mean([b['region_mask'].shape[1] for b in batches['ours']]):.1f} regions on average "
              f"(real: {lengths[:, 1].mean():.1f} and {lengths[:, 0].mean():.1f}); "
              f"{'loss' if pretraining else 'per-sample losses'} ours vs reference: max relative difference "
              f"{difference:.1e}", flush=True)

        flops = {side: gflop_per_sample(model, loss_fn, batches[side][:2])
                 for side, (model, loss_fn) in sides.items() if side != "ours compiled"}
        optimizers = {side: torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
                      for side, (model, _) in sides.items()}
        torch._dynamo.utils.counters.clear()
        for side, (model, loss_fn) in sides.items():  # warm-up (and compile)
            for batch in batches[side][:2]:
                step(model, loss_fn, batch, optimizers[side], autocast)
        seconds = dict.fromkeys(sides, 0.0)
        for round_ in range(args.rounds):
            for side in list(sides) if round_ % 2 == 0 else list(sides)[::-1]:
                model, loss_fn = sides[side]
                synchronize(device)
                start = time.perf_counter()
                for batch in batches[side]:
                    step(model, loss_fn, batch, optimizers[side], autocast)
                synchronize(device)
                seconds[side] += time.perf_counter() - start
        rates = {side: args.rounds * len(batches[side]) * args.batch / seconds[side] for side in sides}
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) if args.compile else 0
        profile = {side: profile_by_part(sides[side][0], sides[side][1], batches[side][0], device)
                   for side in ("reference", "ours")}
        results[name] = {"samples_per_s": rates, "gflop_per_sample": flops, "graphs_compiled": graphs,
                         "loss_difference": difference, "profile_ms": profile}
        for side, rate in rates.items():
            print(f"  {side:<14} {rate:7.3f} samples/s  {rate / rates['reference']:5.2f}x"
                  + (f"  {flops[side]:9.3g} GFLOP/sample" if side in flops else f"  ({graphs} graphs compiled)"))
        print("  profile of one step's forward + backward (self CPU ms; first batch of each side):")
        for part in profile["reference"]:
            print(f"    {part:<42}{profile['reference'][part]:>10.0f}{profile['ours'][part]:>10.0f}")
        del sides, optimizers, ref_model, ours
    print("\n| workload | reference samples/s | ours | ours / reference | ours compiled / reference "
          "| GFLOP per sample (reference / ours) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rates, flops = r["samples_per_s"], r["gflop_per_sample"]
        compiled = (f"{rates['ours compiled'] / rates['reference']:.2f}× ({r['graphs_compiled']} graphs)"
                    if "ours compiled" in rates else "not run")
        print(f"| {name} | {rates['reference']:.3f} | {rates['ours']:.3f} | **{rates['ours'] / rates['reference']:.2f}×** "
              f"| {compiled} | {flops['reference']:.3g} / {flops['ours']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
