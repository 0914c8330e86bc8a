"""An updated shard built on its node from the pieces the node already holds and the ones it lacks.

A shard is one packed file, so any change to a node's pieces rewrites all of it; but the node holds
most of the tokens already. An update sends a *patch* instead: the new shard's description (its
piece table ``[id, start, length, digest]``, in order) and the token ids of the pieces the node's
current shard does not list with the same id and digest, concatenated in table order. Client and
node apply one rule (:func:`held_pieces`) to decide which pieces those are, so the patch needs no
index of its own; every piece's digest is checked as it is placed, and the packed result must land
on the sha256 the client computed for the whole shard (:func:`dllmd.data.shards.shard_blob` writes
the same bytes everywhere), or the patch is refused.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dllmd.data.errors import ShardError
from dllmd.data.packing import Packed, TokenizedSample, pack
from dllmd.data.pieces import piece_digest

Row = tuple[str, int, int, str]  # sample id, start in the flat stream, length, digest


def held_pieces(rows: Sequence) -> dict[tuple[str, str], tuple[int, int]]:
    """(id, digest) -> (start, length) of a shard's piece table; rows that are not well formed hold nothing."""
    held = {}
    for row in rows:
        try:
            sample_id, start, length, digest = _row(row)
        except ShardError:
            continue
        held[(sample_id, digest)] = (start, length)
    return held


def make_patch(pieces: Sequence[TokenizedSample], digests: Sequence[str], base_rows: Sequence) -> np.ndarray:
    """The token ids a node whose shard lists ``base_rows`` lacks of ``pieces`` (in order, with their
    ``digests``), concatenated: what an update sends it (int32)."""
    held = held_pieces(base_rows)
    missing = [piece.ids for piece, digest in zip(pieces, digests) if (piece.id, digest) not in held]
    return np.concatenate(missing).astype(np.int32) if missing else np.zeros(0, dtype=np.int32)


def apply_patch(base: np.ndarray, base_rows: Sequence, rows: Sequence, patch: np.ndarray, seq_len: int,
                eos_id: int, max_tokens: int) -> Packed:
    """The shard ``rows`` describe: each piece copied from ``base`` (the current shard's flat stream)
    where ``base_rows`` lists it with the same id and digest, else taken from the front of ``patch``.
    Raises :class:`ShardError` when the patch does not add up or a piece does not match its digest;
    ``max_tokens`` bounds the result before anything is allocated."""
    table = [_row(row) for row in rows]
    if sum(length + 1 for _, _, length, _ in table) > max_tokens:
        raise ShardError(f"the patched shard would hold more tokens than the {max_tokens} its size allows")
    held = held_pieces(base_rows)
    pieces, taken = [], 0
    for sample_id, _, length, digest in table:
        where = held.get((sample_id, digest))
        if where is not None:
            ids = base[where[0]:where[0] + where[1]]
        else:
            ids = patch[taken:taken + length]
            taken += length
        if len(ids) != length or piece_digest(ids) != digest:
            raise ShardError(f"piece {sample_id!r} of the patched shard does not match its digest (the patch or "
                             f"this node's shard is not what the sender expected); send the whole shard")
        pieces.append(TokenizedSample(sample_id, ids))
    if taken != len(patch):
        raise ShardError(f"the patch holds {len(patch)} tokens, but its new pieces take {taken}")
    packed = pack(pieces, seq_len, eos_id)
    if [span.start for span in packed.spans] != [start for _, start, _, _ in table]:
        raise ShardError("the patched shard's piece table does not match how its pieces pack")
    return packed


def _row(row: object) -> Row:
    if (not isinstance(row, (list, tuple)) or len(row) != 4 or not isinstance(row[0], str)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row[1:3])
            or not isinstance(row[3], str)):
        raise ShardError(f"a piece table row is [id, start, length, digest], not {str(row)[:80]}")
    return row[0], row[1], row[2], row[3]
