"""Inputs checked at the edge (issue 24, silently wrong): what a store cannot hold faithfully is refused in one line
or, for boxes outside the image, clipped with a warning, never stored wrong.
"""

from __future__ import annotations

import contextlib
import logging
import pickle

import lmdb
import numpy as np
import pytest
import torch

from features.errors import FeatureStoreError, WeightsError
from features.importing import import_features
from features.npy import ArrayFileError, load_array
from features.safe_pickle import safe_load
from features.store import FeatureStore, FeatureStoreWriter
from tasks.data.reference_files import read_image_ids
from tasks.errors import AnnotationError
from tests.fixtures.cli_check import assert_refused
from tests.fixtures.published_sources import make_rows, write_butd_tsv, write_lmdb, write_vilbert_lmdb
from tests.fixtures.tiny_task_data import write_store


def _import(tmp_path, rows, fmt="vilbert-lmdb", **kw):
    source = write_vilbert_lmdb(tmp_path / "src.lmdb", rows) if fmt == "vilbert-lmdb" else \
        write_butd_tsv(tmp_path / "src.tsv", rows)
    return source, import_features(source, fmt, tmp_path / "out.h5", progress=False, **kw)


def test_features_beyond_float16_are_refused_not_stored_as_inf(tmp_path):
    rows = make_rows(2)
    rows[1]["features"][0, 0] = 1e5
    with pytest.raises(FeatureStoreError, match=r"'2'.*exceed float16's range.*--float32"):
        _import(tmp_path, rows)
    _, summary = _import(tmp_path, rows, float32=True)  # float32 holds them
    assert summary.images_written == 2
    assert FeatureStore(tmp_path / "out.h5").read("2").features[0, 0] == 1e5


@pytest.mark.parametrize("height", [300.7, True, float("inf"), 10**12, -5])
def test_image_sizes_that_are_not_int32_integers_are_refused(tmp_path, height):
    rows = make_rows(1)
    rows[0]["h"] = height
    with pytest.raises(FeatureStoreError, match=r"image_h is .*(not an integer|outside)"):
        _import(tmp_path, rows)


def test_a_whole_number_float_size_is_taken_as_the_integer(tmp_path):
    rows = make_rows(1)
    rows[0]["h"] = 300.0
    _import(tmp_path, rows)
    assert FeatureStore(tmp_path / "out.h5").read("1").image_hw == (300, 400)


def test_label_ids_beyond_int32_are_refused_not_wrapped(tmp_path):
    with pytest.raises(FeatureStoreError, match="objects_id.*does not fit int32"), \
            FeatureStoreWriter(tmp_path / "s.h5", feature_dim=2) as writer:
        writer.add("1", (10, 10), np.zeros((1, 2)), np.array([[0, 0, 5, 5]]), objects_id=np.array([10**12]))


def test_non_numeric_feature_arrays_are_one_line(tmp_path):
    rows = make_rows(1)
    rows[0]["features"] = np.array([["a", "b"]] * 5, dtype=object)
    with pytest.raises(FeatureStoreError, match="features holds object values, not numbers"):
        _import(tmp_path, rows)


def test_boxes_outside_the_image_or_inverted_are_clipped_with_a_warning(tmp_path, caplog):
    rows = make_rows(1, k=2)
    rows[0]["boxes"] = np.array([[-20, 10, 900, 50], [60, 60, 40, 40]], np.float32)  # outside; inverted
    with caplog.at_level(logging.WARNING):
        _import(tmp_path, rows)
    assert "1 box(es) reached outside the 400x300 image and were clipped; 1 have no area" in caplog.text
    boxes = FeatureStore(tmp_path / "out.h5").read("1").boxes
    assert boxes[0].tolist() == [0, 10, 400, 50]


def test_export_refuses_ids_its_format_cannot_hold(tmp_path):
    store = write_store(tmp_path / "feats.h5", ["1", "keys"])
    line = assert_refused(["features", "export", "--to", "vilbert-lmdb", str(store), "--out", str(tmp_path / "o")],
                          names=["'keys'", "reserved"], watch=[tmp_path])
    assert "nothing was written" in line
    store = write_store(tmp_path / "tabs.h5", ["1", "a\tb"])
    assert_refused(["features", "export", "--to", "butd-tsv", str(store), "--out", str(tmp_path / "o.tsv")],
                   names=["'a\\tb'", "tab"], watch=[tmp_path])


# ------------------------------------------------------------------------------------------------ bounded reading


def test_an_npy_header_claiming_more_than_the_file_holds_is_refused_before_allocating(tmp_path):
    path = tmp_path / "big.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 2048)})
        f.write(b"\0" * 64)
    with pytest.raises(ArrayFileError, match="declares a \\[1000000000, 2048\\] float32 array"):
        load_array(path)
    with pytest.raises(AnnotationError, match="declares"):
        read_image_ids(path)
    np.save(path, np.arange(6, dtype=np.int64).reshape(2, 3))
    assert load_array(path).tolist() == [[0, 1, 2], [3, 4, 5]]


GIB3 = b"\x8a\x05" + (3 << 30).to_bytes(5, "little")  # LONG1: the integer 3 GiB


@pytest.mark.parametrize("payload", [
    b"c__builtin__\nbytearray\n(" + GIB3 + b"tR.",  # bytearray(3 GiB)
    b"cnumpy\nndarray\n((" + GIB3 + b"tcnumpy\ndtype\n(Vf8\ntRtR.",  # ndarray((3 Gi,), float64)
    b"ctorch\nFloatStorage\n(" + GIB3 + b"tR.",  # a 12 GiB float storage
], ids=["bytearray", "ndarray", "storage"])
def test_a_tiny_pickle_cannot_allocate_gigabytes(tmp_path, payload):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(payload)
    with pytest.raises(WeightsError, match="bytes in a pickle of"):
        safe_load(path)


@pytest.mark.parametrize("where", ["row", "keys"])
def test_a_pickle_bomb_in_an_lmdb_row_or_its_key_list_is_one_line(tmp_path, where):
    """The bound holds where published features are read: an LMDB's rows and its pickled `keys` list."""
    bomb = b"\x80\x02c__builtin__\nbytearray\n(" + GIB3 + b"tR."
    rows = make_rows(2, k=3, dim=8)
    entries = [(r["id"], {"image_id": r["id"], "image_h": r["h"], "image_w": r["w"], "num_boxes": len(r["boxes"]),
                          "boxes": r["boxes"], "features": r["features"]}) for r in rows]
    source = write_lmdb(tmp_path / "src.lmdb", entries if where == "keys" else [*entries, ("bomb", bomb)])
    if where == "keys":
        with contextlib.closing(lmdb.open(str(source), subdir=True)) as env, env.begin(write=True) as txn:
            txn.put(b"keys", bomb)
    line = assert_refused(["features", "import", "--from", "vilbert-lmdb", str(source), "--out",
                           str(tmp_path / "out.h5"), "--no-progress"], names=[str(source)], watch=[tmp_path])
    assert "bytes in a pickle of" in line


def test_bounded_pickles_still_load_real_data(tmp_path):
    value = {"bbox": np.arange(400, dtype=np.float32).reshape(100, 4), "raw": bytearray(b"abc" * 100),
             "t": torch.arange(10.0)}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(value, protocol=2))
    loaded = safe_load(path)
    assert np.array_equal(loaded["bbox"], value["bbox"]) and loaded["raw"] == value["raw"]
    assert torch.equal(loaded["t"], value["t"])


