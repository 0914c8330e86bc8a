"""The node's side of the protocol: receive, authenticate, validate, dispatch, reply.

Each operation is declared once with the roles allowed to call it and the dataclass of its
arguments. Nothing reaches a handler before the message has been decoded and checked, and
nothing a handler raises escapes: bad input becomes a structured error, a bug becomes an
``internal`` error in the log, and the receive loop keeps going.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import zmq

from dllmd.net.keys import AuthorizedKey, AuthorizedKeys, Role
from dllmd.net.reactor import SocketReactor
from dllmd.net.roles import roles_of
from dllmd.net.schema import Op, parse_args, to_wire
from dllmd.net.wire import ErrorCode, Limits, Reply, Request, WireError, decode_request, encode_reply, error_reply
from dllmd.observe.metrics import NodeMetrics
from dllmd.storage.room import is_disk_full

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dllmd.server")


@dataclass
class Caller:
    """Who sent the request being handled (as authenticated by CURVE + ZAP)."""

    public_key: str
    role: Role
    name: str


class Responder:
    """Sends replies to one request, now or later: a final reply, or a stream of them.

    A handler that returns ``DEFERRED`` keeps its responder and answers later (a session's stream
    of generated tokens). For a one-way request every send is a no-op, but its outcome is still counted."""

    def __init__(self, server: "RpcServer", route: bytes, request_id: int, oneway: bool, peer: str = ""):
        self._server, self._route, self.request_id = server, route, request_id
        self.oneway = oneway  # a relay passes a one-way request on as one-way
        self.closed = oneway
        self.peer = peer  # the caller, as the metrics name it
        self.op = UNROUTED  # the operation's name once the request is known to be one this node serves
        self._counted = False

    def _outcome(self, code: str | None) -> None:
        if not self._counted:
            self._counted = True
            self._server.metrics.answered(self.op, code)

    def send(self, result, tensors: list[torch.Tensor] | None = None, more: bool = True) -> None:
        """``result`` is a reply dataclass or a plain map."""
        if not more:
            self._outcome(None)
        if self.closed:
            return
        self.closed = not more
        if not isinstance(result, dict):
            result = to_wire(result)
        self._server._reply(self._route, Reply(id=self.request_id, result=result, tensors=tensors or [], more=more),
                            self.peer)

    def fail(self, code: str, message: str) -> None:
        self._outcome(code)
        if self.closed:
            return
        self.closed = True
        self._server._reply(self._route, error_reply(self.request_id, code, message), self.peer)


UNROUTED = "unknown"  # the op label of a request that never reached an operation (undecodable, unknown op)
DEFERRED = object()  # returned by a handler that will answer through its Responder later


@dataclass
class Call:
    """What a handler receives."""

    caller: Caller
    args: Any
    tensors: list[torch.Tensor]
    responder: Responder


HandlerResult = Any  # a reply dataclass or map, or (that, list of tensors)
# A plain function runs inline (keep it fast, no I/O); a coroutine function gets its own task.
Handler = Callable[[Call], HandlerResult | Awaitable[HandlerResult]]


class HandlerError(Exception):
    """Raised by a handler to answer with a specific error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Operation:
    """A handler for one declared operation; the roles allowed to call it come from the role table
    (``dllmd.net.roles``). The handler returns the op's reply dataclass (or ``(reply, tensors)``, or
    DEFERRED); a plain map is taken as it is, for the operations whose replies are not typed yet."""

    op: Op
    handler: Handler
    roles: frozenset[Role] | None = None  # given: checked against the table, which decides

    def __post_init__(self) -> None:
        table = roles_of(self.op.name)
        if self.roles is not None and frozenset(self.roles) != table:
            raise ValueError(f"operation {self.op.name!r} is registered for roles "
                             f"{sorted(r.value for r in self.roles)}, the role table says "
                             f"{sorted(r.value for r in table)}")
        self.roles = table

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def args(self) -> type:
        return self.op.args


# What one caller may have in progress on a node at once (requests whose handlers have not finished,
# and the bytes they arrived with): one flooding key cannot hold the node's memory, and others are
# still served. Clients get less than the owner's keys and its cluster's peers, whose training
# traffic moves tens of MiB a message.
PEER_LABEL_HEX = 12  # an unnamed key's metrics label: a fingerprint, as 'dllmd keys' shows it

CALLER_BUDGET: dict[Role | None, tuple[int, int]] = {
    Role.ADMIN: (256, 1 << 30), Role.PEER: (256, 1 << 30),
    None: (64, 128 << 20),  # clients, federated coordinators
}


class RpcServer:
    """Serves a table of operations on a bound ROUTER socket.

    A plain-function handler runs inline, in the receive callback: the fast path for cheap
    operations (ping, echo, forwarding a hidden state to a compute queue). A coroutine handler
    gets a task of its own, so slow operations never hold up the socket.
    """

    def __init__(self, sock: zmq.Socket, keys: AuthorizedKeys, limits: Limits, max_in_flight: int = 256,
                 metrics: NodeMetrics | None = None):
        self.sock = sock
        self.metrics = metrics or NodeMetrics()  # requests, errors and bytes, counted here once for every op
        self.keys = keys
        self.limits = limits
        self.max_in_flight = max_in_flight
        self.operations: dict[str, Operation] = {}
        self._in_flight: set[asyncio.Task] = set()
        self._held: dict[str, list[int]] = {}  # caller key -> [requests in progress, their bytes]
        self._reactor: SocketReactor | None = None
        self.requests_served = 0

    def register(self, op: Operation) -> None:
        if op.name in self.operations:
            raise ValueError(f"operation {op.name!r} registered twice")
        self.operations[op.name] = op

    def start(self) -> None:
        self._reactor = SocketReactor(self.sock, self._accept)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let requests in progress finish, close the socket."""
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=timeout)
        if self._reactor is not None:
            self._reactor.close()

    def _accept(self, frames: list[zmq.Frame]) -> None:
        try:
            self._dispatch(frames)
        except Exception:  # the socket must survive anything a single message does
            log.exception("unexpected failure while accepting a message")

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return
        route = frames[0].bytes
        caller = self._caller(frames[1])
        if caller is None:
            # A key revoked after its connection was made: treat it like an unknown key, say nothing.
            return
        peer = caller.name or caller.public_key[:PEER_LABEL_HEX]
        size = sum(len(f.buffer) for f in frames[1:])
        self.metrics.traffic(peer, received=size)
        responder = Responder(self, route, 0, oneway=False, peer=peer)
        try:
            request = decode_request(frames[1:], self.limits)
            responder = Responder(self, route, request.id, request.oneway, peer)
            op = self._authorize(request, caller)
            responder.op = op.name
            call = Call(caller, parse_args(op.args, request.args), request.tensors, responder)
            if not inspect.iscoroutinefunction(op.handler):
                self._finish(responder, op.handler(call))
                return
            if len(self._in_flight) >= self.max_in_flight:
                raise WireError(ErrorCode.BUSY, "node is busy; retry later", request.id)
            held = self._held.setdefault(caller.public_key, [0, 0])
            count_cap, bytes_cap = CALLER_BUDGET.get(caller.role, CALLER_BUDGET[None])
            if held[0] >= count_cap or held[1] + size > bytes_cap:
                raise WireError(ErrorCode.BUSY, f"your key has {held[0]} requests ({held[1] / 2**20:.0f} MiB) in "
                                                f"progress here, its most; retry when they finish", request.id)
        except Exception as exc:
            self._fail(responder, exc)
            return
        held[0] += 1
        held[1] += size
        task = asyncio.ensure_future(self._run(op, call))
        self._in_flight.add(task)
        task.add_done_callback(lambda t, key=caller.public_key, size=size: self._done(t, key, size))

    async def serve_as(self, caller: Caller, request: Request, responder) -> None:
        """Run a request that arrived sealed inside another (``relay.deliver``) as if ``caller`` had sent it:
        the same role table, argument checks and error handling as a request off the socket. ``responder``
        is any object with Responder's ``send``/``fail``/``closed``/``request_id`` (one that seals replies)."""
        try:
            op = self._authorize(request, caller)
            call = Call(caller, parse_args(op.args, request.args), request.tensors, responder)
            outcome = op.handler(call)
            if inspect.isawaitable(outcome):
                outcome = await outcome
            self._finish(responder, outcome)
        except Exception as exc:
            self._fail(responder, exc)

    def _done(self, task: asyncio.Task, key: str, size: int) -> None:
        self._in_flight.discard(task)
        held = self._held[key]
        held[0] -= 1
        held[1] -= size
        if not held[0]:
            del self._held[key]

    def _caller(self, frame: zmq.Frame) -> Caller | None:
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        entry: AuthorizedKey | None = self.keys.by_public_key(user) if user else None
        if entry is None:
            return None
        return Caller(entry.public_key, entry.role, entry.name)

    def _authorize(self, request: Request, caller: Caller) -> Operation:
        op = self.operations.get(request.op)
        if op is None:
            raise WireError(ErrorCode.UNKNOWN_OP, f"unknown operation {request.op!r}", request.id)
        if caller.role not in op.roles:
            raise WireError(
                ErrorCode.FORBIDDEN,
                f"'{op.name}' needs role {' or '.join(sorted(r.value for r in op.roles))}; your key has '{caller.role.value}'",
                request.id,
            )
        return op

    async def _run(self, op: Operation, call: Call) -> None:
        try:
            self._finish(call.responder, await op.handler(call))
        except Exception as exc:
            self._fail(call.responder, exc)

    @staticmethod
    def _finish(responder: Responder, outcome: Any) -> None:
        if outcome is DEFERRED or responder.closed:  # closed from the start: a one-way request, no reply
            return
        result, tensors = outcome if isinstance(outcome, tuple) else (outcome, [])
        responder.send(result if isinstance(result, dict) else to_wire(result), tensors, more=False)

    @staticmethod
    def _fail(responder: Responder, exc: Exception) -> None:
        if isinstance(exc, (WireError, HandlerError)):
            if isinstance(exc, WireError) and exc.request_id and not responder.request_id:
                responder.request_id = exc.request_id  # decoding failed after the id was read
            if responder.closed:
                log.info("one-way request failed: %s", exc.message)
            responder.fail(exc.code, exc.message)
            return
        if is_disk_full(exc):  # the owner's to fix (free space), not a bug: no traceback
            log.warning("%s", exc)
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            responder.fail(ErrorCode.NO_SPACE, f"{exc.strerror}{where}")
            return
        log.error("operation failed", exc_info=exc)
        responder.fail(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _reply(self, route: bytes, reply: Reply, peer: str) -> None:
        self.requests_served += 1
        try:
            frames = encode_reply(reply)
        except Exception as exc:  # e.g. a handler returned a tensor dtype the wire cannot carry
            log.exception("could not encode a reply")
            frames = encode_reply(error_reply(reply.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        self.metrics.traffic(peer, sent=sum(memoryview(f).nbytes for f in frames))
        try:
            self._reactor.send([route, *frames])
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY: the caller went away (or stopped reading); nothing to do but note it.
            log.info("could not reply to a caller: %s", exc)
