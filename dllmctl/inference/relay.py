"""A stage reached through relays, as a session's client sees it: the three calls
:class:`~dllmctl.inference.session.DistributedSession` makes of a stage (``open_stream``,
``send_oneway``, ``invoke``), each request wrapped in one sealed layer per relay and its replies opened
with a key made for this connection.

The request is sealed to the stage (with the reply key inside), then to the last relay together with
the stage's address, and so on out to the first relay, which is the only node this client talks to.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Callable, Protocol

import nacl.public

from dllmd.net.client import BadReply, ReplyStream, settle
from dllmd.net.messages.relay import RELAY_FORWARD, HopLayer, InnerRequest, RelayArgs, RelayReply
from dllmd.net.pool import ConnectionPool
from dllmd.net.schema import parse_reply, to_wire
from dllmd.net.sealing import SealError, curve_key_of, open_frames, seal
from dllmd.net.wire import Limits, Reply, Request, WireError, decode_reply, encode_request


class Node(Protocol):
    name: str
    address: str
    public_key: str


class RelayedNode:
    """``stage`` through ``relays`` (in order from the client)."""

    def __init__(self, pool: ConnectionPool, relays: Sequence[Node], stage: Node, limits: Limits = Limits()):
        if not relays:
            raise ValueError("a relayed route needs at least one relay")
        keys = [r.public_key for r in relays]
        if stage.public_key in keys:
            # A relay that served the session too would see both this client and the content.
            raise ValueError(f"relay {stage.name} is also a stage of the session; choose other relays")
        if len(set(keys)) != len(keys):
            raise ValueError("a relay appears twice on the path")
        self.relays, self.stage, self.limits = list(relays), stage, limits
        self.address = stage.address
        self._entry = pool.get(relays[0].address, relays[0].public_key)
        self._reply_key = nacl.public.PrivateKey.generate()  # names nobody: only its replies are sealed to it
        self._hops = [*self.relays[1:], stage]
        self._curve = [curve_key_of(n.public_key) for n in [*self.relays, stage]]
        self._ids = itertools.count(1)

    def wrap(self, request: Request) -> bytes:
        """The onion for ``request``: sealed to the stage, then to each relay from the last to the first."""
        inner = InnerRequest(reply_key=bytes(self._reply_key.public_key),
                             frames=[bytes(f) for f in encode_request(request)])
        blob = seal(self._curve[-1], inner)
        for i in reversed(range(len(self.relays))):
            nxt = self._hops[i]
            blob = seal(self._curve[i], HopLayer(address=nxt.address, public_key=nxt.public_key, sealed=blob,
                                                 deliver=nxt is self.stage))
        return blob

    async def open_stream(self, op: str, args: dict | None = None, tensors=(), timeout: float = 10.0) -> "SealedStream":
        blob = self.wrap(Request(id=next(self._ids), op=op, args=args or {}, tensors=list(tensors)))
        outer = await self._entry.open_stream(RELAY_FORWARD.name, to_wire(RelayArgs(blob)), timeout=timeout)
        return SealedStream(outer, self._reply_key, self.limits)

    async def send_oneway(self, op: str, args: dict | None = None, tensors=(), timeout: float = 10.0) -> None:
        blob = self.wrap(Request(id=next(self._ids), op=op, args=args or {}, tensors=list(tensors), oneway=True))
        await self._entry.send_oneway(RELAY_FORWARD.name, to_wire(RelayArgs(blob)), timeout=timeout)

    async def invoke(self, op, args=None, tensors=(), timeout: float = 10.0):
        stream = await self.open_stream(op.name, to_wire(args) if args is not None else {}, tensors, timeout)
        try:
            reply = await stream.next(timeout)
        finally:
            stream.close()
        try:
            return parse_reply(op.reply, reply.result), reply.tensors
        except WireError as exc:
            raise BadReply(f"{self.stage.name} (relayed) answered '{op.name}' with a {exc.message}") from None


class SealedStream:
    """A ReplyStream whose replies are the stage's, opened here: the same ``next``/``watch``/``ready``/
    ``take``/``close`` and errors (a stage's error arrives sealed and is raised as its RemoteError)."""

    def __init__(self, outer: ReplyStream, key: nacl.public.PrivateKey, limits: Limits):
        self._outer, self._key, self._limits = outer, key, limits

    @property
    def finished(self) -> bool:
        return self._outer.finished

    async def next(self, timeout: float) -> Reply:
        return self._unseal(await self._outer.next(timeout))

    def watch(self, arrived: Callable[[], None]) -> None:
        self._outer.watch(arrived)

    def ready(self) -> bool:
        return self._outer.ready()

    def take(self) -> Reply:
        return self._unseal(self._outer.take())

    def close(self) -> None:
        self._outer.close()

    def _unseal(self, outer: Reply) -> Reply:
        try:
            frames = open_frames(self._key, parse_reply(RelayReply, outer.result).sealed)
            reply = decode_reply(frames, self._limits)
        except (SealError, WireError) as exc:
            self.close()
            raise BadReply(f"a relayed reply that does not open: {getattr(exc, 'message', exc)}") from None
        return settle(reply, self.close)
