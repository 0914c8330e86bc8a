"""Calling a node: request/response over one encrypted DEALER, many calls in flight at once.

``RpcClient`` is used by dllmctl and by daemons calling their peers. It tells apart the ways a
call can fail, because the user needs different advice for each:

* ``NodeUnauthorized``: the node refused our key during the handshake (ZAP said no);
* ``NodeKeyMismatch``: the handshake failed otherwise, usually because the node's key is not the
  one we pinned;
* ``NodeUnreachable``: no connection was ever established before the deadline;
* ``CallTimeout``: connected, but no reply before the deadline;
* ``RemoteError``: the node answered with a structured error (branch on its ``code``);
* ``BadReply``: the node answered, but not in the shape the operation declares.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import zmq
from zmq.utils.monitor import parse_monitor_message

from dllmd.net.identity import Identity
from dllmd.net.reactor import SocketReactor
from dllmd.net.transport import connect_dealer
from dllmd.net.schema import A, Op, R, parse_reply, to_wire
from dllmd.net.wire import Limits, Reply, Request, WireError, decode_reply, encode_request

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dllmd.client")


class CallError(Exception):
    """Base of everything a call can raise."""


class NodeUnreachable(CallError):
    pass


class NodeUnauthorized(CallError):
    pass


class PeerNotAuthorized(CallError):
    """This node refuses to dial a key it has not authorized for that traffic: nothing was sent."""


class NodeKeyMismatch(CallError):
    pass


class CallTimeout(CallError):
    pass


class BadReply(CallError):
    """The node answered, but not in the shape its operation declares (a bug or a hostile node)."""


class RemoteError(CallError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_AUTH_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class RpcClient:
    """An encrypted connection to one node. Use as ``async with RpcClient(...) as c``; create it
    inside a running event loop."""

    def __init__(
        self,
        identity: Identity,
        address: str,
        server_public_key: str,
        ctx: zmq.Context | None = None,
        limits: Limits = Limits(),
    ):
        self.address = address
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        sock = connect_dealer(ctx or zmq.Context.instance(), identity, address, server_public_key)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | _AUTH_FAILED | _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED
        )
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._streams: dict[int, _Inbox] = {}
        self.connected = asyncio.Event()
        self.handshake_ok = False
        self.lost = False  # the connection was up and dropped, and has not come back yet
        self.failure: CallError | None = None
        self._reactor = SocketReactor(sock, self._on_reply)
        self._monitor = SocketReactor(monitor, self._on_event)

    async def __aenter__(self) -> "RpcClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for inbox in self._streams.values():
            inbox.put(NodeUnreachable(f"connection to {self.address} closed"))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(NodeUnreachable(f"connection to {self.address} closed"))
        self._pending.clear()
        try:
            self._reactor.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close()
        self._reactor.close()

    def _on_event(self, frames: list) -> None:
        """Follow handshake events so failures are reported fast and precisely."""
        event = parse_monitor_message([f.bytes for f in frames])["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshake_ok, self.failure, self.lost = True, None, False
            self.connected.set()
        elif event == _AUTH_FAILED:
            self._fail_all(NodeUnauthorized(f"{self.address} refused our key: it is not authorized on that node"))
        elif event & _HANDSHAKE_FAILED:
            self._fail_all(
                NodeKeyMismatch(f"encrypted handshake with {self.address} failed: is the node's public key right?")
            )
        elif event == zmq.EVENT_DISCONNECTED:
            self.handshake_ok, self.lost = False, True
            self.connected.clear()
            # The node's ROUTER will know a reconnected socket by a new routing id: replies and
            # streams addressed to the old one are lost. Fail them now rather than at their deadline.
            lost = NodeUnreachable(f"connection to {self.address} was lost")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(lost)
            for inbox in self._streams.values():
                inbox.put(lost)

    def _fail_all(self, error: CallError) -> None:
        self.failure = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        for inbox in self._streams.values():
            inbox.put(error)

    def _on_reply(self, frames: list) -> None:
        try:
            reply = decode_reply(frames, self.limits)
        except WireError as exc:
            log.warning("dropping malformed reply from %s: %s", self.address, exc.message)
            return
        inbox = self._streams.get(reply.id)
        if inbox is not None:
            inbox.put(reply)
            return
        fut = self._pending.pop(reply.id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    async def _send(self, frames: list, deadline: float) -> None:
        """Send once a connection exists (IMMEDIATE makes zmq refuse before that)."""
        while True:
            try:
                self._reactor.send(frames)
                return
            except zmq.Again:
                if self.failure is not None:
                    raise self.failure from None
                if self.lost:  # the node went away: say so now, the caller may have a replica
                    raise NodeUnreachable(f"connection to {self.address} was lost")
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    raise TimeoutError from None
                self.connected.clear()
                try:
                    # Woken by a handshake, or re-check every 50 ms (a reconnect may not signal).
                    await asyncio.wait_for(self.connected.wait(), min(remaining, 0.05))
                except TimeoutError:
                    pass

    async def request(
        self, op: str, args: dict | None = None, tensors: Sequence[torch.Tensor] = (), timeout: float = 10.0
    ) -> Reply:
        """Send one request and wait for its reply (success or structured error)."""
        return await (await self.request_sent(op, args, tensors, timeout))

    async def request_sent(
        self, op: str, args: dict | None = None, tensors: Sequence[torch.Tensor] = (), timeout: float = 10.0
    ) -> Awaitable[Reply]:
        """Send one request; once it is sent, return what awaits its reply (``request``'s errors, its
        ``timeout`` counted from now). Requests sent one after another on this connection arrive in
        that order, so a caller can send the next before the last is answered."""
        if self.failure is not None and not self.handshake_ok:
            raise self.failure
        request_id = next(self._ids)
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self._pending[request_id] = fut
        frames = encode_request(Request(id=request_id, op=op, args=args or {}, tensors=list(tensors)))
        deadline = self.loop.time() + timeout
        expiry = self.loop.call_at(deadline, lambda: fut.done() or fut.set_exception(TimeoutError()))

        def done() -> None:
            expiry.cancel()
            self._pending.pop(request_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # failed while we were still sending: mark the error as seen

        def timed_out() -> CallError:
            if self.failure is not None:
                return self.failure
            if not self.handshake_ok:
                return NodeUnreachable(f"no connection to {self.address} within {timeout:g}s: is the node up?")
            return CallTimeout(f"{self.address} did not answer '{op}' within {timeout:g}s")

        try:
            await self._send(frames, deadline)
        except TimeoutError:
            done()
            raise timed_out() from None
        except BaseException:
            done()
            raise

        async def reply() -> Reply:
            try:
                return await fut
            except TimeoutError:
                raise timed_out() from None
            finally:
                done()

        return reply()

    async def call(
        self, op: str, args: dict | None = None, tensors: Sequence[torch.Tensor] = (), timeout: float = 10.0
    ) -> tuple[dict, list[torch.Tensor]]:
        """Like ``request`` but returns ``(result, tensors)`` and raises RemoteError on an error reply."""
        reply = await self.request(op, args, tensors, timeout)
        if reply.error is not None:
            raise RemoteError(reply.error["code"], reply.error["message"])
        return reply.result or {}, reply.tensors

    async def invoke(self, op: Op[A, R], args: A | None = None, tensors: Sequence[torch.Tensor] = (),
                     timeout: float = 10.0) -> tuple[R, list[torch.Tensor]]:
        """Call a declared operation: typed arguments in, its typed reply (checked) out. Raises
        RemoteError for an error reply, and BadReply when the node's answer does not fit the reply type."""
        result, out = await self.call(op.name, to_wire(args) if args is not None else {}, tensors, timeout)
        try:
            return parse_reply(op.reply, result), out
        except WireError as exc:
            raise BadReply(f"{self.address} answered '{op.name}' with a {exc.message}") from None

    async def send_oneway(self, op: str, args: dict | None = None, tensors: Sequence[torch.Tensor] = (),
                          timeout: float = 10.0) -> None:
        """Send a request the node will not answer (it reports failures elsewhere)."""
        frames = encode_request(Request(id=next(self._ids), op=op, args=args or {}, tensors=list(tensors), oneway=True))
        try:
            await self._send(frames, self.loop.time() + timeout)
        except TimeoutError:
            raise self.failure or NodeUnreachable(f"no connection to {self.address} within {timeout:g}s") from None

    async def open_stream(self, op: str, args: dict | None = None, tensors: Sequence[torch.Tensor] = (),
                          timeout: float = 10.0) -> "ReplyStream":
        """Send a request whose replies arrive as a stream (until one without ``more``)."""
        request_id = next(self._ids)
        inbox = self._streams[request_id] = _Inbox()
        frames = encode_request(Request(id=request_id, op=op, args=args or {}, tensors=list(tensors)))
        try:
            await self._send(frames, self.loop.time() + timeout)
        except (TimeoutError, CallError) as exc:
            self._streams.pop(request_id, None)
            if isinstance(exc, CallError):
                raise
            raise self.failure or NodeUnreachable(f"no connection to {self.address} within {timeout:g}s") from None
        return ReplyStream(self, request_id, inbox)


class _Inbox:
    """Where one stream's replies wait; its watcher, if any, hears of each arrival."""

    def __init__(self):
        self.queue: asyncio.Queue[Reply | CallError] = asyncio.Queue()
        self.watcher: Callable[[], None] | None = None

    def put(self, item: Reply | CallError) -> None:
        self.queue.put_nowait(item)
        if self.watcher is not None:
            self.watcher()


class ReplyStream:
    """Replies to one streaming request, in order. ``next()`` raises RemoteError for an error
    reply, the connection's CallError if it failed, and CallTimeout when nothing came in time."""

    def __init__(self, client: RpcClient, request_id: int, inbox: _Inbox):
        self.client, self.request_id, self._inbox = client, request_id, inbox
        self.finished = False

    async def next(self, timeout: float) -> Reply:
        if self.finished:
            raise RemoteError("closed", "the stream has ended")
        try:
            item = await asyncio.wait_for(self._inbox.queue.get(), timeout)
        except TimeoutError:
            raise CallTimeout(f"{self.client.address} sent nothing for {timeout:g}s") from None
        return self._unwrap(item)

    def watch(self, arrived: Callable[[], None]) -> None:
        """Call ``arrived`` whenever a reply (or the connection's failure) comes in: a caller waiting
        on several streams waits once, on its own signal, instead of on a task per stream."""
        self._inbox.watcher = arrived

    def ready(self) -> bool:
        return not self.finished and not self._inbox.queue.empty()

    def take(self) -> Reply:
        """The reply that has arrived (see ``ready``), without waiting."""
        if self.finished:
            raise RemoteError("closed", "the stream has ended")
        return self._unwrap(self._inbox.queue.get_nowait())

    def _unwrap(self, item: Reply | CallError) -> Reply:
        if isinstance(item, CallError):
            self.close()
            raise item
        return settle(item, self.close)

    def close(self) -> None:
        self.finished = True
        self.client._streams.pop(self.request_id, None)


def settle(reply: Reply, close: Callable[[], None]) -> Reply:
    """One reply of a stream: raised as RemoteError if it is an error, ``close`` called if it is the last."""
    if reply.error is not None:
        close()
        raise RemoteError(reply.error["code"], reply.error["message"])
    if not reply.more:
        close()
    return reply
