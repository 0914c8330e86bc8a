"""The handshake that opens a bulk link: mutual authentication by node keys, fresh per-link keys.

Both ends already know each other's Ed25519 node key (the ring's member list names it), so the
handshake is Noise's KK pattern over the keys' X25519 twins (the keys CURVE uses), done in three
fixed-size messages:

    initiator -> responder  HELLO    magic, generation, mode, both node keys, ephemeral e_i, mac_i
    responder -> initiator  REPLY    ephemeral e_r, mac_r
    initiator -> responder  CONFIRM  mac_c

* ``mac_i`` is keyed by DH(e_i, S_r) and DH(s_i, S_r): only the holder of the initiator's secret
  (or the responder's) can make it, so the responder answers nobody else. It has no freshness of
  the responder's: a replayed HELLO gets a REPLY, and then fails at CONFIRM.
* The link keys come from all four DHs, ee, es, se and ss, salted with the transcript hash. Without
  the responder's static secret no one computes es, without the initiator's no one computes se:
  only the two nodes know the keys. ee makes them fresh for every connection, whatever the
  generation number (also after a restart), and gives forward secrecy: once both ephemerals are
  gone, the node keys alone do not open recorded traffic.
* ``mac_r`` and ``mac_c`` prove both ends derived the same keys, so each side knows the other is
  the node it expects before a single chunk moves. The responder accepts nothing else until
  CONFIRM checks out.

This module is pure: it computes and checks messages; ``dllmd.net.bulk.connect`` does the I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

import nacl.bindings
import nacl.exceptions
import nacl.public
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dllmd.net.identity import Identity, InvalidKey, curve_public_raw

MAGIC = b"DLLMBLK1"
HELLO = struct.Struct("!8sQB32s32s32s32s")  # magic, generation, mode, initiator key, responder key, e_i, mac_i
REPLY = struct.Struct("!32s32s")  # e_r, mac_r
CONFIRM_BYTES = 32
NONCE_PREFIX = {True: b"i2r\0", False: b"r2i\0"}  # by "sent by the initiator"; 4 bytes + an 8-byte counter


class Mode(IntEnum):
    """What a link does to its chunks; both ends must agree, or the handshake is refused."""

    AEAD = 1  # AES-256-GCM per chunk
    PLAINTEXT = 2  # authenticated connection, chunks in the clear (trusted links, by opt-in)


class HandshakeRefused(Exception):
    """A handshake message that does not check out. ``mismatch``: the other end answered as a node
    other than the expected one (or does not hold its key), which retrying will not fix."""

    def __init__(self, message: str, mismatch: bool = False):
        super().__init__(message)
        self.mismatch = mismatch


@dataclass(frozen=True)
class LinkKeys:
    """One end's keys: what it sends is sealed with ``send``, what it receives opened with ``receive``.
    The nonce prefixes differ by direction (the keys already do; this is belt and braces)."""

    send: bytes
    receive: bytes
    send_prefix: bytes
    receive_prefix: bytes


def _dh(secret: bytes, public: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_scalarmult(secret, public)
    except (nacl.exceptions.CryptoError, RuntimeError, ValueError):  # a low-order point: all-zero secret
        raise HandshakeRefused("a handshake key is not a usable X25519 point") from None


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _hello_key(es: bytes, ss: bytes) -> bytes:
    return _hkdf(es + ss, None, b"dllm bulk hello v1", 32)


def _session(hello: bytes, e_r: bytes, ee: bytes, es: bytes, se: bytes, ss: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(initiator->responder key, responder->initiator key, mac_r key, mac_c key), salted with the
    transcript: the keys belong to this HELLO and this REPLY only."""
    transcript = hashlib.sha256(hello + e_r).digest()
    okm = _hkdf(ee + es + se + ss, transcript, b"dllm bulk link v1", 128)
    return okm[:32], okm[32:64], okm[64:96], okm[96:]


def _peer_curve(public_key: str) -> bytes:
    try:
        return curve_public_raw(public_key)
    except InvalidKey as exc:
        raise HandshakeRefused(f"not a node key: {exc}") from None


class Initiator:
    """The connecting end: ``hello()``, then ``finish(reply)`` gives the CONFIRM and the keys."""

    def __init__(self, identity: Identity, responder_key: str, generation: int, mode: Mode):
        self._identity, self._responder = identity, responder_key
        static_r = _peer_curve(responder_key)
        self._ephemeral = nacl.public.PrivateKey.generate()
        self._es = _dh(bytes(self._ephemeral), static_r)
        self._ss = _dh(identity.curve_secret_raw, static_r)
        body = HELLO.pack(MAGIC, generation, mode, bytes.fromhex(identity.public_key), bytes.fromhex(responder_key),
                          bytes(self._ephemeral.public_key), b"\0" * 32)[:-32]
        self._hello = body + _mac(_hello_key(self._es, self._ss), body)

    def hello(self) -> bytes:
        return self._hello

    def finish(self, reply: bytes) -> tuple[bytes, LinkKeys]:
        e_r, mac_r = REPLY.unpack(reply)
        ee = _dh(bytes(self._ephemeral), e_r)
        se = _dh(self._identity.curve_secret_raw, e_r)
        i2r, r2i, k_r, k_c = _session(self._hello, e_r, ee, self._es, se, self._ss)
        transcript = hashlib.sha256(self._hello + e_r).digest()
        if not hmac.compare_digest(mac_r, _mac(k_r, transcript)):
            raise HandshakeRefused(f"the node at this address does not hold key {self._responder[:16]}...",
                                   mismatch=True)
        self._ephemeral = None  # forward secrecy: the ephemeral secret is not needed again
        return _mac(k_c, transcript), LinkKeys(i2r, r2i, NONCE_PREFIX[True], NONCE_PREFIX[False])


@dataclass(frozen=True)
class Hello:
    """A parsed HELLO, before its mac is checked: who claims to connect, for which ring."""

    generation: int
    mode: int
    initiator_key: str
    responder_key: str
    raw: bytes


def parse_hello(data: bytes) -> Hello:
    magic, generation, mode, initiator, responder, _e_i, _mac_i = HELLO.unpack(data)
    if magic != MAGIC:
        raise HandshakeRefused("not a bulk link handshake")
    return Hello(generation, mode, initiator.hex(), responder.hex(), data)


class Responder:
    """The accepting end, for a HELLO whose claims the caller has already found acceptable:
    the constructor checks ``mac_i``; ``reply()``, then ``finish(confirm)`` gives the keys."""

    def __init__(self, identity: Identity, hello: Hello):
        if hello.responder_key != identity.public_key:
            raise HandshakeRefused("the handshake is meant for another node")
        _magic, _gen, _mode, _i, _r, e_i, mac_i = HELLO.unpack(hello.raw)
        static_i = _peer_curve(hello.initiator_key)
        secret = identity.curve_secret_raw
        es, ss = _dh(secret, e_i), _dh(secret, static_i)
        if not hmac.compare_digest(mac_i, _mac(_hello_key(es, ss), hello.raw[:-32])):
            raise HandshakeRefused("the handshake was not made with the initiator's key")
        ephemeral = nacl.public.PrivateKey.generate()  # dropped at the end of this call: forward secrecy
        e_r = bytes(ephemeral.public_key)
        ee, se = _dh(bytes(ephemeral), e_i), _dh(bytes(ephemeral), static_i)
        i2r, r2i, k_r, self._k_c = _session(hello.raw, e_r, ee, es, se, ss)
        self._transcript = hashlib.sha256(hello.raw + e_r).digest()
        self._reply = REPLY.pack(e_r, _mac(k_r, self._transcript))
        self._keys = LinkKeys(r2i, i2r, NONCE_PREFIX[False], NONCE_PREFIX[True])

    def reply(self) -> bytes:
        return self._reply

    def finish(self, confirm: bytes) -> LinkKeys:
        if not hmac.compare_digest(confirm, _mac(self._k_c, self._transcript)):
            raise HandshakeRefused("the initiator did not prove the link keys")
        return self._keys
