"""Convert a released ViLBERT checkpoint (.bin) into this project's format (config.json + model.safetensors).

The reference config JSON (--config, e.g. bert_base_6layer_6conect.json) gives widths and attachment points; without
it the base model is assumed, with the task-token table and answer count read off the checkpoint.
--answers (the reference's cache/trainval_label2ans.pkl, a JSON list or a text file, one answer per line) labels
the answer head in its released order; --gqa-answers the 12-in-1 GQA head; --tokenizer copies the BERT tokenizer
files in. The converted config also records the features the model was trained on (visual_features).

  vilbert convert --from vilbert-multi-task --input multi_task_model.bin --out vilbert-12in1 \
      --answers VQA/cache/trainval_label2ans.pkl --gqa-answers gqa/cache/trainval_label2ans.pkl --tokenizer bert-base-uncased
"""

from __future__ import annotations

import argparse
import logging

from features.atomic import atomic_path, check_output
from tasks.cli.options import CHECKPOINT_SOURCES

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, choices=CHECKPOINT_SOURCES,
                        help="repository the file comes from")
    parser.add_argument("--input", required=True, help="reference checkpoint (.bin state dict)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--config",
        help="reference config JSON, or the name of a packaged one such as bert_base_4layer_4conect.json "
        "(default: the base 6-layer model)")
    parser.add_argument("--num-labels", type=int, help="answer-head size where it differs from the checkpoint's")
    parser.add_argument("--answers", help="answer labels of the VQA head in label order (label2ans .pkl, JSON, text)")
    parser.add_argument("--gqa-answers", help="answer labels of the 12-in-1 GQA head (its label2ans .pkl, JSON, text)")
    parser.add_argument("--tokenizer", help="BERT tokenizer directory to copy in (vocab.txt, tokenizer config)")


def run(args: argparse.Namespace) -> int:
    from tasks.runners.converted_checkpoint import copy_tokenizer, label_converted_model
    from vilbert.convert import config_from_reference_json, load_reference_checkpoint

    inputs = (args.input, args.config, args.answers, args.gqa_answers, args.tokenizer)
    check_output(args.out, inputs, folder=True)
    config = config_from_reference_json(args.config) if args.config else None
    model = load_reference_checkpoint(args.input, args.source, config=config, num_labels=args.num_labels)
    missing = label_converted_model(model, args.source, args.input, args.answers, args.gqa_answers)

    with atomic_path(args.out, inputs, folder=True) as staging:
        model.save_pretrained(staging)
        copied = copy_tokenizer(args.tokenizer, staging)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"converted {args.input} ({args.source}) -> {args.out}")
    print(f"  model: {type(model).__name__}, {parameters / 1e6:.2f} M parameters, "
          f"{model.config.num_hidden_layers} text / {model.config.v_num_hidden_layers} visual / "
          f"{len(model.config.v_biattention_id)} co-attention layers, task tokens: {model.config.task_specific_tokens}")
    print(f"  trained on: {model.config.visual_features['description']}, {model.config.visual_features['selection']}")
    if copied:
        print(f"  tokenizer: {', '.join(copied)}")
    else:
        missing.append("tokenizer: pass --tokenizer DIR (bert-base-uncased) to copy vocab.txt in")
    for line in missing:
        print(f"  missing: {line}")
    return 0
