"""Admin-only operations that measure this node's training ring: ``dllmctl bench allreduce``.

``ring.open`` binds a ring socket (AES-GCM links, or plaintext where node.toml allows it) and says
where; ``ring.form`` joins the ring the caller describes; ``ring.run`` times all-reduces of a float32
buffer (by the ring, the tree, or whichever ``allreduce`` picks), every rank filled with ``rank + 1``
so that the sum, n(n+1)/2, is checked on every element; ``ring.close`` lets the socket go. The same
``RingSocket`` and ``allreduce`` as a training job, so the figures are the ones training gets.

A rank accepts links only for the generation it has joined (a member that dials earlier is
refused and dials again), so a caller forms the ring on every member before it runs on any (as a
training coordinator does). ``ring.run`` forms it too when ``ring.form`` did not form exactly that
ring already: enough for a caller that knows every member has joined by other means.

A socket left open (a client that died between open and close) closes itself after
``IDLE_CLOSE_S`` without a run, and in any case when the daemon stops: an open socket would hold
up its port.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psutil
import torch

from dllmd.config import WILDCARD_HOSTS, NodeConfig, bind_host, listen_host
from dllmd.net.identity import Identity, InvalidKey, parse_public_key
from dllmd.net.keys import AuthorizedKeys
from dllmd.net.messages.ringbench import RING_CLOSE, RING_FORM, RING_OPEN, RING_RUN, FormArgs, RunArgs
from dllmd.net.server import Call, HandlerError, Operation, RpcServer
from dllmd.net.wire import ErrorCode
from dllmd.train.allreduce import ALGORITHMS, allreduce, pick
from dllmd.train.ring import RingError, RingMember, RingSocket, bucket_size

log = logging.getLogger("dllmd.ringbench")

MIN_BUCKET_BYTES = 4096
IDLE_CLOSE_S = 120.0


class RingBenchOps:
    def __init__(self, identity: Identity, keys: AuthorizedKeys, config: NodeConfig):
        self.identity, self.keys, self.config = identity, keys, config
        self._ring: RingSocket | None = None
        self._running = False
        self._idle: asyncio.TimerHandle | None = None
        self._formed: tuple | None = None  # (generation, rank, members) of the ring formed on this socket
        self._spent = 0  # the generation of the last run on this socket: its stray data may still arrive

    def register(self, server: RpcServer) -> None:
        for op, handler in ((RING_OPEN, self._open), (RING_FORM, self._form), (RING_RUN, self._run),
                            (RING_CLOSE, self._close)):
            server.register(Operation(op, handler))

    def stop(self) -> None:
        """Close the ring socket, if one is open (the daemon calls this when it stops)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._formed = None
        self._spent = 0

    def _arm_idle_close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._close_idle)

    def _close_idle(self) -> None:
        self._idle = None
        if self._ring is not None and not self._running:
            log.info("closing the benchmark ring socket: unused for %.0f s", IDLE_CLOSE_S)
            self.stop()

    # --- operations ---------------------------------------------------------------------------

    async def _open(self, call: Call) -> dict:
        plaintext = call.args.plaintext
        if plaintext and not self.config.allow_plaintext_ring:
            raise HandlerError(ErrorCode.BAD_ARGS, f"node {self.config.name} does not allow a plaintext ring: set "
                                                   f"allow_plaintext_ring = true in its node.toml (trusted links only)")
        if self._running:
            raise HandlerError(ErrorCode.CONFLICT, "a ring benchmark is running on this node")
        self.stop()
        host = listen_host(self.config.listen)
        try:
            self._ring = RingSocket(self.identity, bind_host(self.config.listen), port=self.config.ring_port,
                                    plaintext=plaintext, authorized=self.keys.admits)
        except OSError as exc:
            raise HandlerError(ErrorCode.UNAVAILABLE, f"cannot bind the ring socket on {host}:"
                                                      f"{self.config.ring_port or '*'}: {exc}") from None
        self._arm_idle_close()
        endpoint = self._ring.endpoint
        log.info("%s ring socket open on %s for %s", "plaintext" if plaintext else "encrypted", endpoint,
                 call.caller.name or call.caller.public_key[:12])
        # Bound on every interface, the endpoint names 0.0.0.0: callers put the node's own host there.
        return {"endpoint": endpoint, "port": int(endpoint.rsplit(":", 1)[1]), "plaintext": plaintext,
                "wildcard": host in WILDCARD_HOSTS}

    async def _close(self, call: Call) -> dict:
        was_open = self._ring is not None
        self.stop()
        return {"closed": was_open}

    async def _form(self, call: Call) -> dict:
        a: FormArgs = call.args
        ring = self._open_ring()
        members = self._members(a)
        self._join(ring, a.generation, a.rank, members)
        self._arm_idle_close()
        return {"generation": a.generation, "rank": a.rank, "size": len(members)}

    def _open_ring(self) -> RingSocket:
        if self._ring is None:
            raise HandlerError(ErrorCode.CONFLICT, "no ring socket is open on this node: call ring.open first")
        if self._running:
            raise HandlerError(ErrorCode.CONFLICT, "a ring benchmark is already running on this node")
        return self._ring

    def _join(self, ring: RingSocket, generation: int, rank: int, members: list[RingMember]) -> None:
        if generation <= self._spent:
            raise HandlerError(ErrorCode.CONFLICT, f"generation {generation} is spent on this socket (the last run "
                                                   f"was generation {self._spent}): use a higher one")
        formed = (generation, rank, tuple(members))
        if self._formed != formed:
            size = len(members)
            ring.form(generation, members[(rank - 1) % size], members[(rank + 1) % size], members, rank)
            self._formed = formed

    def _members(self, a: FormArgs | RunArgs) -> list[RingMember]:
        if len(a.members) < 2:
            raise HandlerError(ErrorCode.BAD_ARGS, "a ring needs at least 2 members")
        if a.rank >= len(a.members):
            raise HandlerError(ErrorCode.BAD_ARGS, f"rank {a.rank} is not below the member count {len(a.members)}")
        members = []
        for i, m in enumerate(a.members):
            try:
                key = parse_public_key(m.public_key).hex()
            except InvalidKey as exc:
                raise HandlerError(ErrorCode.BAD_ARGS, f"members[{i}].public_key: {exc}") from None
            if not m.endpoint.startswith("tcp://"):
                raise HandlerError(ErrorCode.BAD_ARGS, f"members[{i}].endpoint must be tcp://HOST:PORT")
            members.append(RingMember(key, m.endpoint))
        if len({m.public_key for m in members}) != len(members):
            raise HandlerError(ErrorCode.BAD_ARGS, "every member of a ring is a different node")
        if members[a.rank].public_key != self.identity.public_key:
            raise HandlerError(ErrorCode.BAD_ARGS, f"members[{a.rank}] is not this node (its public key differs)")
        return members

    async def _run(self, call: Call) -> dict:
        a: RunArgs = call.args
        ring = self._open_ring()
        members = self._members(a)
        size, rank = len(members), a.rank
        if 0 < a.bucket_bytes < MIN_BUCKET_BYTES:
            raise HandlerError(ErrorCode.BAD_ARGS, f"bucket_bytes must be 0 (the ring's default) or at least "
                                                   f"{MIN_BUCKET_BYTES}")
        if a.algorithm not in ALGORITHMS:
            raise HandlerError(ErrorCode.BAD_ARGS, f"algorithm must be one of {', '.join(ALGORITHMS)}")
        bucket_bytes = bucket_size(ring, a.bucket_bytes)
        nbytes = a.elements * 4
        available = psutil.virtual_memory().available
        if nbytes > available // 2:
            raise HandlerError(ErrorCode.TOO_LARGE, f"a buffer of {nbytes} bytes is more than half of this node's "
                                                    f"free memory ({available} bytes)")
        self._join(ring, a.generation, rank, members)
        self._running, self._spent = True, a.generation
        if self._idle is not None:
            self._idle.cancel()
        try:
            buffer = await asyncio.to_thread(torch.empty, a.elements, dtype=torch.float32)
            algorithm = pick(ring, buffer, size, a.algorithm)
            expected = float(size * (size + 1) // 2)  # exact in float32 for any ring of <= 64 members
            seconds, bytes_sent = [], 0
            started = time.perf_counter()
            for i in range(1 + a.iterations):  # the first is a warm-up: connections, allocator
                await asyncio.to_thread(buffer.fill_, rank + 1)
                try:
                    stats = await allreduce(ring, buffer, rank, size, step=i, algorithm=algorithm,
                                            bucket_bytes=bucket_bytes, timeout=a.timeout_s)
                except RingError as exc:  # a peer gone, a chunk refused, or ring.close meanwhile
                    raise HandlerError(ErrorCode.UNAVAILABLE, f"all-reduce {i} failed on rank {rank} ({exc.code}): "
                                                              f"{exc}") from None
                if not await asyncio.to_thread(lambda: bool(torch.all(buffer == expected))):
                    wrong = int((buffer != expected).sum())
                    raise HandlerError(ErrorCode.INTERNAL, f"all-reduce {i} gave a wrong sum on rank {rank}: "
                                                           f"{wrong} of {a.elements} elements differ from {expected:g}")
                if i:
                    seconds.append(stats.seconds)
                    bytes_sent += stats.bytes_sent
            return {"rank": rank, "size": size, "elements": a.elements, "bytes": nbytes, "plaintext": ring.plaintext,
                    "algorithm": algorithm, "bucket_bytes": bucket_bytes, "seconds": seconds, "bytes_sent": bytes_sent,
                    "wall_s": round(time.perf_counter() - started, 6)}
        finally:
            self._running = False
            if self._ring is ring:
                self._arm_idle_close()
