"""A tiny, deterministic RegionDetector for pipeline tests (not a test module).

Given boxes: each region's feature is the mean colour inside its box plus the box itself, so a test can check which
box produced which row. Without boxes it "detects" two boxes per image (whole image and its top-left quarter). Every region also gets class
probabilities and labels, like a real detector. `delay` slows each batch (kill-and-resume tests).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from features.detector import DetectedRegions, PreparedImage, RegionDetector


class TinyDetector(RegionDetector):
    name = "tiny-test"
    feature_dim = 7
    cls_prob_dim = 3

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay
        self.weight = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def prepare(self, image: np.ndarray) -> PreparedImage:
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255  # [3, H, W]
        return PreparedImage(pixels=pixels, scale=1.0, image_hw=image.shape[:2])

    def forward(self, pixels, images, boxes=None):
        if self.delay:
            time.sleep(self.delay)
        out = []
        for i, im in enumerate(images):
            h, w = im.image_hw
            if boxes is None:
                given = torch.tensor([[0, 0, w, h], [0, 0, w / 2, h / 2]], dtype=torch.float32, device=pixels.device)
            else:
                given = boxes[i]
            rows = []
            for x1, y1, x2, y2 in (given * im.scale).tolist():
                a, b = int(np.floor(y1)), max(int(np.ceil(y2)), int(np.floor(y1)) + 1)
                c, d = int(np.floor(x1)), max(int(np.ceil(x2)), int(np.floor(x1)) + 1)
                colour = pixels[i, :, a:b, c:d].float().mean(dim=(1, 2))  # [3]
                rows.append(torch.cat([colour * self.weight, torch.tensor([x1, y1, x2, y2], device=pixels.device)]))
            features = torch.stack(rows) if rows else pixels.new_zeros((0, self.feature_dim))
            k = len(given)
            out.append(DetectedRegions(
                features=features, boxes=given.float(), cls_prob=torch.full((k, 3), 1 / 3),
                objects_id=torch.arange(k) + 1, objects_conf=torch.full((k,), 0.5),
                attrs_id=torch.zeros(k, dtype=torch.long), attrs_conf=torch.full((k,), 0.25),
            ))
        return out

    def extractor_info(self) -> dict:
        return {"detector": self.name, "weights_sha256": None}


def build_tiny(weights: str | None = None, **options) -> TinyDetector:
    """The registry builder (`DETECTORS["tiny-test"] = "tiny_detector:build_tiny"`) for command-line tests."""
    return TinyDetector(**options)
