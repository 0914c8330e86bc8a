"""Opening bulk links: ``dial`` connects and runs the initiator's handshake; ``LinkListener``
accepts connections and runs the responder's.

Authentication before allocation: the listener reads exactly one fixed-size HELLO (within
``HANDSHAKE_TIMEOUT_S``), asks its owner whether that node may connect for that ring generation
in that mode, checks the HELLO's mac, answers, and reads exactly one fixed-size CONFIRM. Only a
connection whose CONFIRM proves the link keys becomes a ``BulkLink`` (threads, buffers, frames);
anything else is closed, having been sent nothing (or, for a HELLO that proves the initiator's key,
one REPLY). At most ``MAX_HANDSHAKES`` run at once: more connections are closed on arrival.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
import logging
import socket
import time
from typing import Any, Callable

from dllmd.net.bulk.handshake import CONFIRM_BYTES, HELLO, REPLY, Hello, HandshakeRefused, Initiator, LinkKeys, \
    Mode, Responder, parse_hello
from dllmd.net.bulk.link import BulkLink, BulkLinkCode, BulkLinkError
from dllmd.net.identity import Identity

log = logging.getLogger("dllmd.bulk")

HANDSHAKE_TIMEOUT_S = 5.0
MAX_HANDSHAKES = 16
BACKLOG = 64


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` (IPv6 hosts in brackets) as (host, port)."""
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        raise ValueError(f"a bulk link endpoint is tcp://HOST:PORT, not {endpoint!r}")
    host, port = endpoint[6:].rsplit(":", 1)
    return host.strip("[]"), int(port)


def join_endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


async def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the handshake took too long")
        n = await asyncio.wait_for(loop.sock_recv_into(sock, view[got:]), left)
        if n == 0:
            raise ConnectionError("the connection was closed during the handshake")
        got += n
    return bytes(data)


@contextmanager
def _dialling(endpoint: str):
    """A dial's failures as BulkLinkError: PEER_MISMATCH when another node answered, else REFUSED."""
    try:
        yield
    except HandshakeRefused as exc:
        code = BulkLinkCode.PEER_MISMATCH if exc.mismatch else BulkLinkCode.REFUSED
        raise BulkLinkError(code, f"{endpoint}: {exc}") from None
    except (OSError, TimeoutError, ConnectionError) as exc:
        raise BulkLinkError(BulkLinkCode.REFUSED, f"{endpoint}: {exc or type(exc).__name__}") from None


async def dial(identity: Identity, endpoint: str, responder_key: str, generation: int, mode: Mode) -> BulkLink:
    """Connect to ``responder_key``'s listener at ``endpoint`` and authenticate both ends. Raises
    ``BulkLinkError``: ``REFUSED`` (closed, refused, timed out: the responder may not have joined the
    generation yet; worth retrying) or ``PEER_MISMATCH`` (another node answered: not worth it)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    host, port = split_endpoint(endpoint)
    sock = None
    try:
        with _dialling(endpoint):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, proto, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, address), HANDSHAKE_TIMEOUT_S)
            initiator = Initiator(identity, responder_key, generation, mode)
            await loop.sock_sendall(sock, initiator.hello())
            confirm, keys = initiator.finish(await _read_exactly(sock, REPLY.size, deadline))
            await loop.sock_sendall(sock, confirm)
            link = BulkLink(sock, keys if mode == Mode.AEAD else None, responder_key)
            sock = None
            return link
    finally:
        if sock is not None:
            sock.close()


def dial_blocking(identity: Identity, endpoint: str, responder_key: str, generation: int,
                  timeout_s: float = HANDSHAKE_TIMEOUT_S) -> tuple[socket.socket, LinkKeys]:
    """``dial``'s handshake (AEAD mode) from a thread of its own, for a link the caller's thread
    drives itself (:class:`dllmd.net.bulk.direct.DirectLink`): the connected socket and its keys.
    Raises BulkLinkError as ``dial`` does."""
    host, port = split_endpoint(endpoint)
    sock = None
    try:
        with _dialling(endpoint):
            sock = socket.create_connection((host, port), timeout=timeout_s)
            sock.settimeout(timeout_s)
            initiator = Initiator(identity, responder_key, generation, Mode.AEAD)
            sock.sendall(initiator.hello())
            reply = bytearray()
            while len(reply) < REPLY.size:
                chunk = sock.recv(REPLY.size - len(reply))
                if not chunk:
                    raise ConnectionError("the connection was closed during the handshake")
                reply += chunk
            confirm, keys = initiator.finish(bytes(reply))
            sock.sendall(confirm)
            dialed, sock = sock, None
            return dialed, keys
    finally:
        if sock is not None:
            sock.close()


class LinkListener:
    """A bound TCP socket that admits only connections whose handshake the owner accepts.

    ``admit(hello)`` says whether that node may open a link of that generation and mode now (it
    runs before anything is sent back); ``adopt(hello, link)`` takes the established link (it may
    close it, if the ring changed meanwhile). ``wrap(socket, keys, peer_key)`` makes the link of an
    accepted connection (keys None in plaintext mode): a threaded :class:`BulkLink` unless told otherwise."""

    def __init__(self, identity: Identity, host: str, port: int, admit: Callable[[Hello], bool],
                 adopt: Callable[[Hello, Any], None],
                 wrap: Callable[[socket.socket, LinkKeys | None, str], Any] | None = None):
        self.identity, self._admit, self._adopt, self._wrap = identity, admit, adopt, wrap
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self._sock.setblocking(False)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._handshakes: set[asyncio.Task] = set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    @property
    def endpoint(self) -> str:
        return join_endpoint(self.host, self.port)

    def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        self._sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors, say: the listener must survive it
                log.warning("bulk listener on port %d: accept failed: %s", self.port, exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._handshakes) >= MAX_HANDSHAKES:
                conn.close()
                continue
            conn.setblocking(False)
            task = loop.create_task(self._handshake(conn, address))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, address) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        adopted = False
        try:
            hello = parse_hello(await _read_exactly(conn, HELLO.size, deadline))
            if not self._admit(hello):
                raise HandshakeRefused(f"{hello.initiator_key[:16]} may not open a link of generation "
                                       f"{hello.generation} in mode {hello.mode} now")
            responder = Responder(self.identity, hello)
            await loop.sock_sendall(conn, responder.reply())
            keys = responder.finish(await _read_exactly(conn, CONFIRM_BYTES, deadline))
            adopted = True
        except (HandshakeRefused, OSError, TimeoutError, ConnectionError) as exc:
            log.info("bulk link from %s refused: %s", address, exc)
            return
        finally:
            if not adopted:  # refused, or the listener closed meanwhile
                conn.close()
        wrap = self._wrap or BulkLink
        self._adopt(hello, wrap(conn, keys if hello.mode == Mode.AEAD else None, hello.initiator_key))
