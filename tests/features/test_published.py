"""Importing and exporting the published feature formats: values kept, round trips exact, bad input refused."""

import json
import os
import pickle
import re

import numpy as np
import pytest

from features.errors import FeatureStoreError
from features.importing import import_features
from features.published import FORMAT_DETECTORS, READERS, ButdTsvReader, store_id
from features.store import FeatureStore
from tasks.cli import main
from tests.fixtures.published_sources import (
    CARRIES,
    WRITERS,
    b64,
    butd_line,
    make_rows,
    write_butd_tsv,
    write_lmdb,
)


def _source(tmp_path, format, rows):
    writer, name = WRITERS[format]
    return writer(tmp_path / name, rows)


@pytest.mark.parametrize("format", sorted(READERS))
def test_import_keeps_every_field(tmp_path, format):
    rows = make_rows(3)
    source = _source(tmp_path, format, rows)
    summary = import_features(source, format, tmp_path / "f.h5", float32=True, progress=False)
    assert summary.images_written == 3 and summary.images_bad == 0
    store = FeatureStore(tmp_path / "f.h5")
    assert sorted(store.ids) == ["1", "2", "3"]
    assert store.extractor == {"name": "imported", "format": format, "detector": FORMAT_DETECTORS[format],
                               "source": source.name, "ids_from": "image"}
    assert set(store.optional) == set(CARRIES[format])
    for r in rows:
        regions = store.read(r["id"])
        assert regions.image_hw == (r["h"], r["w"])
        assert np.array_equal(regions.features, r["features"]) and np.array_equal(regions.boxes, r["boxes"])
        for name in CARRIES[format]:
            expected = r[name]
            if name == "cls_prob":  # stored as float16
                np.testing.assert_allclose(getattr(regions, name), expected, atol=1e-3)
            elif name.endswith("_id"):  # 0-based in the sources, cls_prob columns (background 0) in the store
                assert np.array_equal(getattr(regions, name), expected + 1)
            else:
                assert np.array_equal(getattr(regions, name), expected)


@pytest.mark.parametrize("to, back", [("vilbert-lmdb", "vilbert-lmdb"), ("butd-tsv", "butd-tsv")])
def test_import_export_import_is_byte_identical(tmp_path, to, back):
    rows = make_rows(4, k=7, dim=16)
    source = _source(tmp_path, "lxmert-tsv", rows)
    import_features(source, "lxmert-tsv", tmp_path / "a.h5", float32=True, progress=False)
    assert main(["features", "export", "--to", to, str(tmp_path / "a.h5"), "--out", str(tmp_path / "out")]) == 0
    import_features(tmp_path / "out", back, tmp_path / "b.h5", float32=True, progress=False)
    a, b = FeatureStore(tmp_path / "a.h5"), FeatureStore(tmp_path / "b.h5")
    assert a.ids == b.ids
    for image_id in a.ids:
        ra, rb = a.read(image_id), b.read(image_id)
        assert ra.features.tobytes() == rb.features.tobytes() and ra.boxes.tobytes() == rb.boxes.tobytes()
        assert ra.image_hw == rb.image_hw


def test_ids_from_stem_and_int():
    assert store_id("COCO_train2014_000000000009", "int") == "9"
    assert store_id("images/COCO_val2014_000000000042.jpg", "stem") == "COCO_val2014_000000000042"
    assert store_id("9", "int") == "9"
    with pytest.raises(ValueError, match="does not end in an integer"):
        store_id("abc", "int")


def test_cli_import_ids_from_int_and_limit(tmp_path, capsys):
    rows = make_rows(3, prefix="COCO_val2014_00000000004")
    source = _source(tmp_path, "lxmert-tsv", rows)
    out = tmp_path / "f.h5"
    code = main(["features", "import", "--from", "lxmert-tsv", str(source), "--out", str(out), "--ids-from", "int",
                 "--limit", "2", "--no-progress"])
    assert code == 0
    assert FeatureStore(out).ids == ["41", "42"]
    assert "2 images imported from lxmert-tsv" in capsys.readouterr().out


def test_resumes_after_an_interruption(tmp_path, monkeypatch):
    rows = make_rows(5)
    source = write_butd_tsv(tmp_path / "s.tsv", rows)
    decode = ButdTsvReader.decode
    calls = {"n": 0}

    def dying_decode(self, source_id, raw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # stands in for a kill after three rows were sealed
        return decode(self, source_id, raw)

    monkeypatch.setattr(ButdTsvReader, "decode", dying_decode)
    with pytest.raises(KeyboardInterrupt):
        import_features(source, "butd-tsv", tmp_path / "f.h5", part_images=1, progress=False)
    assert not (tmp_path / "f.h5").exists()
    monkeypatch.setattr(ButdTsvReader, "decode", decode)
    summary = import_features(source, "butd-tsv", tmp_path / "f.h5", part_images=1, progress=False)
    assert (summary.images_resumed, summary.images_written) == (3, 2)
    assert sorted(FeatureStore(tmp_path / "f.h5").ids) == ["1", "2", "3", "4", "5"]
    assert not (tmp_path / "f.h5.partial").exists()


def test_an_image_without_regions_is_kept(tmp_path):
    rows = make_rows(2)
    empty = {**rows[0], "id": "0", "boxes": np.zeros((0, 4), np.float32), "features": np.zeros((0, 8), np.float32)}
    source = write_butd_tsv(tmp_path / "s.tsv", [empty, *rows])
    summary = import_features(source, "butd-tsv", tmp_path / "f.h5", progress=False)
    assert summary.images_written == 3
    store = FeatureStore(tmp_path / "f.h5")
    assert store.ids == ["0", "1", "2"] and store.read("0").features.shape == (0, 8)


# --------------------------------------------------------------------------------------------------------- bad input


def _bad_tsv(tmp_path, bad_line: str):
    rows = make_rows(3)
    lines = [butd_line(rows[0]), bad_line, butd_line(rows[2])]
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


BAD_TSV_LINES = {
    "wrong count": lambda r: "\t".join(["2", "400", "300", "6", b64(r["boxes"]), b64(r["features"])]),
    "not base64": lambda r: "\t".join(["2", "400", "300", "5", b64(r["boxes"]), "@@@" + b64(r["features"])]),
    "boxes not [K, 4]": lambda r: "\t".join(["2", "400", "300", "5", b64(r["boxes"][:, :3]), b64(r["features"])]),
    "nan": lambda r: "\t".join(["2", "400", "300", "5", b64(r["boxes"]), b64(np.full((5, 8), np.nan, np.float32))]),
    "inf box": lambda r: "\t".join(["2", "400", "300", "5", b64(np.full((5, 4), np.inf, np.float32)),
                                     b64(r["features"])]),
    "truncated": lambda r: "\t".join(["2", "400", "300", "5", b64(r["boxes"])]),
    "duplicate": lambda r: butd_line({**r, "id": "1"}),
}
EXPECTED = {
    "wrong count": "boxes has shape", "not base64": "features is not valid base64",
    "boxes not [K, 4]": "boxes: 15 values do not form rows of 4", "nan": "NaN or infinite", "inf box": "NaN or infinite",
    "truncated": "has 5 fields, expected 6", "duplicate": "duplicate id '1'",
}


@pytest.mark.parametrize("case", sorted(BAD_TSV_LINES))
def test_bad_row_is_one_line_naming_source_id_and_problem(tmp_path, case, capsys):
    row = make_rows(2)[1]
    source = _bad_tsv(tmp_path, BAD_TSV_LINES[case](row))
    out = tmp_path / "f.h5"
    code = main(["features", "import", "--from", "butd-tsv", str(source), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    bad_id = "'1'" if case == "duplicate" else "'2'"
    assert str(source) in err and (f"image {bad_id}" in err or "line 2" in err)
    assert re.search(EXPECTED[case], err), err
    assert not out.exists()


def test_decoding_workers_write_the_same_store_and_the_same_errors(tmp_path):
    rows = make_rows(9)
    source = _bad_tsv(tmp_path, BAD_TSV_LINES["nan"](rows[1]))
    with open(source, "a", encoding="ascii") as f:  # more rows than the 4 per worker in flight
        f.writelines(butd_line({**r, "id": str(10 + i)}) + "\n" for i, r in enumerate(rows[3:]))
    one = import_features(source, "butd-tsv", tmp_path / "one.h5", skip_bad=True, progress=False, float32=True)
    two = import_features(source, "butd-tsv", tmp_path / "two.h5", skip_bad=True, progress=False, float32=True,
                          workers=2)
    assert (two.images_written, two.images_bad) == (one.images_written, one.images_bad) == (8, 1)
    a, b = FeatureStore(tmp_path / "one.h5"), FeatureStore(tmp_path / "two.h5")
    assert a.ids == b.ids == ["1", "3", *(str(10 + i) for i in range(6))]  # source order kept
    for image_id in a.ids:
        assert a.read(image_id).features.tobytes() == b.read(image_id).features.tobytes()
    assert (tmp_path / "one.h5.errors.jsonl").read_text() == (tmp_path / "two.h5.errors.jsonl").read_text()
    with pytest.raises(FeatureStoreError, match="NaN or infinite"):
        import_features(source, "butd-tsv", tmp_path / "three.h5", progress=False, workers=2)


def test_skip_bad_records_errors_and_goes_on(tmp_path):
    row = make_rows(2)[1]
    source = _bad_tsv(tmp_path, BAD_TSV_LINES["nan"](row))
    summary = import_features(source, "butd-tsv", tmp_path / "f.h5", skip_bad=True, progress=False)
    assert (summary.images_written, summary.images_bad) == (2, 1)
    assert FeatureStore(tmp_path / "f.h5").ids == ["1", "3"]
    records = [json.loads(line) for line in open(tmp_path / "f.h5.errors.jsonl")]
    assert [r["source_id"] for r in records] == ["2"] and "NaN" in records[0]["problem"]


def test_unknown_format(tmp_path):
    with pytest.raises(FeatureStoreError, match="unknown feature format 'hdf5'; known: vilbert-lmdb"):
        import_features(tmp_path, "hdf5", tmp_path / "f.h5", progress=False)


def test_truncated_lmdb_is_refused(tmp_path):
    source = WRITERS["vilbert-lmdb"][0](tmp_path / "s.lmdb", make_rows(40, dim=512))
    data = source / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(FeatureStoreError, match="truncated LMDB"):
        import_features(source, "vilbert-lmdb", tmp_path / "f.h5", progress=False)
    assert not (tmp_path / "f.h5").exists()


def test_lmdb_key_without_entry_and_wrong_box_shape(tmp_path):
    rows = make_rows(2)
    value = {"image_id": "1", "image_h": 3, "image_w": 4, "num_boxes": 5, "boxes": rows[0]["boxes"][:, :2],
             "features": rows[0]["features"]}
    good = {"image_id": "3", "image_h": 3, "image_w": 4, "boxes": rows[1]["boxes"], "features": rows[1]["features"]}
    source = write_lmdb(tmp_path / "s.lmdb", [("1", value), ("3", good)], keys=["1", "2", "3"])
    summary = import_features(source, "vilbert-lmdb", tmp_path / "f.h5", skip_bad=True, progress=False)
    assert (summary.images_bad, summary.images_written) == (2, 1)
    problems = [json.loads(line)["problem"] for line in open(tmp_path / "f.h5.errors.jsonl")]
    assert "boxes has shape [5, 2], expected [K, 4]" in problems[0]
    assert "listed in 'keys' but has no entry" in problems[1]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_unsafe_pickle_is_refused_with_the_global_name(tmp_path):
    source = write_lmdb(tmp_path / "s.lmdb", [("1", pickle.dumps({"image_h": _Evil()}))])
    with pytest.raises(FeatureStoreError, match=r"image '1': refused to unpickle global (posix|nt)\.system"):
        import_features(source, "vilbert-lmdb", tmp_path / "f.h5", progress=False)


def test_mmf_info_must_be_a_pickled_dict(tmp_path):
    rows = make_rows(1)
    source = WRITERS["mmf-npy"][0](tmp_path / "mmf", rows)
    np.save(source / "1_info.npy", np.zeros(3))
    with pytest.raises(FeatureStoreError, match="1_info.npy holds float64 data, expected a pickled info dict"):
        import_features(source, "mmf-npy", tmp_path / "f.h5", progress=False)
