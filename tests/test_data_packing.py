"""Tokenizing samples with the model's tokenizer and packing them into EOS-separated rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dllmd.data import (
    DataError,
    Sample,
    TokenizedSample,
    eos_id,
    load_data_tokenizer,
    pack,
    pack_shards,
    tokenize_samples,
)
from tests.tiny_models import make_tiny_model, make_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def main():\n    return 42\n", "Paris.",
         "Numbers like 0 1 2 3 and symbols + - * / appear in text, over and over and over again."]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def tokenized(*lengths, first=1):
    """Samples s0, s1 ... whose ids count up from ``first``, so every token is distinct and nonzero."""
    samples, next_id = [], first
    for i, length in enumerate(lengths):
        samples.append(TokenizedSample(f"s{i}", np.arange(next_id, next_id + length, dtype=np.int32)))
        next_id += length
    return samples


def test_tokenizing_keeps_order_and_ids_and_adds_no_special_tokens(tokenizer):
    samples = [Sample(f"t{i}", text) for i, text in enumerate(TEXTS)]
    result = tokenize_samples(tokenizer, samples)
    assert [s.id for s in result] == ["t0", "t1", "t2", "t3"]
    for sample, text in zip(result, TEXTS):
        assert sample.ids.dtype == np.int32
        assert sample.ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(sample.ids.tolist()) == text
        assert tokenizer.eos_token_id not in sample.ids.tolist()


def test_packing_puts_eos_after_each_sample_and_pads_the_last_row():
    packed = pack(tokenized(3, 2, 7), seq_len=4, eos_id=0)
    assert packed.tokens.dtype == torch.int32
    assert packed.tokens.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10], [11, 12, 0, 0]]
    assert [(s.sample_id, s.start, s.length) for s in packed.spans] == [("s0", 0, 3), ("s1", 4, 2), ("s2", 7, 7)]
    assert (packed.rows, packed.valid_tokens, packed.padding) == (4, 15, 1)


def test_a_stream_that_fills_its_rows_exactly_has_no_padding():
    packed = pack(tokenized(2, 3), seq_len=7, eos_id=0)
    assert (packed.rows, packed.padding) == (1, 0)
    assert pack([], seq_len=8, eos_id=0).tokens.shape == (0, 8)


def test_unpacking_the_flat_stream_gives_back_every_sample(tokenizer):
    samples = tokenize_samples(tokenizer, [Sample(f"t{i}", text) for i, text in enumerate(TEXTS * 3)])
    eos = eos_id(tokenizer)
    packed = pack(samples, seq_len=16, eos_id=eos)
    flat = packed.tokens.reshape(-1).tolist()
    assert packed.rows == -(-sum(s.packed_tokens for s in samples) // 16)
    for sample, span in zip(samples, packed.spans):
        assert span.sample_id == sample.id
        assert flat[span.start:span.start + span.length] == sample.ids.tolist()
        assert flat[span.start + span.length] == eos
    assert all(token == eos for token in flat[packed.valid_tokens:])


def test_packing_is_deterministic(tokenizer):
    samples = tokenize_samples(tokenizer, [Sample(f"t{i}", text) for i, text in enumerate(TEXTS)])
    assert torch.equal(pack(samples, 8, 2).tokens, pack(samples, 8, 2).tokens)


def test_pack_shards_packs_each_nodes_samples_in_order():
    samples = tokenized(3, 2, 7, 1)
    shards = pack_shards(samples, {"a": [0, 2], "b": [1, 3], "c": []}, seq_len=4, eos_id=0)
    assert [s.sample_id for s in shards["a"].spans] == ["s0", "s2"]
    assert shards["b"].tokens.tolist() == [[4, 5, 0, 13], [0, 0, 0, 0]]
    assert shards["c"].rows == 0


def test_the_sequence_length_must_be_positive():
    with pytest.raises(DataError, match="at least 1 token"):
        pack(tokenized(3), seq_len=0, eos_id=0)


def test_the_tokenizer_comes_from_the_model_directory(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "model")
    assert eos_id(load_data_tokenizer(model_dir)) == make_tokenizer().eos_token_id

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    with pytest.raises(DataError, match="import the model together with its tokenizer files"):
        load_data_tokenizer(model_dir)


def test_a_tokenizer_without_eos_cannot_pack():
    tokenizer = make_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        eos_id(tokenizer)
