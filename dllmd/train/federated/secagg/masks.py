"""Mask vectors: a 32-byte key expanded with AES-256-CTR into one uint32 word per element.

A mask must be unpredictable to anyone without its key, or the masked input it hides would leak: hence a
cryptographic stream cipher keyed with the full 256-bit derived key, never a numpy/torch generator or a
seed folded to 32 bits. Every key is used for one stream only (it is derived per round, pair and
purpose), so the counter starts at zero. Element ``i`` of the mask is the little-endian word ``i`` of
the keystream; modulo ``2**bits`` (bits <= 32) only its low bits count.

The keystream is made and added in chunks that stay in cache, straight into the caller's int64
accumulator (AES-NI runs at several GB/s: a 135M-element mask takes a fraction of a second).
"""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK = 1 << 20  # elements per keystream chunk (4 MiB)
_ZEROS = memoryview(bytes(4 * CHUNK))
_BLOCK = 16


def _keystream(key: bytes):
    return Cipher(algorithms.AES256(key), modes.CTR(bytes(_BLOCK))).encryptor()


def add_mask(acc: torch.Tensor, key: bytes, sign: int = 1) -> None:
    """``acc += sign * mask(key)`` in place, for a contiguous 1-D int64 CPU ``acc`` that the caller reduces
    modulo ``2**bits`` at the end. The words are added as signed int32 (congruent to the uint32 words
    modulo 2**32), so a few dozen masks never overflow int64."""
    if sign not in (1, -1):
        raise ValueError("sign is 1 or -1")
    if acc.dtype != torch.int64 or acc.dim() != 1 or not acc.is_contiguous() or acc.device.type != "cpu":
        raise ValueError("masks are added to a contiguous 1-D int64 CPU tensor")
    stream = _keystream(key)
    out = bytearray(4 * CHUNK + _BLOCK - 1)  # update_into wants room for a block beyond the data
    words = np.frombuffer(out, dtype=np.int32, count=CHUNK)
    total = acc.numpy()  # numpy's single-threaded ufuncs: torch's thread pool only adds contention here
    combine = np.add if sign > 0 else np.subtract
    for lo in range(0, total.size, CHUNK):
        part = total[lo:lo + CHUNK]
        stream.update_into(_ZEROS[:4 * part.size], out)
        combine(part, words[:part.size], out=part)


def mask(key: bytes, length: int) -> torch.Tensor:
    """The mask of ``key`` itself: ``length`` uint32 words as int64 in [0, 2**32)."""
    acc = torch.zeros(length, dtype=torch.int64)
    add_mask(acc, key)
    return acc & 0xFFFFFFFF


def random_words(key: bytes, count: int) -> list[int]:
    """``count`` uint64 words of the keystream (a permutation's sort keys, not a mask)."""
    raw = _keystream(key).update(bytes(8 * count))
    return [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(count)]
