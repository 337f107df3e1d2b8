"""Caption files in TSV, JSON lines and the reference's JSON dict form, and their join with a feature store."""

import json
import logging

import pytest

from features.store import FeatureStore
from tasks.data.captions import Caption, join_with_store, load_captions
from tasks.errors import AnnotationError, DataError
from tests.fixtures.tiny_pretrain_data import make_images, write_store


def test_tsv_with_header_and_several_captions_per_image(tmp_path):
    path = tmp_path / "caps.tsv"
    path.write_text("image_id\tcaption\n1\ta red ball\n1\ta ball, red\t(with a tab)\n\n2\ttwo dogs\n")
    assert load_captions(path) == [Caption("1", "a red ball"), Caption("1", "a ball, red\t(with a tab)"),
                                   Caption("2", "two dogs")]


def test_json_lines_with_caption_or_captions_list(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image_id": 7, "caption": "a cat"}\n{"image_id": "8", "captions": ["x", "y"]}\n')
    assert load_captions(path) == [Caption("7", "a cat"), Caption("8", "x"), Caption("8", "y")]


def test_reference_caption_json_dict_form(tmp_path):
    path = tmp_path / "caption_train.json"
    path.write_text(json.dumps({"3017": "a man on a bike", "42": ["one", "two"]}))
    assert load_captions(path) == [Caption("3017", "a man on a bike"), Caption("42", "one"), Caption("42", "two")]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.tsv", "1\tok\nno tab here\n", r"bad.tsv: line 2"),
        ("bad.jsonl", '{"image_id": 1, "caption": "ok"}\n{broken\n', r"bad.jsonl: line 2: not valid JSON"),
        ("bad.json", '{"5": ""}', r"bad.json: entry '5': caption of image '5' is empty"),
        ("bad.jsonl", '{"caption": "no id"}\n', r"bad.jsonl: line 1: expected an object with image_id"),
        ("empty.tsv", "\n", r"empty.tsv: no captions"),
        ("caps.csv", "1,a", r"unknown caption file type"),
    ],
)
def test_malformed_caption_files_name_file_and_entry(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(AnnotationError, match=message):
        load_captions(tmp_path / name)


def test_missing_images_are_counted_logged_once_and_dropped(tmp_path, caplog):
    store = FeatureStore(write_store(tmp_path / "f.h5", make_images(3)))
    present = store.ids
    captions = [Caption(present[0], "a"), Caption("gone1", "b"), Caption(present[1], "c"), Caption("gone2", "d"),
                Caption("gone1", "e")]
    with caplog.at_level(logging.WARNING):
        kept = join_with_store(captions, store, "caps.json")
    assert kept == [captions[0], captions[2]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3 of 5 captions refer to 2 images" in warnings[0] and "'gone1', 'gone2'" in warnings[0]


def test_strict_join_fails_before_training_naming_the_file(tmp_path):
    store = FeatureStore(write_store(tmp_path / "f.h5", make_images(2)))
    with pytest.raises(DataError, match=r"caps.json: 1 of 2 captions .* 'missing'"):
        join_with_store([Caption(store.ids[0], "a"), Caption("missing", "b")], store, "caps.json", strict=True)
    with pytest.raises(DataError, match="no caption refers"):
        join_with_store([Caption("missing", "b")], store, "caps.json")
