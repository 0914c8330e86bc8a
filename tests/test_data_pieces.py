"""Long samples cut into pieces of one sequence before they are placed: ids ``path#k`` in order, the
pieces together give the sample back, and a packed piece fits one row."""

from __future__ import annotations

import numpy as np
import pytest

from dllmd.data import DataError, TokenizedSample, pack
from dllmd.data.pieces import piece_digest, split_samples


def sample(sample_id: str, length: int, first: int = 1) -> TokenizedSample:
    return TokenizedSample(sample_id, np.arange(first, first + length, dtype=np.int32))


def test_a_long_file_is_cut_into_path_k_pieces_in_order():
    long = sample("src/big.py", 25)
    pieces = split_samples([sample("a.py", 3), long, sample("z.py", 7, first=100)], seq_len=8)

    assert [p.id for p in pieces.samples] == ["a.py", "src/big.py#0", "src/big.py#1", "src/big.py#2",
                                              "src/big.py#3", "z.py"]
    assert [len(p.ids) for p in pieces.samples] == [3, 7, 7, 7, 4, 7]  # seq_len - 1 ids, then the rest
    assert np.concatenate([p.ids for p in pieces.samples[1:5]]).tolist() == long.ids.tolist()
    assert pieces.groups == [0, 1, 1, 1, 1, 2] and pieces.sources == 3
    # Every piece with its EOS fits one row, and a sample of exactly one row is left whole.
    assert all(p.packed_tokens <= 8 for p in pieces.samples)
    assert pack(pieces.samples[1:2], seq_len=8, eos_id=0).rows == 1


def test_a_piece_is_a_document_of_its_own_in_the_packed_stream():
    pieces = split_samples([sample("f", 10)], seq_len=6)
    packed = pack(pieces.samples, seq_len=6, eos_id=0)
    assert packed.tokens.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]]


def test_a_name_the_pieces_would_take_is_refused():
    with pytest.raises(DataError, match=r"both be called 'a.py#0'.*rename"):
        split_samples([sample("a.py", 20), sample("a.py#0", 2)], seq_len=8)
    with pytest.raises(DataError, match="at least 2 tokens"):
        split_samples([sample("a", 3)], seq_len=1)


def test_the_digest_names_the_tokens_not_the_id():
    assert piece_digest(np.array([1, 2, 3], dtype=np.int32)) == piece_digest(np.array([1, 2, 3], dtype=np.int64))
    assert piece_digest(np.array([1, 2, 3], dtype=np.int32)) != piece_digest(np.array([1, 2, 4], dtype=np.int32))
    assert len(piece_digest(np.array([], dtype=np.int32))) == 32
