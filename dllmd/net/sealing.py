"""Public-key sealing for relayed traffic: a payload only the holder of one key can open.

A sealed box (libsodium's ``crypto_box_seal``: an ephemeral X25519 key per message, then
XSalsa20-Poly1305) names no sender, so a layer tells its reader nothing about who made it. Nodes seal
to each other's X25519 twin of their Ed25519 identity (the same twin CURVE uses); a client's replies
come back sealed to a key it makes for each relayed connection, which names nobody.
"""

from __future__ import annotations

from typing import TypeVar

import msgpack
import nacl.exceptions
import nacl.public
import nacl.signing

from dllmd.net.identity import Identity, parse_public_key
from dllmd.net.schema import parse_args, to_wire
from dllmd.net.wire import WireError

T = TypeVar("T")


class SealError(ValueError):
    """A sealed blob that this key cannot open, or whose contents are not the expected payload."""


def curve_key_of(public_key: str) -> nacl.public.PublicKey:
    """The X25519 public key of an Ed25519 public key (hex)."""
    return nacl.signing.VerifyKey(parse_public_key(public_key)).to_curve25519_public_key()


def seal(recipient: nacl.public.PublicKey, payload) -> bytes:
    """``payload`` (a wire dataclass) as msgpack, sealed to ``recipient``."""
    return nacl.public.SealedBox(recipient).encrypt(msgpack.packb(to_wire(payload), use_bin_type=True))


def seal_frames(recipient: nacl.public.PublicKey, frames: list) -> bytes:
    """A message's frames (as :mod:`dllmd.net.wire` encodes them), sealed to ``recipient``."""
    return nacl.public.SealedBox(recipient).encrypt(msgpack.packb([bytes(f) for f in frames], use_bin_type=True))


def _open(key: nacl.public.PrivateKey, blob: bytes):
    try:
        plain = nacl.public.SealedBox(key).decrypt(bytes(blob))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SealError("the sealed blob does not open with this node's key (not sealed to it, or corrupt)") from None
    try:
        return msgpack.unpackb(plain, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise SealError(f"the sealed blob holds no message: {exc}") from None


def open_sealed(key: nacl.public.PrivateKey, blob: bytes, cls: type[T]) -> T:
    """Open a blob sealed to ``key`` and parse it as ``cls`` (bounds checked), or raise SealError."""
    data = _open(key, blob)
    if not isinstance(data, dict):
        raise SealError("the sealed blob holds no map")
    try:
        return parse_args(cls, data)
    except WireError as exc:
        raise SealError(f"the sealed blob's contents: {exc.message}") from None


def open_frames(key: nacl.public.PrivateKey, blob: bytes) -> list[bytes]:
    """Open frames sealed with :func:`seal_frames`, or raise SealError."""
    data = _open(key, blob)
    if not isinstance(data, list) or not all(isinstance(f, bytes) for f in data):
        raise SealError("the sealed blob holds no message frames")
    return data


def private_key_of(identity: Identity) -> nacl.public.PrivateKey:
    """The X25519 private key of a node's identity (what it opens layers sealed to it with)."""
    return identity.signing_key.to_curve25519_private_key()
