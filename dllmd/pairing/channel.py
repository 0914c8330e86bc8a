"""The pairing channel: length-prefixed frames over TCP, keyed by SPAKE2 over the invite's secret.

1. joiner -> inviter, clear: ``Hello`` (SPAKE2 side A's message)
2. inviter -> joiner, clear: ``PakeReply`` (side B's message)
   Both now hold one key if, and only if, they used the same secret; a wrong guess yields
   unrelated keys, and SPAKE2 gives a passive or active attacker one guess per run, nothing offline.
3. joiner -> inviter, sealed: ``JoinRequest``. Opening it proves to the inviter that the joiner
   holds the secret; a box that does not open is a wrong secret (counted).
4. inviter -> joiner, sealed: ``JoinReply``. Opening it proves the same to the joiner.
5. joiner -> inviter, sealed: ``JoinAck`` (keys written), 6. inviter -> joiner, sealed: ``JoinResult``.

A frame is a 4-byte big-endian length, then a kind byte (0: a clear msgpack message, 1: sealed),
then the body. Sealed bodies are XSalsa20-Poly1305 (pynacl's SecretBox) under one key per direction,
derived from SPAKE2's key with BLAKE2b, and nonces that count the direction's frames from 0: nothing
of an earlier run, the other direction or another position in this one opens here.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import TypeVar

import msgpack
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.secret
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.spake2 import SPAKEError

from dllmd.net.schema import parse_args, to_wire
from dllmd.net.wire import WireError
from dllmd.pairing.messages import KINDS, PairingError, PairingErrorCode

MAX_JOINER_FRAME = 16 * 1024  # what the inviter reads from anyone: a join request is ~500 bytes
MAX_INVITER_FRAME = 4 * 1024 * 1024  # the reply lists the cluster's nodes
_CLEAR, _SEALED = 0, 1
_ID_JOINER, _ID_INVITER = b"dllm-pair-joiner", b"dllm-pair-inviter"

T = TypeVar("T")


class PairingFailed(Exception):
    """The pairing stopped: ``code`` is a ``PairingErrorCode``."""

    def __init__(self, code: str, message: str, attempts_left: int = -1):
        super().__init__(message)
        self.code, self.message, self.attempts_left = code, message, attempts_left

    def to_message(self) -> PairingError:
        return PairingError(self.code, self.message, self.attempts_left)


@dataclass
class Frame:
    sealed: bool
    body: bytes


async def read_frame(reader: asyncio.StreamReader, limit: int, timeout: float) -> Frame:
    """One frame, refused before it is read if it is larger than ``limit``."""
    try:
        async with asyncio.timeout(timeout):
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            if length < 1 or length > limit:
                raise PairingFailed(PairingErrorCode.BAD_MESSAGE, f"a frame of {length} bytes (at most {limit})")
            blob = await reader.readexactly(length)
    except TimeoutError:
        raise PairingFailed(PairingErrorCode.TIMEOUT, f"nothing arrived within {timeout:g}s") from None
    except asyncio.IncompleteReadError:
        raise PairingFailed(PairingErrorCode.BAD_MESSAGE, "the connection closed in the middle of the pairing") from None
    if blob[0] not in (_CLEAR, _SEALED):
        raise PairingFailed(PairingErrorCode.BAD_MESSAGE, "not a pairing frame")
    return Frame(blob[0] == _SEALED, blob[1:])


async def write_frame(writer: asyncio.StreamWriter, sealed: bool, body: bytes) -> None:
    writer.write(struct.pack(">IB", len(body) + 1, _SEALED if sealed else _CLEAR) + body)
    await writer.drain()


def pack(message) -> bytes:
    return msgpack.packb({"kind": type(message).__name__, "body": to_wire(message)}, use_bin_type=True)


def unpack(blob: bytes, expected: type[T]) -> T:
    """The message of kind ``expected``; a ``PairingError`` from the other end is raised as ``PairingFailed``."""
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as exc:
        raise PairingFailed(PairingErrorCode.BAD_MESSAGE, f"not msgpack: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"kind", "body"} or doc["kind"] not in KINDS \
            or not isinstance(doc["body"], dict):
        raise PairingFailed(PairingErrorCode.BAD_MESSAGE, "not a pairing message")
    kind = KINDS[doc["kind"]]
    if kind is not expected and kind is not PairingError:
        raise PairingFailed(PairingErrorCode.BAD_MESSAGE, f"expected {expected.__name__}, got {doc['kind']}")
    try:
        message = parse_args(kind, doc["body"])
    except WireError as exc:
        raise PairingFailed(PairingErrorCode.BAD_MESSAGE, f"{doc['kind']}: {exc.message}") from None
    if isinstance(message, PairingError) and expected is not PairingError:
        raise PairingFailed(message.code, message.message, message.attempts_left)
    return message


class Pake:
    """One side's SPAKE2 run over an invite's password."""

    def __init__(self, password: bytes, joiner: bool):
        cls = SPAKE2_A if joiner else SPAKE2_B
        self.joiner = joiner
        self._state = cls(password, idA=_ID_JOINER, idB=_ID_INVITER)
        self.message = self._state.start()

    def finish(self, other: bytes) -> "SealedChannel":
        if len(other) != len(self.message):
            raise PairingFailed(PairingErrorCode.BAD_MESSAGE, f"a SPAKE2 message is {len(self.message)} bytes, got {len(other)}")
        try:
            key = self._state.finish(other)
        except SPAKEError as exc:
            raise PairingFailed(PairingErrorCode.BAD_MESSAGE, f"not a SPAKE2 message of the other side ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - the library's point decoder raises its own types (NotOnCurve, ...)
            raise PairingFailed(PairingErrorCode.BAD_MESSAGE, f"not a SPAKE2 message ({type(exc).__name__})") from None
        return SealedChannel(key, self.joiner)


def _direction_key(key: bytes, label: bytes) -> bytes:
    return nacl.hash.blake2b(b"", key=key, person=label, digest_size=32, encoder=nacl.encoding.RawEncoder)


class SealedChannel:
    """Seals what this side sends and opens what it receives, each direction under its own key,
    with a counter for nonce (frames are taken in order: a replayed or reordered one does not open)."""

    def __init__(self, key: bytes, joiner: bool):
        to_inviter, to_joiner = _direction_key(key, b"dllm-pair-j2i"), _direction_key(key, b"dllm-pair-i2j")
        self._send = nacl.secret.SecretBox(to_inviter if joiner else to_joiner)
        self._recv = nacl.secret.SecretBox(to_joiner if joiner else to_inviter)
        self._sent = self._received = 0

    @staticmethod
    def _nonce(count: int) -> bytes:
        return count.to_bytes(nacl.secret.SecretBox.NONCE_SIZE, "big")

    def seal(self, message) -> bytes:
        box = self._send.encrypt(pack(message), self._nonce(self._sent)).ciphertext
        self._sent += 1
        return box

    def open(self, frame: Frame, expected: type[T], wrong: str) -> T:
        """The sealed message of kind ``expected``. A clear frame is the other end's ``PairingError``
        (it could not open ours); a sealed one that does not open raises ``wrong``."""
        if not frame.sealed:
            refusal = unpack(frame.body, PairingError)  # anything else in the clear is out of turn
            raise PairingFailed(refusal.code, refusal.message, refusal.attempts_left)
        try:
            blob = self._recv.decrypt(frame.body, self._nonce(self._received))
        except (nacl.exceptions.CryptoError, ValueError):
            raise PairingFailed(wrong, "the sealed message did not open: the other end does not hold this "
                                       "invite's secret") from None
        self._received += 1
        return unpack(blob, expected)
