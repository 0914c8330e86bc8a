"""Long samples cut into pieces of one sequence each, before they are assigned to nodes.

A data-parallel step waits for the busiest worker, so shards must hold equal token counts. A whole
file is too coarse a unit for that: in a small repository a few large files hold most of the tokens,
and whichever node gets one is the slowest. Cut into pieces that pack into at most ``seq_len``
tokens (``seq_len - 1`` ids and the EOS after them), every unit is at most one row, and balancing
units balances tokens (see :mod:`dllmd.data.balance` for how close each strategy gets).

A piece is a training document of its own: packing puts an EOS after it, because on a node the
next piece of the same file is rarely the one that follows it (``round_robin`` deals them out), and
gluing pieces k and k + 4 together would teach a continuity the source does not have.

Pieces keep their order and are named ``ID#0``, ``ID#1`` ...; a sample that fits one sequence
keeps its own id, so short samples are placed exactly as before. ``groups`` says which sample each
piece was cut from: the ``semantic`` strategy keeps a file's pieces together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dllmd.data.errors import DataError
from dllmd.data.packing import TokenizedSample

DIGEST_HEX = 32  # 128 bits: two versions of a piece that share an id never share a digest by chance


@dataclass
class Pieces:
    samples: list[TokenizedSample]
    """The pieces, in source order (a split sample's pieces consecutive and in order)."""
    groups: list[int]
    """Per piece, the index of the source sample it was cut from."""
    sources: int
    """How many samples they were cut from."""


def split_samples(samples: Sequence[TokenizedSample], seq_len: int) -> Pieces:
    """Every sample that packs into more than ``seq_len`` tokens (its ids and an EOS) cut into pieces of
    ``seq_len - 1`` ids (the last one shorter), named ``ID#k``; the others as they are."""
    if seq_len < 2:
        raise DataError(f"the sequence length must be at least 2 tokens to cut samples into pieces, not {seq_len}")
    width = seq_len - 1
    pieces: list[TokenizedSample] = []
    groups: list[int] = []
    for index, sample in enumerate(samples):
        if sample.packed_tokens <= seq_len:
            pieces.append(sample)
            groups.append(index)
            continue
        for k, start in enumerate(range(0, len(sample.ids), width)):
            pieces.append(TokenizedSample(f"{sample.id}#{k}", sample.ids[start:start + width]))
            groups.append(index)
    _check_unique(pieces)
    return Pieces(pieces, groups, len(samples))


def piece_digest(ids: np.ndarray) -> str:
    """What a piece's tokens are, in a few bytes: a node's shard lists it per piece, so that an update
    can tell which pieces a node already holds (same id, same digest) from the ones it must be sent."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i4").tobytes()).hexdigest()[:DIGEST_HEX]


def _check_unique(pieces: list[TokenizedSample]) -> None:
    # A source may hold both "a.py" (long: cut into "a.py#0" ...) and a file named "a.py#0".
    seen: set[str] = set()
    for piece in pieces:
        if piece.id in seen:
            raise DataError(f"two samples would both be called {piece.id!r} once long samples are cut into pieces "
                            f"named ID#k; rename the file (or record id) {piece.id!r} or exclude it")
        seen.add(piece.id)
