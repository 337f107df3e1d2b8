"""The HDF5 feature store: round trips, validation of bad files, fork-safe reads, joins, merges, resumable writes."""

import json
import pickle

import h5py
import numpy as np
import pytest
import torch

from features.errors import FeatureStoreError
from features.store import (
    FeatureStore,
    FeatureStoreWriter,
    ResumableStoreWriter,
    merge_stores,
)

D, C = 8, 5


def _image(rng, image_id, k, labels=True, cls_prob=True):
    regions = {
        "image_id": image_id,
        "image_hw": (int(rng.integers(20, 90)), int(rng.integers(20, 90))),
        "features": rng.standard_normal((k, D)).astype(np.float32),
        "boxes": rng.uniform(0, 20, (k, 4)).astype(np.float32),
    }
    if cls_prob:
        regions["cls_prob"] = rng.dirichlet(np.ones(C), k).astype(np.float32)
    if labels:
        regions.update(
            objects_id=rng.integers(1, C, k), objects_conf=rng.uniform(0, 1, k).astype(np.float32),
            attrs_id=rng.integers(0, 7, k), attrs_conf=rng.uniform(0, 1, k).astype(np.float32),
        )
    return regions


def _write(path, images, **options):
    options.setdefault("cls_prob_dim", C if "cls_prob" in images[0] else None)
    with FeatureStoreWriter(path, feature_dim=D, extractor={"detector": "test", "k": 3}, **options) as writer:
        for im in images:
            writer.add(**im)
    return path


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [_image(rng, f"img{i}", k) for i, k in enumerate([3, 0, 5, 1, 36])]


def test_round_trip_keeps_every_dataset(tmp_path, images):
    path = _write(tmp_path / "f.h5", images, flush_rows=4)  # several flushes
    store = FeatureStore(path)
    assert store.ids == [im["image_id"] for im in images] and len(store) == 5
    assert "img2" in store and "nope" not in store
    assert store.feature_dim == D and store.extractor == {"detector": "test", "k": 3}
    for im in images:
        regions = store.read(im["image_id"])
        assert regions.image_hw == im["image_hw"] and len(regions) == len(im["boxes"])
        assert regions.features.dtype == np.float32
        np.testing.assert_allclose(regions.features, im["features"], atol=2e-3, rtol=1e-3)  # float16 storage
        np.testing.assert_array_equal(regions.boxes, im["boxes"])
        np.testing.assert_allclose(regions.cls_prob, im["cls_prob"], atol=1e-3)
        np.testing.assert_array_equal(regions.objects_id, im["objects_id"])
        np.testing.assert_array_equal(regions.attrs_id, im["attrs_id"])
        np.testing.assert_array_equal(regions.objects_conf, im["objects_conf"])
        np.testing.assert_array_equal(regions.attrs_conf, im["attrs_conf"])
    with h5py.File(path) as f:
        assert f["features"].dtype == np.float16 and f["features"].compression is None and f["features"].chunks
        assert list(f["offsets"][:]) == [0, 3, 3, 8, 9, 45]
        assert f.attrs["schema"] == "vilbert-features" and f.attrs["version"] == 1 and f.attrs["feature_dim"] == D
        assert json.loads(f.attrs["extractor"]) == {"detector": "test", "k": 3}
        assert f["image_hw"].dtype == np.int32 and f["offsets"].dtype == np.int64


def test_float32_on_request_is_exact(tmp_path, images):
    store = FeatureStore(_write(tmp_path / "f.h5", images, float32=True))
    np.testing.assert_array_equal(store.read("img4").features, images[4]["features"])


def test_store_without_optional_datasets_reads_none(tmp_path):
    rng = np.random.default_rng(1)
    store = FeatureStore(_write(tmp_path / "f.h5", [_image(rng, "a", 2, labels=False, cls_prob=False)]))
    regions = store.read("a")
    assert regions.cls_prob is None and regions.objects_id is None and regions.attrs_conf is None


def test_failed_write_leaves_no_file(tmp_path, images):
    path = tmp_path / "f.h5"
    with pytest.raises(RuntimeError):
        with FeatureStoreWriter(path, feature_dim=D) as writer:
            writer.add("a", (4, 4), np.zeros((1, D)), np.zeros((1, 4)))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_duplicate_ids_and_wrong_shapes(tmp_path):
    with FeatureStoreWriter(tmp_path / "f.h5", feature_dim=D) as writer:
        writer.add("a", (4, 4), np.zeros((1, D)), np.zeros((1, 4)))
        with pytest.raises(FeatureStoreError, match="'a' is written twice"):
            writer.add("a", (4, 4), np.zeros((1, D)), np.zeros((1, 4)))
        with pytest.raises(FeatureStoreError, match=r"expected features \[K, 8\]"):
            writer.add("b", (4, 4), np.zeros((2, D + 1)), np.zeros((2, 4)))


def test_missing_id_names_the_id_and_file(tmp_path, images):
    path = _write(tmp_path / "f.h5", images)
    with pytest.raises(FeatureStoreError, match=r"f\.h5: no image with id 'missing'"):
        FeatureStore(path).read("missing")


# -------------------------------------------------------------------------------------------------- bad files


def test_non_hdf5_file_is_one_clear_error(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("hello, not HDF5")
    with pytest.raises(FeatureStoreError, match="notes.h5: not a readable HDF5"):
        FeatureStore(path)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(FeatureStoreError, match="nothing.h5: feature file not found"):
        FeatureStore(tmp_path / "nothing.h5")


def test_foreign_hdf5_is_refused(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["image_features"] = np.zeros((2, 36, 4))
    with pytest.raises(FeatureStoreError, match="foreign.h5: not a vilbert feature file"):
        FeatureStore(path)


def test_truncated_file_is_one_clear_error(tmp_path, images):
    path = _write(tmp_path / "f.h5", images)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(FeatureStoreError, match="f.h5"):
        FeatureStore(path).read("img4")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.attrs.__setitem__("version", 2), "unsupported feature file version 2"),
        (lambda f: f.__delitem__("boxes"), "missing dataset"),
        (lambda f: f["offsets"].__setitem__(2, 1), "offsets must rise from 0 to 45"),
        (lambda f: f["offsets"].__setitem__(5, 44), "offsets must rise from 0 to 45"),
        (lambda f: f["image_hw"].resize(3, axis=0), "image_hw has shape"),
        (lambda f: f.attrs.__setitem__("feature_dim", 9), "feature_dim is 9 but features are 8 wide"),
        (lambda f: f["objects_id"].resize(40, axis=0), "objects_id has shape"),
    ],
)
def test_inconsistent_file_is_refused_with_the_problem(tmp_path, images, damage, message):
    path = _write(tmp_path / "f.h5", images)
    with h5py.File(path, "a") as f:
        damage(f)
    with pytest.raises(FeatureStoreError, match=message):
        FeatureStore(path)


# ----------------------------------------------------------------------------------------- processes and joins


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        return torch.from_numpy(self.store.read(self.store.ids[i]).features)


def test_dataloader_workers_read_the_same_as_direct_reads(tmp_path):
    rng = np.random.default_rng(2)
    images = [_image(rng, f"i{i}", int(rng.integers(1, 12))) for i in range(40)]
    store = FeatureStore(_write(tmp_path / "f.h5", images))
    direct = [store.read(i).features for i in store.ids]  # the parent has an open handle before the fork
    loader = torch.utils.data.DataLoader(
        _StoreDataset(store), batch_size=None, num_workers=2, multiprocessing_context="fork", shuffle=False
    )
    loaded = [x.numpy() for x in loader]
    assert len(loaded) == 40
    for a, b in zip(direct, loaded, strict=True):
        np.testing.assert_array_equal(a, b)
    assert store.read("i3").features.shape == direct[3].shape  # the parent still reads after the fork


def test_pickled_store_carries_no_handle_and_reads(tmp_path, images):
    store = FeatureStore(_write(tmp_path / "f.h5", images))
    store.read("img0")
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read("img2").features, store.read("img2").features)


def test_join_concatenates_regions_in_file_order(tmp_path):
    rng = np.random.default_rng(3)
    det = [_image(rng, "a", 3), _image(rng, "b", 2)]
    gt = [_image(rng, "b", 1), _image(rng, "c", 4)]
    gt[0]["image_hw"] = det[1]["image_hw"]
    store = FeatureStore([_write(tmp_path / "det.h5", det), _write(tmp_path / "gt.h5", gt)])
    assert store.ids == ["a", "b", "c"] and store.num_boxes("b") == 3
    joined = store.read("b")
    np.testing.assert_array_equal(joined.boxes, np.concatenate([det[1]["boxes"], gt[0]["boxes"]]))
    np.testing.assert_array_equal(joined.objects_id, np.concatenate([det[1]["objects_id"], gt[0]["objects_id"]]))
    assert len(store.read("c")) == 4


def test_join_refuses_different_feature_widths(tmp_path):
    _write(tmp_path / "a.h5", [_image(np.random.default_rng(0), "a", 1)])
    with FeatureStoreWriter(tmp_path / "b.h5", feature_dim=D + 1) as writer:
        writer.add("a", (4, 4), np.zeros((1, D + 1)), np.zeros((1, 4)))
    with pytest.raises(FeatureStoreError, match="cannot join .*a.h5 .*8 wide.* with .*b.h5 .*9 wide"):
        FeatureStore([tmp_path / "a.h5", tmp_path / "b.h5"])


def test_join_with_different_sizes_for_one_image_is_an_error(tmp_path):
    rng = np.random.default_rng(4)
    a, b = _image(rng, "x", 1), _image(rng, "x", 1)
    b["image_hw"] = (a["image_hw"][0] + 1, a["image_hw"][1])
    store = FeatureStore([_write(tmp_path / "a.h5", [a]), _write(tmp_path / "b.h5", [b])])
    with pytest.raises(FeatureStoreError, match="b.h5: image 'x' is"):
        store.read("x")


def test_summary_counts_boxes_and_lists_datasets(tmp_path, images):
    summary = FeatureStore(_write(tmp_path / "f.h5", images)).summary()
    assert summary["images"] == 5 and summary["boxes"] == 45
    assert summary["boxes_per_image"] == {"min": 0, "mean": 9.0, "max": 36}
    assert summary["optional"] == {"cls_prob": C, "objects_id": 0, "objects_conf": 0, "attrs_id": 0, "attrs_conf": 0}
    assert summary["files"][0]["features_dtype"] == "float16"


def test_merge_concatenates_shards_and_refuses_repeated_ids(tmp_path, images):
    a = _write(tmp_path / "a.h5", images[:2])
    b = _write(tmp_path / "b.h5", images[2:])
    merged = FeatureStore(merge_stores([a, b], tmp_path / "m.h5"))
    assert merged.ids == [im["image_id"] for im in images]
    for im in images:
        np.testing.assert_array_equal(merged.read(im["image_id"]).boxes, im["boxes"])
        np.testing.assert_array_equal(merged.read(im["image_id"]).attrs_id, im["attrs_id"])
    with pytest.raises(FeatureStoreError, match="'img0' is in both"):
        merge_stores([a, a], tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


def test_resumable_writer_continues_from_sealed_parts(tmp_path, images):
    out = tmp_path / "out.h5"
    options = {"feature_dim": D, "cls_prob_dim": C, "extractor": {"detector": "test"}, "part_images": 2}
    first = ResumableStoreWriter(out, **options)
    for im in images[:3]:
        first.add(**im)
        first.checkpoint()
    first.abort()  # as if killed: img0, img1 sealed in a part; img2 was in the open part
    assert not out.exists()
    second = ResumableStoreWriter(out, **options)
    assert second.done_ids == {"img0", "img1"}
    for im in images:
        if im["image_id"] not in second.done_ids:
            second.add(**im)
            second.checkpoint()
    second.finish()
    store = FeatureStore(out)
    assert sorted(store.ids) == sorted(im["image_id"] for im in images)
    assert not (tmp_path / "out.h5.partial").exists()
    with pytest.raises(FeatureStoreError, match="another extractor"):
        ResumableStoreWriter(out, **{**options, "extractor": {"detector": "other"}})
