"""ZeroMQ sockets with CURVE encryption and ZAP authentication, set up in one place.

A node binds one ROUTER. Clients (dllmctl, or another daemon acting as a peer) connect a DEALER
with their own CURVE keypair and the node's public key. Every connection is encrypted; a key that
is not in the node's authorized keys is refused during the handshake by ZAP (zmq.auth): the peer
gets ZMTP's handshake ERROR (which the client reports as ``NodeUnauthorized``), no connection is made,
and no request of it ever reaches a handler.
"""

from __future__ import annotations

import logging
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dllmd.net.identity import Identity, curve_public_z85
from dllmd.net.keys import AuthorizedKeys

log = logging.getLogger("dllmd.net")

ZAP_DOMAIN = "dllm"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
REFUSAL_LOG_INTERVAL_S = 60.0
MAX_REFUSED_TRACKED = 4096
HANDSHAKE_MS = 10_000  # a connection that has not finished CURVE's handshake by then is dropped
ROUTER_HWM = 1_000  # messages queued per connection each way (zmq's default 1000; ours was 10000)


class KeyTableAuthenticator(ThreadAuthenticator):
    """ZAP that consults the authorized-keys file on every handshake and names each connection's
    user by its Ed25519 public key, so handlers see *who* sent a message (``User-Id`` metadata).
    It runs in its own thread: handshakes are rare and must not wait behind the data path."""

    def __init__(self, context: zmq.Context, keys: AuthorizedKeys):
        super().__init__(context, log=logging.getLogger("dllmd.zap"))
        self.keys = keys
        self._refused: dict[bytes, list[float]] = {}  # curve key -> [refusals since last logged, last logged at]
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        try:
            entry = self.keys.by_curve_key(z85_key)
        except ValueError as exc:  # a broken keys file must not crash the handshake loop
            log.error("cannot read authorized keys: %s", exc)
            return False
        if entry is None:
            self._log_refusal(z85_key)
        return entry is not None

    def _log_refusal(self, z85_key: bytes) -> None:
        """One line per unknown key per minute at most, with the count: a stranger retrying in a loop
        must not fill the disk with the daemon's log."""
        now = time.monotonic()
        if len(self._refused) > MAX_REFUSED_TRACKED:
            self._refused.clear()
        seen = self._refused.setdefault(z85_key, [0, float("-inf")])
        seen[0] += 1
        if now - seen[1] >= REFUSAL_LOG_INTERVAL_S:
            log.warning("refused unknown key (curve %s)%s", z85_key.decode(errors="replace"),
                        f", {seen[0]} times since the last report" if seen[0] > 1 else "")
            seen[0], seen[1] = 0, now

    def curve_user_id(self, client_public_key: bytes) -> str:
        entry = self.keys.by_curve_key(z85.encode(client_public_key))
        return entry.public_key if entry else ""


def _common_options(sock: zmq.Socket, max_message_bytes: int, heartbeat_ms: int, heartbeat_timeout_ms: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # HWM counts messages, not bytes: MAXMSGSIZE is what bounds memory per inbound frame.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_timeout_ms)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)


def bind_router(
    ctx: zmq.Context,
    identity: Identity,
    endpoint: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    heartbeat_ms: int = 2000,
    heartbeat_timeout_ms: int = 6000,
) -> zmq.Socket:
    """The node's server socket. Returns it bound; ``LAST_ENDPOINT`` tells the real port."""
    sock = ctx.socket(zmq.ROUTER)
    _common_options(sock, max_message_bytes, heartbeat_ms, heartbeat_timeout_ms)
    # Without this a reply to a vanished client disappears silently; with it we get an error to log.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Per connection: what a caller that sends without reading (or never reads its replies) can park here.
    sock.setsockopt(zmq.SNDHWM, ROUTER_HWM)
    sock.setsockopt(zmq.RCVHWM, ROUTER_HWM)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    sock.curve_server = True
    sock.curve_secretkey = identity.curve_secret
    sock.curve_publickey = identity.curve_public
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.bind(endpoint.replace(":0", ":*") if endpoint.endswith(":0") else endpoint)
    return sock


def connect_dealer(
    ctx: zmq.Context,
    identity: Identity,
    endpoint: str,
    server_public_key: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    heartbeat_ms: int = 2000,
    heartbeat_timeout_ms: int = 6000,
) -> zmq.Socket:
    """A client socket to one node, pinned to that node's public key."""
    sock = ctx.socket(zmq.DEALER)
    _common_options(sock, max_message_bytes, heartbeat_ms, heartbeat_timeout_ms)
    sock.curve_secretkey = identity.curve_secret
    sock.curve_publickey = identity.curve_public
    sock.curve_serverkey = curve_public_z85(server_public_key)
    # Queue only on completed connections: a request to a dead node is refused at once (EAGAIN)
    # instead of waiting in a queue to be executed, stale, whenever the node comes back.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.connect(endpoint)
    return sock
