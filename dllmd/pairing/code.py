"""The invite code: where the inviter's pairing socket listens, a fingerprint of its admin key, when
the invite expires, and the secret both ends prove with SPAKE2.

Binary layout, then base32 (RFC 4648, no padding) in groups of five, e.g. ``AEAH7-AAAB2-...``::

    version (1) | host kind (1) | host (4, 16, or 1 + len) | port (2) | expires_at (4, unix s)
    | fingerprint (10) | secret (12) | checksum (4: sha256 of what precedes)

The checksum catches a mistyped or truncated code before anything is sent; it is not a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import secrets
import struct
import time
from dataclasses import dataclass

VERSION = 1
SECRET_BYTES = 12  # 96 bits: SPAKE2 lets an attacker test one guess per connection, and 3 burn the invite
FINGERPRINT_BYTES = 10
CHECKSUM_BYTES = 4
_HOST_V4, _HOST_V6, _HOST_NAME = 4, 6, 0
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")
MAX_CODE_CHARS = 200  # longer than any code (a 253-character host name): refused before decoding


class InviteCodeError(ValueError):
    """A code that cannot be used: malformed, mistyped, of another version, or expired."""


def key_fingerprint(public_key: str) -> bytes:
    """What a code pins of the inviter's admin key: the first bytes of its sha256."""
    return hashlib.sha256(bytes.fromhex(public_key)).digest()[:FINGERPRINT_BYTES]


@dataclass(frozen=True)
class InviteCode:
    host: str
    port: int
    expires_at: int  # unix seconds
    fingerprint: bytes
    secret: bytes

    @classmethod
    def new(cls, host: str, port: int, admin_key: str, ttl_s: float) -> "InviteCode":
        return cls(host, port, int(time.time() + ttl_s), key_fingerprint(admin_key), secrets.token_bytes(SECRET_BYTES))

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def password(self) -> bytes:
        """What SPAKE2 is keyed by: the secret, bound to the admin key it was issued for."""
        return b"dllm-invite-v1|" + self.fingerprint + self.secret

    def encode(self) -> str:
        body = bytes([VERSION]) + _pack_host(self.host) + struct.pack(">HI", self.port, self.expires_at) \
            + self.fingerprint + self.secret
        raw = body + hashlib.sha256(body).digest()[:CHECKSUM_BYTES]
        text = base64.b32encode(raw).decode().rstrip("=")
        return "-".join(text[i:i + 5] for i in range(0, len(text), 5))

    @classmethod
    def decode(cls, text: str) -> "InviteCode":
        """Parse a code as a user pastes it (case, dashes and spaces do not matter)."""
        if not isinstance(text, str) or len(text) > MAX_CODE_CHARS:
            raise InviteCodeError("that is not an invite code (too long); copy the code 'dllmctl nodes invite' printed")
        compact = re.sub(r"[\s-]", "", text).upper()
        try:
            raw = base64.b32decode(compact + "=" * (-len(compact) % 8))
        except (binascii.Error, ValueError):
            raise InviteCodeError("that is not an invite code (not base32); copy the code 'dllmctl nodes invite' printed") from None
        if len(raw) < 1 + CHECKSUM_BYTES or hashlib.sha256(raw[:-CHECKSUM_BYTES]).digest()[:CHECKSUM_BYTES] != raw[-CHECKSUM_BYTES:]:
            raise InviteCodeError("the invite code is mistyped or incomplete (its checksum does not match)")
        body = raw[:-CHECKSUM_BYTES]
        if body[0] != VERSION:
            raise InviteCodeError(f"the invite code is of version {body[0]}; this dllmd reads version {VERSION}")
        try:
            host, rest = _unpack_host(body[1:])
            port, expires_at = struct.unpack(">HI", rest[:6])
        except (IndexError, struct.error, ValueError):
            raise InviteCodeError("the invite code is malformed (its address does not decode)") from None
        rest = rest[6:]
        if len(rest) != FINGERPRINT_BYTES + SECRET_BYTES or port == 0:
            raise InviteCodeError("the invite code is malformed (wrong length)")
        return cls(host, port, expires_at, rest[:FINGERPRINT_BYTES], rest[FINGERPRINT_BYTES:])


def _pack_host(host: str) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise InviteCodeError(f"{host!r} is not an IP address or host name") from None
        return bytes([_HOST_NAME, len(host)]) + host.encode()
    return bytes([_HOST_V4 if ip.version == 4 else _HOST_V6]) + ip.packed


def _unpack_host(data: bytes) -> tuple[str, bytes]:
    kind = data[0]
    if kind == _HOST_V4:
        return str(ipaddress.IPv4Address(data[1:5])), data[5:]
    if kind == _HOST_V6:
        return str(ipaddress.IPv6Address(data[1:17])), data[17:]
    if kind == _HOST_NAME:
        length = data[1]
        host = data[2:2 + length].decode("ascii")
        if len(host) != length or not _HOSTNAME.match(host):
            raise ValueError("bad host name")
        return host, data[2 + length:]
    raise ValueError("unknown host kind")
