"""Random but well-conditioned weights for the tiny BUTD detector, shared by the converter and backend tests."""

import torch

from features.butd import BUTDDetector


def randomise_butd_weights(det: BUTDDetector, seed: int) -> BUTDDetector:
    """Every norm and predictor tensor random (BN statistics too); the background box rows stay zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in det.model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif "norm" in name:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif name.startswith("roi_heads.box_predictor."):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
        det.model.roi_heads.box_predictor.bbox_pred.weight[:4] = 0
        det.model.roi_heads.box_predictor.bbox_pred.bias[:4] = 0
    return det
