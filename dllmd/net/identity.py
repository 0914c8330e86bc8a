"""One key is a machine's (or a user's) identity.

An Ed25519 signing key (pynacl) signs manifests and checkpoints; its Curve25519 twin is the
ZeroMQ CURVE keypair, so the key that signs is the key that authenticates the transport.
Public keys are written as 64 lowercase hex characters: safe in shells, TOML and URLs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from dllmd.storage import atomic_write

KEY_FILE_HEADER = b"dllm-ed25519-secret-v1\n"


class InvalidKey(ValueError):
    """A key file or public key string that cannot be used."""


def parse_public_key(text: str) -> bytes:
    """Decode a public key string (64 hex chars) to its 32 raw bytes, with a clear error."""
    text = text.strip().lower()
    if len(text) != 64:
        raise InvalidKey(f"a public key is 64 hex characters, got {len(text)}: {text[:80]!r}")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidKey(f"a public key is 64 hex characters; {text!r} is not hex") from None
    try:
        nacl.signing.VerifyKey(raw).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError):
        raise InvalidKey(f"{text!r} is not a valid Ed25519 public key") from None
    return raw


def node_id_of(public_key: str) -> str:
    """A short, stable id for display: the first 12 hex digits of sha256(public key)."""
    return hashlib.sha256(bytes.fromhex(public_key)).hexdigest()[:12]


def _z85(raw: bytes) -> bytes:
    from zmq.utils import z85  # here, not at the top: commands that never connect skip importing zmq

    return z85.encode(raw)


def curve_public_z85(public_key: str) -> bytes:
    """The z85 CURVE public key that belongs to an Ed25519 public key string."""
    verify = nacl.signing.VerifyKey(parse_public_key(public_key))
    return _z85(bytes(verify.to_curve25519_public_key()))


def curve_public_raw(public_key: str) -> bytes:
    """The 32 raw bytes of the X25519 (Curve25519) public key that belongs to an Ed25519 public key string."""
    return bytes(nacl.signing.VerifyKey(parse_public_key(public_key)).to_curve25519_public_key())


def verify_signature(public_key: str, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the holder of ``public_key``."""
    try:
        nacl.signing.VerifyKey(parse_public_key(public_key)).verify(data, signature)
        return True
    except (nacl.exceptions.BadSignatureError, InvalidKey, ValueError):
        return False


@dataclass(frozen=True)
class Identity:
    """A secret Ed25519 key with the CURVE keypair derived from it."""

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> "Identity":
        return cls(nacl.signing.SigningKey.generate())

    @property
    def public_key(self) -> str:
        return bytes(self.signing_key.verify_key).hex()

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    @property
    def curve_public(self) -> bytes:
        """z85 CURVE public key (what zmq's ``curve_publickey``/``curve_serverkey`` take)."""
        return _z85(bytes(self.signing_key.verify_key.to_curve25519_public_key()))

    @property
    def curve_secret(self) -> bytes:
        """z85 CURVE secret key (what zmq's ``curve_secretkey`` takes)."""
        return _z85(bytes(self.signing_key.to_curve25519_private_key()))

    @property
    def curve_secret_raw(self) -> bytes:
        """The 32 raw bytes of the X25519 secret key (the ring links' handshake takes it)."""
        return bytes(self.signing_key.to_curve25519_private_key())

    def sign(self, data: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes) over ``data``."""
        return self.signing_key.sign(data).signature

    def save(self, path: str | os.PathLike) -> None:
        """Write the secret key (0600). Refuses to overwrite: an identity is never replaced silently."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} already holds an identity; refusing to overwrite it")
        atomic_write(path, KEY_FILE_HEADER + bytes(self.signing_key).hex().encode() + b"\n", mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Identity":
        path = Path(path)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise InvalidKey(f"no identity at {path}; create one with 'init'") from None
        if not blob.startswith(KEY_FILE_HEADER):
            raise InvalidKey(f"{path} is not a dllm identity file")
        try:
            seed = bytes.fromhex(blob[len(KEY_FILE_HEADER):].strip().decode())
            return cls(nacl.signing.SigningKey(seed))
        except (ValueError, UnicodeDecodeError, nacl.exceptions.CryptoError):
            raise InvalidKey(f"{path} is corrupt: the secret key does not decode") from None
