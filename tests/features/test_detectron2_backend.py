"""The detectron2 backend: a clear error without detectron2; identical regions to the native model with it."""

import pickle
import sys

import numpy as np
import pytest
import torch

from features.butd import BUTDConfig, BUTDDetector
from features.butd_builder import build_butd_r101_c4
from features.detector import pad_batch
from features.detector_checkpoints import export_detectron2
from features.errors import FeaturesError
from features.selection import fixed_k_rule
from tests.fixtures.tiny_butd import randomise_butd_weights


def test_missing_detectron2_is_one_clear_error(monkeypatch):
    from features import detectron2_backend

    monkeypatch.setitem(sys.modules, "detectron2", None)  # makes `import detectron2` fail
    monkeypatch.setattr(detectron2_backend, "_REGISTERED", {})
    with pytest.raises(FeaturesError, match="detectron2 backend needs detectron2"):
        build_butd_r101_c4(config=BUTDConfig.tiny(), backend="detectron2")


@pytest.mark.parametrize("box_mode", ["proposal", "regressed"])
def test_native_and_detectron2_give_the_same_regions(tmp_path, box_mode):
    pytest.importorskip("detectron2")
    pytest.importorskip("detectron2.modeling")
    config = BUTDConfig.tiny()
    native = BUTDDetector(config, selection=fixed_k_rule(10), box_mode=box_mode).eval()
    randomise_butd_weights(native, seed=4)
    path = tmp_path / "weights.pkl"
    state = {k: v.numpy() for k, v in export_detectron2(native.model.state_dict()).items()}
    path.write_bytes(pickle.dumps({"model": state, "__author__": "test"}))
    d2 = build_butd_r101_c4(str(path), config=config, selection=fixed_k_rule(10), box_mode=box_mode,
                            backend="detectron2")
    assert d2.extractor_info()["backend"] == "detectron2"

    rng = np.random.default_rng(6)
    prepared = [native.prepare(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)),
                native.prepare(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8))]
    given = [torch.tensor([[3.0, 4, 50, 40], [10, 10, 70, 55]]), torch.tensor([[0.0, 0, 50, 70]])]
    for boxes in (None, given):
        for a, b in zip(native(pad_batch(prepared), prepared, boxes), d2(pad_batch(prepared), prepared, boxes),
                        strict=True):
            assert len(a.boxes) == len(b.boxes) > 0
            for field in ("features", "boxes", "cls_prob", "objects_id", "attrs_id", "attrs_conf"):
                assert torch.allclose(getattr(a, field).float(), getattr(b, field).float(), atol=1e-4), field
