"""The inviter's side of a pairing (``dllmctl nodes invite``): one pending invite, held in memory by
this process, and the pairing socket it listens on until a machine joins, the invite expires, or
wrong secrets burn it.

The socket is this process's, not a daemon's: the daemons' CURVE sockets keep refusing unknown keys.
It is rate limited (new connections per second, connections at once, one join at a time) and reads
at most ``MAX_JOINER_FRAME`` bytes a frame, so garbage and floods cost bounded memory and are
answered with a ``PairingError`` while the invite stays pending. Once the joiner proved the secret
and wrote the keys it was sent, the inviter authorizes its key on every registered node over the
normal admin operation (``keys.authorize``) and, for a peer, registers it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from dllmd.net.client import CallError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import Role
from dllmd.net.messages.node import KEYS_AUTHORIZE, AuthorizeArgs
from dllmd.pairing.channel import MAX_JOINER_FRAME, PairingFailed, Pake, pack, read_frame, unpack, write_frame
from dllmd.pairing.code import InviteCode
from dllmd.pairing.messages import (PROTOCOL, ClusterNode, Hello, JoinAck, JoinReply, JoinRequest, JoinResult,
                                    NodeFailure, PairingErrorCode, PakeReply)
from dllmctl.cluster.registry import NodeEntry, Registry, RegistryError, make_entry

log = logging.getLogger("dllmctl.invite")

MAX_FAILURES = 3  # wrong secrets before the invite is burnt
MAX_CONNECTIONS = 8  # handled at once; more are told 'busy' and closed
RATE_PER_S, BURST = 5.0, 10  # new connections handled (a token bucket); beyond, 'busy'
STEP_TIMEOUT_S = 10.0  # each message of the joiner's
ACK_TIMEOUT_S = 30.0  # the joiner writes its keys meanwhile
AUTHORIZE_TIMEOUT_S = 10.0  # per node


class InviteError(RuntimeError):
    """The invite cannot be made (the socket does not bind, no reachable address)."""


@dataclass
class InviteOutcome:
    """How the invite ended: ``used`` (with the node that joined), ``expired`` or ``burnt``."""

    state: str
    joined: JoinRequest | None = None
    result: JoinResult | None = None
    refused: dict[str, int] = field(default_factory=dict)  # pairing errors answered, by code


class _Bucket:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.tokens, self.at = rate, burst, float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def reachable_host(listen_host: str) -> str:
    """The address a machine on the LAN reaches this one at, for a socket on ``listen_host``: itself
    unless it is a wildcard, else the address of the interface the default route leaves by."""
    if listen_host not in ("0.0.0.0", "", "::"):
        return listen_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent by a UDP connect
            return probe.getsockname()[0]
        except OSError:
            raise InviteError("cannot tell this machine's LAN address; give --advertise HOST") from None


class PairingServer:
    """One invite with ``role``, served on ``host:port`` (port 0: a free one) until it ends."""

    def __init__(self, admin: Identity, registry_path: Path, role: Role, ttl_s: float, host: str, port: int,
                 advertise: str | None = None, admin_name: str = "dllmctl admin"):
        self.admin, self.registry_path, self.role, self.ttl_s = admin, registry_path, role, ttl_s
        self.host, self.port, self.advertise, self.admin_name = host, port, advertise, admin_name
        self.code: InviteCode | None = None
        self.state = "pending"  # -> claimed (a join in progress) -> used; or expired, burnt
        self.failures = 0
        self.outcome = InviteOutcome("pending")
        self._active = 0
        self._bucket = _Bucket(RATE_PER_S, BURST)
        self._done = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()  # the connections being handled

    async def start(self) -> InviteCode:
        """Bind the pairing socket and make the code (which names the port it bound)."""
        try:
            self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=MAX_JOINER_FRAME)
        except OSError as exc:
            raise InviteError(f"cannot listen on {self.host}:{self.port} for the pairing: {exc}") from None
        port = self._server.sockets[0].getsockname()[1]
        self.code = InviteCode.new(self.advertise or reachable_host(self.host), port, self.admin.public_key, self.ttl_s)
        return self.code

    async def wait(self) -> InviteOutcome:
        """Serve until the invite is used, burnt or expired; then stop listening."""
        try:
            await asyncio.wait_for(self._done.wait(), max(0.0, self.code.expires_at - time.time()))
        except TimeoutError:
            if self.state == "claimed":  # a join that proved the secret in time may finish
                try:
                    await asyncio.wait_for(self._done.wait(), ACK_TIMEOUT_S + 2 * AUTHORIZE_TIMEOUT_S)
                except TimeoutError:
                    pass
            if not self._done.is_set():
                self._end("expired")
        await self.stop()
        return self.outcome

    async def stop(self) -> None:
        """Stop listening and drop the connections still open."""
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _end(self, state: str) -> None:
        self.state = self.outcome.state = state
        self._done.set()

    # --- one connection ---------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        admitted = self._active < MAX_CONNECTIONS and self._bucket.take()
        self._active += 1
        try:
            if not admitted:
                raise PairingFailed(PairingErrorCode.BUSY, "too many pairing connections; try again in a moment")
            await self._pair(reader, writer)
        except PairingFailed as exc:
            self.outcome.refused[exc.code] = self.outcome.refused.get(exc.code, 0) + 1
            log.info("pairing refused: %s (%s)", exc.code, exc.message)
            await _send_quietly(writer, False, pack(exc.to_message()))
        except (ConnectionError, OSError) as exc:
            log.info("pairing connection lost: %s", exc)
        except asyncio.CancelledError:
            # The invite ended (wait() cancels what is left): the connection is dropped. Ending the task
            # normally keeps asyncio's stream callback from logging the cancellation as an error.
            pass
        finally:
            self._tasks.discard(asyncio.current_task())
            self._active -= 1
            if self.state == "claimed":  # the join did not finish: the invite is still pending
                self.state = "pending"
            writer.close()

    def _refuse_unless_pending(self) -> None:
        if self.state == "pending":
            return
        if self.state == "claimed":
            raise PairingFailed(PairingErrorCode.BUSY, "another machine is joining with this invite right now")
        messages = {"used": "this invite was used already", "expired": "this invite has expired",
                    "burnt": "this invite was burnt by wrong secrets"}
        raise PairingFailed({"used": PairingErrorCode.USED, "expired": PairingErrorCode.EXPIRED,
                             "burnt": PairingErrorCode.BURNT}[self.state],
                            messages[self.state] + "; ask for a new one ('dllmctl nodes invite')")

    async def _pair(self, reader, writer) -> None:
        self._refuse_unless_pending()
        hello = unpack((await read_frame(reader, MAX_JOINER_FRAME, STEP_TIMEOUT_S)).body, Hello)
        if hello.protocol != PROTOCOL:
            raise PairingFailed(PairingErrorCode.BAD_MESSAGE, f"pairing protocol {hello.protocol}; this dllmctl speaks {PROTOCOL}")
        pake = Pake(self.code.password(), joiner=False)
        channel = pake.finish(hello.pake)
        await write_frame(writer, False, pack(PakeReply(pake.message)))
        frame = await read_frame(reader, MAX_JOINER_FRAME, STEP_TIMEOUT_S)
        self._refuse_unless_pending()  # another join may have claimed it meanwhile
        try:
            request = channel.open(frame, JoinRequest, PairingErrorCode.WRONG_SECRET)
        except PairingFailed as exc:
            if exc.code == PairingErrorCode.WRONG_SECRET:
                self._wrong_secret()
            raise
        entry = self._check(request)
        self.state = "claimed"
        await write_frame(writer, True, channel.seal(self._offer(request.public_key)))
        ack = channel.open(await read_frame(reader, MAX_JOINER_FRAME, ACK_TIMEOUT_S), JoinAck, PairingErrorCode.BAD_MESSAGE)
        if not ack.ok:
            raise PairingFailed(PairingErrorCode.REFUSED, f"the joiner could not trust the cluster: {ack.message}")
        result = await self._enroll(request, entry)
        self.outcome.joined, self.outcome.result = request, result
        self.state = "used"
        try:
            await _send_quietly(writer, True, channel.seal(result))
        finally:
            self._end("used")  # after the last word: the process exits once the invite ends

    def _wrong_secret(self) -> None:
        self.failures += 1
        left = MAX_FAILURES - self.failures
        if left <= 0:
            self._end("burnt")
            raise PairingFailed(PairingErrorCode.BURNT, "wrong secret; the invite is burnt after "
                                                        f"{MAX_FAILURES} wrong attempts", 0)
        raise PairingFailed(PairingErrorCode.WRONG_SECRET, "wrong secret: the code is not this invite's", left)

    def _check(self, request: JoinRequest) -> NodeEntry:
        """The new node's registry entry, refused if its key, name or endpoint will not do."""
        if request.public_key.lower() == self.admin.public_key:
            raise PairingFailed(PairingErrorCode.REFUSED, "the joining node's key is the admin's own")
        try:
            entry = make_entry(request.name, request.endpoint, request.public_key)
            if self.role == Role.PEER:  # a client is not registered: its name is only a label on the nodes
                registry = Registry(self.registry_path)
                taken = registry.nodes.get(entry.name)
                if taken is not None and taken.public_key != entry.public_key:
                    raise PairingFailed(PairingErrorCode.CONFLICT, f"a node named {entry.name!r} is already "
                                                                   f"registered; rename this node in its node.toml")
                registry.add(entry, replace=True)  # what saving it would say (the key under another name...)
        except RegistryError as exc:
            raise PairingFailed(PairingErrorCode.REFUSED, str(exc)) from None
        return entry

    def _offer(self, joiner_key: str) -> JoinReply:
        nodes = [ClusterNode(e.name, e.address, e.public_key) for e in Registry(self.registry_path).select(None)
                 if e.public_key != joiner_key] if self.role == Role.PEER else []
        return JoinReply(self.admin.public_key, self.admin_name, self.role.value, nodes)

    async def _enroll(self, request: JoinRequest, entry: NodeEntry) -> JoinResult:
        """Authorize the new key on every registered node, then register it (a peer only)."""
        registry = Registry(self.registry_path)
        nodes = [e for e in registry.select(None) if e.public_key != entry.public_key]
        ctx = zmq.Context()
        try:
            errors = await asyncio.gather(*(self._authorize_on(node, entry, ctx) for node in nodes))
        finally:
            ctx.destroy(linger=0)
        if self.role == Role.PEER:
            registry.add(entry, replace=True)
            registry.save()
        return JoinResult(registered_as=entry.name if self.role == Role.PEER else "",
                          authorized_on=[n.name for n, e in zip(nodes, errors) if e is None],
                          failed=[NodeFailure(n.name, e) for n, e in zip(nodes, errors) if e is not None])

    async def _authorize_on(self, node: NodeEntry, entry: NodeEntry, ctx: zmq.Context) -> str | None:
        async with RpcClient(self.admin, node.address, node.public_key, ctx=ctx) as client:
            try:
                await client.invoke(KEYS_AUTHORIZE, AuthorizeArgs(entry.public_key, self.role.value, entry.name),
                                    timeout=AUTHORIZE_TIMEOUT_S)
            except CallError as exc:
                return str(exc)[:1000]
        return None


async def _send_quietly(writer: asyncio.StreamWriter, sealed: bool, body: bytes) -> None:
    """A last word to a connection that may be gone already."""
    try:
        await asyncio.wait_for(write_frame(writer, sealed, body), 2.0)
    except (ConnectionError, OSError, TimeoutError):
        pass



