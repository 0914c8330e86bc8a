"""The primitives under the protocol, each used for one thing: BLAKE2b as a keyed PRF that turns a
secret and a context into a 32-byte key, X25519 to agree a secret between two clients' round keys, and
XChaCha20-Poly1305 (libsodium) to seal a share for one neighbour with the context as associated data.

Every derived key hashes in its context (job, round, roster digest, who to whom, what for), so no key
and no ciphertext of one round, job or pair is any use in another.
"""

from __future__ import annotations

import hashlib

import nacl.bindings
import nacl.exceptions
import nacl.utils

NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # random per message: 24 bytes
TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
_TEST_SCALAR = bytes(range(1, 33))


class CryptoFailure(Exception):
    """A key agreement with a degenerate public key, or a ciphertext that does not open."""


def derive(secret: bytes, context: bytes) -> bytes:
    """A 32-byte key that only the holder of ``secret`` can compute, different for every ``context``."""
    return hashlib.blake2b(context, key=secret, digest_size=32).digest()


def agree(secret_key: bytes, public_key: bytes, context: bytes) -> bytes:
    """The key two X25519 key pairs agree for ``context``: the same from either side. Both public keys go
    into the hash (the usual X25519 KDF binding), lowest first so the order of the sides does not matter."""
    try:
        shared = nacl.bindings.crypto_scalarmult(secret_key, public_key)
        own = nacl.bindings.crypto_scalarmult_base(secret_key)
    except nacl.exceptions.CryptoError:  # a low-order point: libsodium refuses an all-zero secret
        raise CryptoFailure("degenerate X25519 public key") from None
    low, high = sorted((own, public_key))
    return derive(shared, context + low + high)


def usable_public_key(public_key: bytes) -> bool:
    """False for the X25519 points of small order: any key agreement with them ends in the all-zero secret
    (every clamped scalar is a multiple of the cofactor, so one test multiplication finds them)."""
    try:
        nacl.bindings.crypto_scalarmult(_TEST_SCALAR, public_key)
        return True
    except nacl.exceptions.CryptoError:
        return False


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Nonce and ciphertext of ``plaintext``, authenticated together with ``context``."""
    nonce = nacl.utils.random(NONCE_BYTES)
    return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, context, nonce, key)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output, or CryptoFailure if it was sealed under another key or context."""
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[NONCE_BYTES:], context, sealed[:NONCE_BYTES], key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise CryptoFailure("the share does not open under its context") from None
