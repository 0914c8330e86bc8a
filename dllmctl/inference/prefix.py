"""The client's side of the stages' prefix cache (:mod:`dllmd.inference.prefix_cache`): the names of
a prompt's blocks, and how much of a prompt a session may skip.

A block is named by a chain hash: block i's hash covers the hash of block i - 1 and block i's
token ids, so it names the whole prefix up to block i. The hash is keyed with a secret derived
from the client's identity: a stage sees only opaque names (a later stage, which never sees
token ids, cannot test guesses of a prompt against them), and the same prompt gives the same
names on every stage and in every later session of this client.
"""

from __future__ import annotations

import hashlib

from dllmd.net.identity import Identity
from dllmd.net.messages.inference import MAX_PREFIX_BLOCKS, PREFIX_BLOCK_TOKENS, PREFIX_HASH_BYTES

_PERSON = b"dllm-prefix-v1"


def prefix_key(identity: Identity) -> bytes:
    """This client's secret for naming blocks (derived from its identity, so it survives restarts)."""
    return hashlib.blake2b(bytes(identity.signing_key), digest_size=32, person=_PERSON).digest()


def prefix_hashes(token_ids: list[int], key: bytes) -> list[bytes]:
    """The chain hashes of the whole blocks of ``token_ids`` (at most MAX_PREFIX_BLOCKS of them)."""
    hashes, previous = [], b""
    blocks = min(len(token_ids) // PREFIX_BLOCK_TOKENS, MAX_PREFIX_BLOCKS)
    for i in range(blocks):
        block = token_ids[i * PREFIX_BLOCK_TOKENS:(i + 1) * PREFIX_BLOCK_TOKENS]
        data = b"".join(int(t).to_bytes(8, "little", signed=True) for t in block)
        previous = hashlib.blake2b(previous + data, digest_size=PREFIX_HASH_BYTES, key=key).digest()
        hashes.append(previous)
    return hashes


def usable_cached_tokens(reported: list[int], fed_tokens: int) -> int:
    """Tokens a new session may skip: what every stage holds (each must continue from the same
    position), in whole blocks, leaving at least one token to run (the last stage needs the last
    position's logits)."""
    if not reported or fed_tokens < 1:
        return 0
    return max(0, min(min(reported), fed_tokens - 1) // PREFIX_BLOCK_TOKENS * PREFIX_BLOCK_TOKENS)
