"""Relayed session traffic at a daemon: passing sealed layers on (``relay.forward``, on nodes with
``relay = true``) and running the session request inside the innermost layer (``relay.deliver``, on
every node that serves sessions).

A relay opens only its own layer: the next hop's address and key, and a blob sealed to that hop. It
never sees the session's operation, arguments, tensors or replies; the stage never sees the client's
key (its caller is the last relay, with a client's rights). docs/security.md says what each learns.
Replies come back on the stream of the request: the stage seals each to the client's reply key, and
every relay passes it on unopened, in order, until the last.
"""

from __future__ import annotations

import logging

import nacl.public

from dllmd.config import validate_endpoint
from dllmd.net.client import CallError, CallTimeout, RemoteError
from dllmd.net.identity import Identity, InvalidKey, parse_public_key
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages.inference import SESSION_CLOSE, SESSION_FORWARD, SESSION_KEEPALIVE, SESSION_OPEN
from dllmd.net.messages.relay import (RELAY_DELIVER, RELAY_FORWARD, HopLayer, InnerRequest, RelayArgs,
                                      RelayReply)
from dllmd.net.pool import ConnectionPool
from dllmd.net.schema import parse_reply, to_wire
from dllmd.net.sealing import SealError, open_sealed, private_key_of, seal_frames
from dllmd.net.server import DEFERRED, Call, HandlerError, Operation, Responder, RpcServer
from dllmd.net.wire import ErrorCode, Limits, Reply, WireError, decode_request, encode_reply, error_reply

log = logging.getLogger("dllmd.relay")

# What a relayed request may run at its stage: the session operations, nothing else.
DELIVERABLE = frozenset({SESSION_OPEN.name, SESSION_FORWARD.name, SESSION_CLOSE.name, SESSION_KEEPALIVE.name})
OPEN_TIMEOUT_S = 30.0
ONEWAY_TIMEOUT_S = 2.0
# A relayed stream with nothing for this long is over: no session outlives its TTL (at most an hour).
STREAM_IDLE_S = 3600.0


class SealedResponder:
    """The responder a relayed request's handler answers through: each reply (a session's stream of
    tokens too) is encoded as the wire would, sealed to the client's reply key, and sent on the
    ``relay.deliver`` stream, so the relays on the way back carry it unread."""

    def __init__(self, outer: Responder, request_id: int, reply_key: nacl.public.PublicKey, oneway: bool):
        self._outer, self.request_id, self._key = outer, request_id, reply_key
        self.closed = oneway or outer.closed

    def send(self, result, tensors=None, more: bool = True) -> None:
        if self.closed:
            return
        self.closed = not more
        if not isinstance(result, dict):
            result = to_wire(result)
        self._pass(Reply(id=self.request_id, result=result, tensors=list(tensors or []), more=more), more)

    def fail(self, code: str, message: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._pass(error_reply(self.request_id, code, message), False)

    def _pass(self, reply: Reply, more: bool) -> None:
        try:
            frames = encode_reply(reply)
        except Exception as exc:  # e.g. a tensor dtype the wire cannot carry: say so, sealed like the rest
            log.exception("could not encode a relayed reply")
            frames = encode_reply(error_reply(reply.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        self._outer.send(RelayReply(sealed=seal_frames(self._key, frames)), more=more)


class RelayService:
    def __init__(self, identity: Identity, keys: AuthorizedKeys, pool: ConnectionPool, server: RpcServer,
                 limits: Limits, enabled: bool):
        self.own_key = identity.public_key
        self._secret = private_key_of(identity)
        self.keys, self.pool, self.server, self.limits = keys, pool, server, limits
        self.enabled = enabled  # relay = true in node.toml: relay.forward passes layers on

    def register(self, server: RpcServer) -> None:
        server.register(Operation(RELAY_FORWARD, self._forward))
        server.register(Operation(RELAY_DELIVER, self._deliver))

    # --- at a relay ------------------------------------------------------------------------------

    async def _forward(self, call: Call):
        """Open this relay's layer and pass the rest to the hop it names; stream the replies back."""
        if not self.enabled:
            raise HandlerError(ErrorCode.UNAVAILABLE, "this node is not a relay (relay = true in its node.toml)")
        hop = self._open(call.args.sealed, HopLayer)
        try:
            key = parse_public_key(hop.public_key).hex()
            validate_endpoint(hop.address)
        except (InvalidKey, ValueError) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"relay layer: {exc}") from None
        if key == self.own_key:
            # A relay that were also the stage (or its own next relay) would see both the client and the content.
            raise HandlerError(ErrorCode.CONFLICT, "a relay is never its own next hop nor a stage of the session "
                                                   "it relays")
        if not self.keys.authorized_as(key, (Role.PEER, Role.RELAY)):
            # As everywhere: no outbound connection to a key the owner has not authorized.
            raise HandlerError(ErrorCode.FORBIDDEN, "the next hop's key is not authorized on this relay "
                                                    "(as peer or relay)")
        op = RELAY_DELIVER if hop.deliver else RELAY_FORWARD
        client = self.pool.get(hop.address, key)
        args = to_wire(RelayArgs(sealed=hop.sealed))
        try:
            if call.responder.oneway:
                await client.send_oneway(op.name, args, timeout=ONEWAY_TIMEOUT_S)
                return None
            stream = await client.open_stream(op.name, args, timeout=OPEN_TIMEOUT_S)
        except CallError as exc:
            raise HandlerError(ErrorCode.UNAVAILABLE, f"the relay's next hop did not take the request: {exc}") from None
        try:
            await self._pass_back(stream, call.responder)
        finally:
            stream.close()
        return DEFERRED

    @staticmethod
    async def _pass_back(stream, responder: Responder) -> None:
        """Every reply of the next hop, unopened and in order, until its last (or its error)."""
        while not responder.closed:
            try:
                reply = await stream.next(timeout=STREAM_IDLE_S)
                sealed = parse_reply(RelayReply, reply.result).sealed
            except RemoteError as exc:  # a relay or stage further on refused the request: its code, as it said
                responder.fail(exc.code, exc.message)
                return
            except CallTimeout:
                responder.fail(ErrorCode.UNAVAILABLE, f"the relayed stream was idle for {STREAM_IDLE_S:g}s")
                return
            except CallError as exc:
                responder.fail(ErrorCode.UNAVAILABLE, f"the relay's next hop went away: {exc}")
                return
            except WireError as exc:
                responder.fail(ErrorCode.BAD_MESSAGE, f"the relay's next hop answered with a {exc.message}")
                return
            responder.send(RelayReply(sealed=sealed), more=reply.more)

    # --- at a stage ----------------------------------------------------------------------------

    async def _deliver(self, call: Call):
        """Open the innermost layer and run its session request as the caller (the last relay) sent it."""
        inner = self._open(call.args.sealed, InnerRequest)
        try:
            reply_key = nacl.public.PublicKey(inner.reply_key)
            request = decode_request(inner.frames, self.limits)
        except (WireError, ValueError, TypeError) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"the sealed request: {getattr(exc, 'message', exc)}") from None
        if request.op not in DELIVERABLE:
            raise HandlerError(ErrorCode.FORBIDDEN, "a relayed request runs session operations only")
        if request.oneway != call.responder.oneway:  # else a stream would wait for replies that never come
            raise HandlerError(ErrorCode.BAD_ARGS, "a relayed request is one-way exactly when its relay.deliver is")
        responder = SealedResponder(call.responder, request.id, reply_key, request.oneway)
        await self.server.serve_as(call.caller, request, responder)
        return DEFERRED

    def _open(self, blob: bytes, cls):
        try:
            return open_sealed(self._secret, blob, cls)
        except SealError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
