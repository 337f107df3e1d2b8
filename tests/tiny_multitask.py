"""A tiny multi-task checkpoint of every task type the demo serves, trained a step per member (not a test module).

`write_multitask_checkpoint(root)` fine-tunes one tiny model on the task zoo's data of `SERVED` (one optimizer step
per member, round-robin) with `vilbert finetune --task multi`, so its run record lists every member as a real run
does. Its features are the zoo's 16-d random ones, recorded without a detector: serve it with `--detector
tiny-test-16` (`WideTinyDetector`, registered by the tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from task_zoo import NO_DROPOUT, write_zoo
from tiny_detector import TinyDetector

from tasks.cli import main

# one member per kind of input: a question, an expression, captions, a hypothesis, two images and a statement,
# pointing among boxes, and multiple choice
SERVED = ("vqa", "retrieval", "refcoco", "nlvr2", "snli-ve", "gqa", "visual7w", "vcr-qa")


class WideTinyDetector(TinyDetector):
    """`TinyDetector` with 16-d features (the tiny preset's v_feature_size): its 7 values, then zeros."""

    name = "tiny-test-16"
    feature_dim = 16

    def forward(self, pixels, images, boxes=None):
        out = super().forward(pixels, images, boxes)
        for regions in out:
            regions.features = torch.nn.functional.pad(regions.features, (0, self.feature_dim - 7))
        return out


def build_wide_tiny_detector(weights=None, **options) -> WideTinyDetector:
    """Registry builder (`DETECTORS["tiny-test-16"] = "tiny_multitask:build_wide_tiny_detector"`)."""
    return WideTinyDetector()


def write_multitask_checkpoint(root: Path, names: tuple[str, ...] = SERVED) -> Path:
    """Fine-tune a tiny multi-task model on the zoo data of `names`; its checkpoint directory."""
    overrides = write_zoo(root / "zoo", list(names))
    config = {
        "model": {"preset": "tiny", "overrides": {"task_specific_tokens": True}},
        "train": {"output_dir": str(root / "run"), "epochs": 1, "max_steps": len(names), "num_workers": 0,
                  "device": "cpu", "log_every": 100, "save_every": 1000, "eval_at_end": False,
                  "global_batch_size": 2},
        "optim": {"lr": 1e-3, "warmup": 0.0},
        "tasks": [{"name": name, "overrides": [*overrides[name], *NO_DROPOUT, "train.global_batch_size=2"]}
                  for name in names],
    }
    (root / "multi.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", "--task", "multi", "--config", str(root / "multi.yaml")]) == 0
    return sorted((root / "run" / "checkpoints").iterdir())[-1]
