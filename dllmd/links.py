"""Round trips from this node to its peers, measured when a client asks (``peers.ping``) and
remembered with the time they were taken, so that ``info`` reports them and a planner can put
tensor-parallel groups among nodes with fast links and pipeline stages across slower ones.

Only peers this node authorizes as ``peer`` are measured: the endpoints come from the caller, and a
caller must not be able to make the daemon connect anywhere it likes (the same rule as a next hop or
a group member). A round trip is the median of several ``ping`` calls over the node's encrypted peer
connection, after one call that opens it (the handshake is not a round trip).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Sequence

from dllmd.config import ConfigError, validate_endpoint
from dllmd.net.client import CallError, RemoteError
from dllmd.net.identity import parse_public_key
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages.node import PING, PeerArgs, PeerRtt
from dllmd.net.pool import ConnectionPool
from dllmd.net.server import HandlerError
from dllmd.net.wire import ErrorCode

log = logging.getLogger("dllmd.links")

PING_TIMEOUT_S = 2.0  # per ping: a peer slower than this is as good as unreachable for a group


class PeerLinks:
    """The round trips this node has measured, one per peer key (the latest)."""

    def __init__(self, pool: ConnectionPool, keys: AuthorizedKeys, own_key: str):
        self.pool = pool
        self.keys = keys
        self.own_key = own_key
        self._latest: dict[str, PeerRtt] = {}

    def remembered(self) -> list[PeerRtt]:
        """What was measured last, per peer still authorized (by key)."""
        return [rtt for key, rtt in sorted(self._latest.items()) if self._is_peer(key)]

    async def measure(self, peers: Sequence[PeerArgs], count: int, max_age_s: float) -> list[PeerRtt]:
        """Each peer's round trip, in the order asked: measured now, or remembered where one no older
        than ``max_age_s`` was taken to the same endpoint. Raises HandlerError(BAD_ARGS) for a malformed
        endpoint or key, or a peer named twice, before connecting anywhere."""
        checked = [self._check(i, peer) for i, peer in enumerate(peers)]
        keys = [key for key, _ in checked]
        if len(set(keys)) != len(keys):
            raise HandlerError(ErrorCode.BAD_ARGS, "each peer may be named once")
        return list(await asyncio.gather(*(self._one(key, endpoint, count, max_age_s) for key, endpoint in checked)))

    def _check(self, index: int, peer: PeerArgs) -> tuple[str, str]:
        try:
            validate_endpoint(peer.endpoint)
            key = parse_public_key(peer.public_key).hex()
        except (ConfigError, ValueError) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"peers[{index}]: {exc}") from None
        if peer.endpoint.rsplit(":", 1)[1] in ("0", "*"):
            raise HandlerError(ErrorCode.BAD_ARGS, f"peers[{index}]: {peer.endpoint!r} names no port")
        return key, peer.endpoint

    def _is_peer(self, key: str) -> bool:
        entry = self.keys.by_public_key(key)
        return entry is not None and entry.role == Role.PEER and key != self.own_key

    async def _one(self, key: str, endpoint: str, count: int, max_age_s: float) -> PeerRtt:
        if not self._is_peer(key):
            return PeerRtt(key, endpoint, error=ErrorCode.FORBIDDEN,
                           message="that key is not authorized as a peer on this node; nothing was sent")
        known = self._latest.get(key)
        if known and known.endpoint == endpoint and not known.error and time.time() - known.measured_at <= max_age_s:
            return known
        client = self.pool.get(endpoint, key)
        samples = []
        try:
            await client.invoke(PING, timeout=PING_TIMEOUT_S)  # opens the connection: not timed
            for _ in range(count):
                started = time.perf_counter()
                await client.invoke(PING, timeout=PING_TIMEOUT_S)
                samples.append((time.perf_counter() - started) * 1000)
        except RemoteError as exc:
            rtt = PeerRtt(key, endpoint, measured_at=time.time(), error=exc.code, message=exc.message)
        except CallError as exc:
            self.pool.drop(endpoint, key)  # the next measurement connects afresh
            rtt = PeerRtt(key, endpoint, measured_at=time.time(), error=ErrorCode.UNAVAILABLE, message=str(exc))
        else:
            rtt = PeerRtt(key, endpoint, round(statistics.median(samples), 3), len(samples), time.time())
        self._latest[key] = rtt
        return rtt
