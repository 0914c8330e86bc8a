"""t-of-n Shamir sharing of 16- and 32-byte secrets, on pycryptodome's GF(2^128) implementation.

pycryptodome shares 16-byte blocks; a 32-byte secret (an X25519 secret key) is two blocks, each shared
with its own random polynomial and the same points, so one holder's share of it is 32 bytes.
"""

from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir

BLOCK = 16


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shares of ``secret`` at points 1..``count`` (list position + 1); any ``threshold`` rebuild it,
    fewer tell nothing about it."""
    if len(secret) % BLOCK or not secret:
        raise ValueError(f"a shared secret is a multiple of {BLOCK} bytes")
    if not 1 <= threshold <= count:
        raise ValueError(f"threshold {threshold} is not within 1..{count}")
    blocks = [Shamir.split(threshold, count, secret[i:i + BLOCK]) for i in range(0, len(secret), BLOCK)]
    return [b"".join(block[point][1] for block in blocks) for point in range(count)]


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """The secret behind exactly ``threshold`` shares, given as (point, share). With too few shares the
    result is some unrelated value: the caller checks it against a commitment."""
    size = len(shares[0][1])
    return b"".join(Shamir.combine([(point, share[i:i + BLOCK]) for point, share in shares])
                    for i in range(0, size, BLOCK))
