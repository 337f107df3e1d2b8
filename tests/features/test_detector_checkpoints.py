"""Converters: a tiny BUTD written out in each published layout, read back, gives the same regions."""

import os
import pickle

import numpy as np
import pytest
import torch

from features.butd import BUTDConfig, BUTDDetector
from features.butd_builder import build_butd_r101_c4
from features.checksum import sha256_file
from features.detector import pad_batch
from features.detector_checkpoints import (
    anchor_permutation,
    detect_format,
    export_detectron2,
    load_butd_weights,
    read_weight_file,
)
from features.errors import WeightsError
from features.selection import fixed_k_rule
from tests.fixtures.tiny_butd import randomise_butd_weights

P = "roi_heads.box_predictor."
RPN = "proposal_generator.rpn_head."


@pytest.fixture
def native():
    """A tiny detector with every tensor random (BN statistics too), background box rows zero."""
    return randomise_butd_weights(
        BUTDDetector(BUTDConfig.tiny(), selection=fixed_k_rule(8), box_mode="regressed").eval(), seed=3
    )


def _detectron2_layout(state):
    """Written by hand from the documented layout: background last, no background box rows."""
    out = {k: v.clone() for k, v in state.items()}
    for key in ("cls_score.weight", "cls_score.bias", "cls_embedding.weight"):
        out[P + key] = torch.cat([state[P + key][1:], state[P + key][:1]])
    for key in ("bbox_pred.weight", "bbox_pred.bias"):
        out[P + key] = state[P + key][4:]
    return out


def _milvlg_layout(state, num_sizes=4, num_ratios=3):
    """Caffe conventions: 2-way RPN softmax, ratio-major anchors, (1,1,1,1) box deltas, own attribute names."""
    out = {}
    ratio_major = [s * num_ratios + r for r in range(num_ratios) for s in range(num_sizes)]
    for name, t in state.items():
        if name.startswith(RPN + "objectness_logits"):
            fg = t[ratio_major]
            bg = torch.randn_like(fg)
            t = torch.cat([bg, bg + fg])  # softmax pair whose difference is the native logit
        elif name.startswith(RPN + "anchor_deltas"):
            t = t.reshape(len(ratio_major), 4, *t.shape[1:])[ratio_major].reshape(t.shape)
        elif name.startswith(P + "bbox_pred"):
            t = t / torch.tensor([10.0, 10, 5, 5]).repeat(t.shape[0] // 4).view(-1, *([1] * (t.dim() - 1)))
        name = (name.replace(P + "cls_embedding", P + "cls_embed").replace(P + "fc_attr", P + "attr_linear1")
                .replace(P + "attr_score", P + "attr_linear2"))
        out[name] = t
    return out


def _run(det):
    rng = np.random.default_rng(5)
    prepared = [det.prepare(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(2)]
    boxes = [torch.tensor([[3.0, 4, 50, 40], [10, 10, 70, 55]]), torch.tensor([[0.0, 0, 80, 60]])]
    return det(pad_batch(prepared), prepared), det(pad_batch(prepared), prepared, boxes)


def _assert_same_regions(a, b):
    for run_a, run_b in zip(a, b, strict=True):
        for ra, rb in zip(run_a, run_b, strict=True):
            assert len(ra.boxes) > 0
            for field in ("features", "boxes", "cls_prob", "objects_id", "attrs_id", "attrs_conf"):
                x, y = getattr(ra, field), getattr(rb, field)
                assert torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-4), field


def _load(path, config):
    return build_butd_r101_c4(str(path), config=config, selection=fixed_k_rule(8), box_mode="regressed")


def test_detectron2_zoo_pickle_round_trip(native, tmp_path):
    state = {k: v.numpy() for k, v in _detectron2_layout(native.model.state_dict()).items()}
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    path.write_bytes(pickle.dumps({"model": state, "__author__": "test"}))
    loaded = _load(path, native.config)
    assert loaded.weights_info == {"file": path.name, "sha256": sha256_file(path), "format": "detectron2"}
    _assert_same_regions(_run(native), _run(loaded))


def test_hf_frcnn_state_dict_round_trip(native, tmp_path):
    state = {}
    for name, t in _detectron2_layout(native.model.state_dict()).items():
        if name.endswith("norm.weight"):
            name = name[: -len("weight")] + "gamma"
        elif name.endswith("norm.bias"):
            name = name[: -len("bias")] + "beta"
        state[name] = t
        if name.endswith("running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    state["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(12, 4)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    assert detect_format(read_weight_file(path)) == "hf-frcnn"
    _assert_same_regions(_run(native), _run(_load(path, native.config)))


@pytest.mark.parametrize("as_numpy", [False, True])
def test_milvlg_caffe_checkpoint_round_trip(native, tmp_path, as_numpy):
    state = _milvlg_layout(native.model.state_dict())
    if as_numpy:  # some .pth files hold numpy arrays, which torch's safe loader refuses by default
        state = {k: v.numpy() for k, v in state.items()}
    path = tmp_path / "bua-caffe-frcn-r101-k10-100.pth"
    torch.save({"model": state, "iteration": 7}, path)
    loaded = _load(path, native.config)
    assert loaded.weights_info["format"] == "milvlg-caffe"
    _assert_same_regions(_run(native), _run(loaded))


def test_export_detectron2_inverts_the_conversion(native, tmp_path):
    exported = export_detectron2(native.model.state_dict())
    hand = _detectron2_layout(native.model.state_dict())
    assert exported.keys() == hand.keys()
    assert all(torch.equal(exported[k], hand[k]) for k in hand)


def test_anchor_permutations_are_inverse():
    to_size = anchor_permutation(4, 3, to="size-major")
    to_ratio = anchor_permutation(4, 3, to="ratio-major")
    assert torch.equal(to_size[to_ratio], torch.arange(12))
    # ratio-major index r*4+s (Caffe) lands at size-major index s*3+r (detectron2)
    assert to_size[1 * 3 + 2].item() == 2 * 4 + 1


def test_weights_that_do_not_fit_name_file_and_tensors(native, tmp_path):
    state = _detectron2_layout(native.model.state_dict())
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "x"}))
    with pytest.raises(WeightsError, match=r"other\.pkl.*wrong shape.*cls_score"):
        _load(path, BUTDConfig.tiny(num_classes=9))
    del state[P + "cls_score.bias"]
    path.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "x"}))
    with pytest.raises(WeightsError, match=r"missing \(roi_heads.box_predictor.cls_score.bias"):
        _load(path, native.config)


def test_file_without_attribute_head_adapts_the_config(native, tmp_path):
    state = {k: v for k, v in _detectron2_layout(native.model.state_dict()).items()
             if not k.startswith((P + "cls_embedding", P + "fc_attr", P + "attr_score"))}
    path = tmp_path / "faster_rcnn_from_caffe.pkl"
    path.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "x"}))
    _, _, config = load_butd_weights(path, native.config, adapt_config=True)
    assert config.num_attributes == 0
    det = build_butd_r101_c4(str(path), config=config)
    regions = _run(det)[1][0]
    assert regions.attrs_id is None and regions.cls_prob.shape == (2, 7)


def test_malicious_weight_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": Evil(), "__author__": "x"}))
    with pytest.raises(WeightsError, match=r"evil\.pkl: refused"):
        read_weight_file(path)


def test_missing_and_garbage_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such weight file"):
        read_weight_file(tmp_path / "absent.pth")
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        read_weight_file(path)
