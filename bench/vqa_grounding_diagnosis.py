"""Why does a fine-tuned VQA model answer from the question on the shapes world's compositional split?

    python bench/vqa_grounding_diagnosis.py --run runs/vqa_embedded [--checkpoint DIR] [--questions 600]

For the held-out test and compositional splits (and, for the probes, a sample of train questions), on the colour
("what color is the ...") and shape ("what shape is the ... object") questions, whose target shape is known from
`scenes.json`:

1. Linear probes of colour and of shape, fitted on the train questions' regions and scored on the split's target
   regions: on the input region features, and on the vision stream's output (after every co-attention layer)
   while the model reads the question. Does the information survive fine-tuning?
2. Attention: the share of the last co-attention layer's text-to-vision attention (mean over heads and question
   tokens) that lands on the target shape's region, against 1 / the number of regions.
3. The answer head: how often the answer is right, equals the question-type prior, or is a value the named
   object had in training ("what color is the triangle?" answered with a colour triangles have in train, where
   the compositional answer is one they never have): the phrase-level prior.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch

from tasks.data.regions import collate_visual, visual_input
from tasks.finetuning import model_inputs
from tasks.registry import build_task
from tasks.runners.checkpoint import load_checkpoint_model
from tasks.shapes.report import last_checkpoint
from tasks.shapes.world import COLOURS, KINDS

COLOUR_QUESTION = re.compile(r"what color is the (?:(small|large) )?(circle|square|triangle)")
SHAPE_QUESTION = re.compile(r"what shape is the (?:(small|large) )?(red|green|blue|yellow|purple|cyan) object")


def target_shape(question: str, answer: str, shapes: list[dict]) -> tuple[str, int] | None:
    """("colour" | "shape", index of the shape asked about) when the question names one shape unambiguously."""
    for kind, pattern in (("colour", COLOUR_QUESTION), ("shape", SHAPE_QUESTION)):
        match = pattern.match(question)
        if not match:
            continue
        size, word = match.groups()
        key = "kind" if kind == "colour" else "colour"
        value = "kind" if kind == "shape" else "colour"
        found = [i for i, s in enumerate(shapes) if s[key] == word and s[value] == answer
                 and (size is None or s["size"] == size)]
        return (kind, found[0]) if len(found) == 1 else None
    return None


@torch.no_grad()
def run_questions(model, task, questions, store, scenes, max_regions, batch_size=64):
    """Per question: (kind, target index, hidden of the target region, input feature, attention share, regions,
    the model's answer)."""
    tokenizer = task.tokenizer()
    answers = task.vocabulary()
    rows = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        text = tokenizer.encode([q.question for q in chunk], task.data.max_text_length)
        visual = collate_visual([visual_input(store.read(str(q.image_id)), max_regions) for q in chunk])
        batch = {"input_ids": torch.from_numpy(text.input_ids), "attention_mask": torch.from_numpy(text.attention_mask),
                 "token_type_ids": torch.from_numpy(text.token_type_ids), **visual}
        out = model(**model_inputs(batch), heads=["answer_logits"], output_attentions=True)
        attention = out.text_to_vision_attentions[-1].mean(dim=1)  # [B, L, R]
        for i, q in enumerate(chunk):
            shapes = scenes[int(q.image_id)]
            found = target_shape(q.question, q.consensus, shapes)
            if found is None:
                continue
            kind, index = found
            words = batch["attention_mask"][i].bool().clone()
            words[0] = False  # [CLS]
            share = attention[i][words].mean(dim=0)[1 + index].item()
            regions = int(batch["region_mask"][i].sum())
            rows.append({"kind": kind, "shape": shapes[index], "hidden": out.vision_hidden[i, 1 + index].float(),
                         "input": batch["region_features"][i, 1 + index].float(), "attention": share,
                         "regions": regions, "answer": answers[int(out.answer_logits[i].argmax())],
                         "question": q})
    return rows


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression (standardised inputs, L2 1e-3, LBFGS)."""
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def probe_accuracy(train_rows, rows, field, attribute, values) -> float:
    with torch.enable_grad():
        x = torch.stack([r[field] for r in train_rows])
        mean, std = x.mean(0), x.std(0) + 1e-6
        y = torch.tensor([values.index(r["shape"][attribute]) for r in train_rows])
        probe = fit_probe((x - mean) / std, y, len(values))
    test_x = (torch.stack([r[field] for r in rows]) - mean) / std
    test_y = torch.tensor([values.index(r["shape"][attribute]) for r in rows])
    return 100.0 * (probe(test_x).argmax(1) == test_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a shapes-world VQA fine-tuning run directory")
    parser.add_argument("--checkpoint", help="default: the run's last checkpoint")
    parser.add_argument("--questions", type=int, default=600, help="train questions for the probes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    checkpoint = Path(args.checkpoint) if args.checkpoint else last_checkpoint(run)
    config = str(run / "config.yaml")
    task = build_task("vqa", config, [f"model.init={checkpoint}", "data.extend_answers=false"])
    model = load_checkpoint_model(str(checkpoint), task).eval()
    store = task.store()
    world = Path(task.data.root).parent
    scenes = {image["image_id"]: image["shapes"] for image in json.loads((world / "scenes.json").read_text())["images"]}
    max_regions = task.data.max_regions

    train_questions = [q for q in task.questions("train") if COLOUR_QUESTION.match(q.question)
                       or SHAPE_QUESTION.match(q.question)][: args.questions]
    train_rows = run_questions(model, task, train_questions, store, scenes, max_regions)
    seen = defaultdict(set)  # what each named object had in training: kind -> colours, colour -> kinds
    for r in train_rows:
        seen["colour", r["shape"]["kind"]].add(r["shape"]["colour"])
        seen["shape", r["shape"]["colour"]].add(r["shape"]["kind"])
    prior = task.prior_answers()
    print(f"checkpoint {checkpoint}; probes fitted on {len(train_rows)} train target regions")
    header = (f"  {'split':<14} {'kind':<7} {'n':>4} {'right':>6} {'=prior':>7} {'seen':>6} {'attn':>6} {'1/R':>6} "
              f"{'probe in':>9} {'probe out':>10}")
    print(header)
    for label, root in (("held-out test", "test"), ("compositional", "compositional")):
        split_task = build_task("vqa", config, [f"model.init={checkpoint}", "data.extend_answers=false",
                                               f"data.root={Path(task.data.root) / root}"])
        rows = run_questions(model, split_task, split_task.questions("val"), store, scenes, max_regions)
        for kind in ("colour", "shape"):
            chosen = [r for r in rows if r["kind"] == kind]
            if not chosen:
                continue
            attribute, values = ("colour", list(COLOURS)) if kind == "colour" else ("kind", list(KINDS))
            truth = [r["shape"][attribute] for r in chosen]
            named = [r["shape"]["kind" if kind == "colour" else "colour"] for r in chosen]
            right = sum(r["answer"] == t for r, t in zip(chosen, truth, strict=True))
            at_prior = sum(r["answer"] == prior.get(r["question"].question_type) for r in chosen)
            in_seen = sum(r["answer"] in seen[kind, n] for r, n in zip(chosen, named, strict=True))
            attention = sum(r["attention"] for r in chosen) / len(chosen)
            uniform = sum(1 / r["regions"] for r in chosen) / len(chosen)
            probe_in = probe_accuracy(train_rows, chosen, "input", attribute, values)
            probe_out = probe_accuracy(train_rows, chosen, "hidden", attribute, values)
            n = len(chosen)
            print(f"  {label:<14} {kind:<7} {n:>4} {100 * right / n:5.1f}% {100 * at_prior / n:6.1f}% "
                  f"{100 * in_seen / n:5.1f}% {attention:6.3f} {uniform:6.3f} {probe_in:8.1f}% {probe_out:9.1f}%")
    print("  right: answer = the asked value; =prior: the question type's top train answer; seen: a value the named"
          " object has in train;\n  attn: text->vision attention share on the target region (last co-attention"
          " layer); probe in/out: linear probes of\n  the asked attribute on the input features / the vision"
          f" stream output (fitted on train), answers counted: {dict(Counter(r['kind'] for r in train_rows))}")


if __name__ == "__main__":
    main()
