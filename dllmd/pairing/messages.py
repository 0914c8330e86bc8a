"""What the two ends of a pairing say, in order. The first two travel in the clear (they carry
SPAKE2's public messages); everything after is sealed under keys only a holder of the code's secret
derives (``dllmd.pairing.channel``)."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.schema import bounded

PROTOCOL = 1


class PairingErrorCode:
    """Codes of a ``PairingError``; the joiner branches on these, never on the message."""

    BAD_MESSAGE = "bad_message"  # garbage, an oversized frame, a message out of turn
    WRONG_SECRET = "wrong_secret"  # the sealed request did not open: the code's secret is not this invite's
    BURNT = "burnt"  # too many wrong secrets: the invite is gone
    EXPIRED = "expired"
    USED = "used"  # a machine joined with this code already
    BUSY = "busy"  # another join is in progress, or too many connections: try again in a moment
    CONFLICT = "conflict"  # the name is taken by another node of the cluster
    REFUSED = "refused"  # the joiner's key, name or endpoint is not acceptable
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # the joiner could not connect to the pairing socket


@dataclass
class Hello:
    """Joiner to inviter: the protocol version and SPAKE2's first message (side A)."""

    protocol: int = bounded(lo=0, hi=1 << 16)
    pake: bytes = bounded(max_len=256)


@dataclass
class PakeReply:
    """Inviter to joiner: SPAKE2's message of side B."""

    pake: bytes = bounded(max_len=256)


@dataclass
class JoinRequest:
    """Sealed, joiner to inviter: who the new node is and where its daemon listens."""

    public_key: str = bounded(max_len=64)
    name: str = bounded(max_len=63)
    endpoint: str = bounded(max_len=300)  # tcp://HOST:PORT the cluster reaches its daemon at


@dataclass
class ClusterNode:
    name: str = bounded(max_len=63)
    endpoint: str = bounded(max_len=300)
    public_key: str = bounded(max_len=64)


@dataclass
class JoinReply:
    """Sealed, inviter to joiner: the admin key the new node trusts as admin, the role it is invited
    with, and (for a peer) the cluster's nodes it trusts as peers."""

    admin_key: str = bounded(max_len=64)
    admin_name: str = bounded(max_len=64)
    role: str = bounded(max_len=16)
    nodes: list[ClusterNode] = bounded([], max_len=4096)


@dataclass
class JoinAck:
    """Sealed, joiner to inviter: the new node wrote the keys (or could not, and says why)."""

    ok: bool = False
    message: str = bounded("", max_len=1000)


@dataclass
class NodeFailure:
    node: str = bounded(max_len=63)
    error: str = bounded(max_len=1000)


@dataclass
class JoinResult:
    """Sealed, inviter to joiner: where the new key was authorized, and whether it is registered."""

    registered_as: str = bounded("", max_len=63)  # "" for a client, which is authorized only
    authorized_on: list[str] = bounded([], max_len=4096)
    failed: list[NodeFailure] = bounded([], max_len=4096)


@dataclass
class PairingError:
    """Either way, in the clear before the secret is proven, sealed after: why the pairing stops."""

    code: str = bounded(max_len=32)
    message: str = bounded("", max_len=1000)
    attempts_left: int = bounded(-1, lo=-1, hi=1000)  # after a wrong secret; -1 where it does not apply


KINDS: dict[str, type] = {cls.__name__: cls for cls in
                          (Hello, PakeReply, JoinRequest, JoinReply, JoinAck, JoinResult, PairingError)}
