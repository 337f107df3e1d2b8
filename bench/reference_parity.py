"""Compare this model with the reference implementation (vilbert-multi-task), output by output, on random weights.

    git -C <vilbert-multi-task git dir> archive HEAD vilbert/vilbert.py vilbert/utils.py | tar -x -C /tmp/ref
    PYTHONPATH=. python bench/reference_parity.py /tmp/ref
    VILBERT_REFERENCE_DIR=/tmp/ref pytest tests/vilbert/test_reference_parity.py   # the same comparison as a test

This module is the engine of tests/vilbert/test_reference_parity.py (`parity_report`), and of bench/reference_speed.py's
reference import.

REFERENCE_DIR must hold the reference's `vilbert/vilbert.py` and `vilbert/utils.py` (never committed here). They are
imported under the name `ref_vilbert`, with stand-ins for imports a forward pass does not need (boto3, requests,
botocore, tensorboardX, torch._six). Every parameter of the reference models is randomised, the state dicts are
converted into ours with `vilbert.convert`, and every output is compared in fp32 eval mode; then our weights are
exported back into the reference classes (strict load) and compared again. Prints the max abs difference of each.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import types
from pathlib import Path

import torch

from vilbert import ViLBertConfig, ViLBertForPreTraining, ViLBertForVLTasks
from vilbert.configuration_vilbert import layer_variant
from vilbert.convert import convert_reference_state_dict, export_reference_state_dict


def import_reference(reference_dir: Path) -> types.ModuleType:
    """Import REFERENCE_DIR/vilbert/vilbert.py as `ref_vilbert.vilbert`, stubbing imports unused by the model."""
    stubs = {
        "boto3": {},
        "requests": {},
        "botocore": {},
        "botocore.exceptions": {"ClientError": type("ClientError", (Exception,), {})},
        "tensorboardX": {"SummaryWriter": object},
        "torch._six": {"inf": math.inf},
    }
    for name, attributes in stubs.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
    package = types.ModuleType("ref_vilbert")
    package.__path__ = [str(reference_dir / "vilbert")]
    sys.modules["ref_vilbert"] = package
    return importlib.import_module("ref_vilbert.vilbert")


def reference_config(ref: types.ModuleType, config: ViLBertConfig):
    """The reference `BertConfig` of the same model: every constructor argument it shares with `config`."""
    shared = [name for name in inspect.signature(ref.BertConfig).parameters if name in ViLBertConfig.__dataclass_fields__]
    return ref.BertConfig(config.vocab_size, **{name: getattr(config, name) for name in shared if name != "vocab_size"})


NARROW = dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=48, v_hidden_size=24,
              v_num_attention_heads=2, v_intermediate_size=24, bi_hidden_size=16, bi_num_attention_heads=2)
# narrow models with the published 6- and 2-layer attachment patterns (bert_base_{6,2}layer_{6,2}conect.json),
# with and without the 12-in-1 task token, and one small 4-layer model with the token
SETTINGS = {
    "6layer-narrow": dict(**NARROW, **layer_variant(6), task_specific_tokens=False),
    "6layer-narrow-task-token": dict(**NARROW, **layer_variant(6), task_specific_tokens=True),
    "2layer-narrow": dict(**NARROW, **layer_variant(2), task_specific_tokens=False),
    "2layer-narrow-task-token": dict(**NARROW, **layer_variant(2), task_specific_tokens=True),
    "4layer-task-token": dict(
        hidden_size=24, num_hidden_layers=5, num_attention_heads=3, intermediate_size=40,
        v_hidden_size=16, v_num_hidden_layers=4, v_num_attention_heads=2, v_intermediate_size=20,
        bi_hidden_size=24, bi_num_attention_heads=4, v_biattention_id=[0, 1, 2, 3],
        t_biattention_id=[1, 2, 3, 4], task_specific_tokens=True,
    ),
}
COMMON = dict(vocab_size=120, max_position_embeddings=40, type_vocab_size=2, v_feature_size=20, v_target_size=9,
              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, v_hidden_dropout_prob=0.1,
              v_attention_probs_dropout_prob=0.1, fusion_method="mul")


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights that keep activations alive: matrices N(0, 0.1), biases N(0, 0.1), LayerNorm scales 1 + N(0, 0.1)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            parameter.copy_(1 + noise if "LayerNorm" in name and name.endswith("weight") else noise)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def make_inputs(config: ViLBertConfig, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    length, regions = 9, 7
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[3, 4:] = 0
    region_mask = torch.ones(batch, regions)
    region_mask[2, 5:] = 0
    return {
        "input_ids": torch.randint(1, config.vocab_size, (batch, length), generator=generator),
        "attention_mask": attention_mask,
        "token_type_ids": torch.randint(0, 2, (batch, length), generator=generator),
        "region_features": torch.randn(batch, regions, config.v_feature_size, generator=generator),
        "region_locations": torch.rand(batch, regions, 5, generator=generator),
        "region_mask": region_mask,
    }


def compare_setting(ref: types.ModuleType, name: str, fields: dict, report: dict[str, float]) -> None:
    """Add the max abs difference of every output of setting `name` (task and pretraining models) to `report`."""
    generator = torch.Generator().manual_seed(0)
    config = ViLBertConfig(**{**COMMON, **fields, "num_labels": 3129, "gqa_num_labels": 1533})
    ref_config = reference_config(ref, config)

    ref_task = ref.VILBertForVLTasks(ref_config, num_labels=3129).eval()
    randomise(ref_task, generator)
    ours = ViLBertForVLTasks(config).eval()
    ours.load_state_dict(convert_reference_state_dict(ref_task.state_dict(), config), strict=False)

    batch = 4
    x = make_inputs(config, batch, generator)
    task_ids = torch.randint(0, 20, (batch, 1), generator=generator) if config.task_specific_tokens else None
    ref_args = (x["input_ids"], x["region_features"], x["region_locations"], x["token_type_ids"],
                x["attention_mask"], x["region_mask"], None, task_ids)

    def compare_task_models(tag: str) -> None:
        with torch.no_grad():
            ref_out = ref_task(*ref_args)
            ref_base = ref_task.bert(*ref_args[:3], *ref_args[3:6], None, task_ids)
            out = ours(**x, task_ids=task_ids)
        pairs = {
            "text_hidden": (ref_base[0], out.text_hidden),
            "vision_hidden": (ref_base[1], out.vision_hidden),
            "pooled_text": (ref_base[2], out.pooled_text),
            "pooled_vision": (ref_base[3], out.pooled_vision),
            "answer_logits (vil_prediction)": (ref_out[0], out.answer_logits),
            "gqa_answer_logits (vil_prediction_gqa)": (ref_out[1], out.gqa_answer_logits),
            "pair_logit (vil_logit)": (ref_out[2].squeeze(-1), out.pair_logit),
            "binary_logits (vil_binary_prediction)": (ref_out[3], out.binary_logits),
            "tri_logits (vil_tri_prediction)": (ref_out[4], out.tri_logits),
            "region_class_logits (vision_prediction)": (ref_out[5], out.region_class_logits),
            "region_logits (vision_logit)": (ref_out[6].squeeze(-1), out.region_logits),
            "token_logits (linguisic_logit)": (ref_out[8].squeeze(-1), out.token_logits),
        }
        for key, (a, b) in pairs.items():
            report[f"{name} {tag} {key}"] = max_diff(a, b)
        spread = (out.pooled_text * out.pooled_vision).std(0).max().item()
        assert spread > 1e-3, f"degenerate random model: fused pooled vectors equal across the batch ({spread})"

    compare_task_models("converted")

    # fast mode: one caption against the batch of images, the reference's retrieval evaluation
    ref_task.bert.encoder.FAST_MODE = True
    caption = {k: x[k][:1] for k in ("input_ids", "attention_mask", "token_type_ids")}
    caption_task = task_ids[:1] if task_ids is not None else None
    with torch.no_grad():
        ref_fast = ref_task(caption["input_ids"], x["region_features"], x["region_locations"],
                            caption["token_type_ids"], caption["attention_mask"], x["region_mask"], None, caption_task)
        prefix = ours.vilbert.encode_text_prefix(**caption, task_ids=caption_task)
        fast = ours(region_features=x["region_features"], region_locations=x["region_locations"],
                    region_mask=x["region_mask"], text_prefix=prefix, heads=["pair_logit"])
    ref_task.bert.encoder.FAST_MODE = False
    report[f"{name} fast-mode pair_logit (vil_logit)"] = max_diff(ref_fast[2].squeeze(-1), fast.pair_logit)

    # export: our weights, perturbed, back into the reference class (strict), outputs again
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    ref_task.load_state_dict(export_reference_state_dict(ours), strict=True)
    compare_task_models("exported")

    if config.task_specific_tokens:
        return  # the reference pretraining forward takes no task_ids
    ref_pre = ref.BertForMultiModalPreTraining(ref_config).eval()
    randomise(ref_pre, generator)
    ours_pre = ViLBertForPreTraining(config).eval()
    ours_pre.load_state_dict(convert_reference_state_dict(ref_pre.state_dict(), config), strict=False)
    regions = x["region_features"].shape[1]
    mlm = torch.where(torch.rand(batch, 9, generator=generator) < 0.3,
                      torch.randint(0, config.vocab_size, (batch, 9), generator=generator), -1)
    mlm[0, 1] = 5  # at least one labelled token
    image_label = torch.where(torch.rand(batch, regions - 1, generator=generator) < 0.3, 1, -1)
    image_label[1, 2] = 1
    image_target = torch.softmax(torch.randn(batch, regions - 1, config.v_target_size, generator=generator), -1)
    alignment = torch.randint(0, 2, (batch,), generator=generator)
    ref_inputs = (x["input_ids"], x["region_features"], x["region_locations"], x["token_type_ids"],
                  x["attention_mask"], x["region_mask"])
    with torch.no_grad():
        ref_logits = ref_pre(*ref_inputs)
        ref_losses = ref_pre(*ref_inputs, mlm, image_label, image_target, alignment)
        full = ours_pre(**x)
        region_labels = torch.cat([torch.zeros(batch, 1, dtype=torch.long), image_label.clamp(min=0)], dim=1)
        region_targets = torch.cat([torch.zeros(batch, 1, config.v_target_size), image_target], dim=1)
        out = ours_pre(**x, mlm_labels=mlm.masked_fill(mlm == -1, -100), region_labels=region_labels,
                       region_targets=region_targets, alignment_labels=alignment)
    report[f"{name} pretrain mlm_logits"] = max_diff(ref_logits[0], full.mlm_logits)
    report[f"{name} pretrain region_logits"] = max_diff(ref_logits[1], full.region_logits)
    report[f"{name} pretrain alignment_logits"] = max_diff(ref_logits[2], full.alignment_logits)
    report[f"{name} pretrain mlm_loss"] = max_diff(ref_losses[0][0], out.mlm_loss)
    report[f"{name} pretrain region_loss"] = max_diff(ref_losses[1][0], out.region_loss)
    report[f"{name} pretrain alignment_loss"] = max_diff(ref_losses[2][0], out.alignment_loss)


def parity_report(reference_dir: Path, settings: dict[str, dict] = SETTINGS) -> dict[str, float]:
    """"<setting> <model> <output>" -> max abs difference between the reference's output and ours (fp32, eval)."""
    torch.manual_seed(0)
    ref = import_reference(Path(reference_dir))
    report: dict[str, float] = {}
    for name, fields in settings.items():
        compare_setting(ref, name, fields, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference_dir", type=Path, help="directory holding the reference's vilbert/vilbert.py")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    report = parity_report(args.reference_dir)
    width = max(map(len, report))
    for key, diff in report.items():
        print(f"{key:<{width}}  {diff:.2e}")
    worst = max(report.values())
    print(f"max abs difference {worst:.2e} over {len(report)} outputs: {'PASS' if worst <= args.tolerance else 'FAIL'}")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
