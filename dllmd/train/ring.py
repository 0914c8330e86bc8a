"""The training ring: each worker's bulk links to its ring neighbours (and tree partners), and the
ring all-reduce over them.

``RingSocket`` binds one listening TCP socket per worker. ``form`` joins ring ``generation``: the
worker opens one bulk link (``dllmd.net.bulk``) to every neighbour and partner whose node key
sorts above its own and accepts one from every other. The handshake authenticates both ends by
their node keys (only the members this generation names, and only nodes ``authorized`` admits)
and agrees fresh AES-256-GCM keys for the link; plaintext rings (trusted links, by opt-in)
authenticate the same way and send chunks in the clear. A re-formed ring has a new generation and
new links; the old ones are closed, and anything in flight on them is gone with them.

``ring_allreduce`` runs ``dllmd.train.allreduce_plan.ring_plan``: bucketed reduce-scatter then
all-gather, every link carrying 2(n-1)/n of the buffer, up to a few buckets in flight so that
sealing, transfer, opening and adding overlap. In the all-gather every node copies the one chunk
its owner reduced, so all nodes end with bitwise identical sums, and therefore identical
optimizer steps. ``dllmd.train.allreduce`` adds the tree for small buffers and the choice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence

import numpy as np
import torch

from dllmd.net.bulk.connect import LinkListener, dial
from dllmd.net.bulk.handshake import Hello, Mode
from dllmd.net.bulk.link import BulkLink, BulkLinkCode, BulkLinkError
from dllmd.net.identity import Identity
from dllmd.train.allreduce_plan import OpKind, Plan, ring_plan, tree_partners
from dllmd.train.allreduce_run import PlanRun

log = logging.getLogger("dllmd.ring")

# Tuned on loopback (dllmctl bench allreduce, 4 ranks, 64 MB; docs/allreduce.md): chunks of a
# bucket / n stay in the CPU's cache between being opened, added and sealed again.
DEFAULT_BUCKET_BYTES = 4 * 1024 * 1024
PLAINTEXT_BUCKET_BYTES = 16 * 1024 * 1024
# Bytes of buckets in flight: enough to cover a LAN's bandwidth-delay product many times over, few
# enough that what is being sealed, sent and added stays in cache.
MAX_IN_FLIGHT_BYTES = 8 * 1024 * 1024
MIN_IN_FLIGHT_BUCKETS = 2  # one bucket's hops are sequential: another must fill the gaps
MAX_IN_FLIGHT_BUCKETS = 8
RETRY_FIRST_S, RETRY_MAX_S = 0.02, 0.5  # dialling a neighbour that has not joined the generation yet


class RingCode(str, Enum):
    """``RingError.code`` for failures of the ring itself; link failures keep their ``BulkLinkCode``."""

    ABORTED = "ring_aborted"  # reset, re-formed or closed under a running collective
    TIMEOUT = "ring_timeout"
    NOT_FORMED = "ring_not_formed"
    UNAUTHORIZED = "ring_unauthorized"  # the ring names a node whose key this node does not authorize


class RingError(RuntimeError):
    """The ring could not finish (a peer died, timed out, the ring was reset, or a chunk was refused)."""

    def __init__(self, message: str, code: str = RingCode.ABORTED):
        super().__init__(message)
        self.code = code.value if isinstance(code, Enum) else code


@dataclass(frozen=True)
class RingMember:
    public_key: str
    endpoint: str  # its ring socket


@dataclass
class _Slot:
    """The link to one peer in the current generation."""

    member: RingMember
    initiator: bool  # this side dials
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    link: BulkLink | None = None
    error: Exception | None = None  # the last dial failure; final when ``ready`` is set without a link
    task: asyncio.Task | None = None


class RingSocket:
    """One worker's end of the ring: a listening socket and its links of the current generation."""

    def __init__(self, identity: Identity, host: str, port: int = 0, plaintext: bool = False,
                 authorized: Callable[[str], bool] | None = None):
        self.identity, self.plaintext = identity, plaintext
        self.mode = Mode.PLAINTEXT if plaintext else Mode.AEAD
        self._authorized = authorized or (lambda key: True)
        self._listener = LinkListener(identity, host, port, self._admit, self._adopt)
        self.endpoint = self._listener.endpoint
        self.generation = 0
        self.members: tuple[RingMember, ...] = ()  # when formed with the member list (the tree needs it)
        self.rank = -1
        self._neighbours: tuple[RingMember, RingMember] | None = None  # (predecessor, successor)
        self._slots: dict[str, _Slot] = {}
        self._broken: Exception = RingError("the ring has not been formed", RingCode.NOT_FORMED)
        self._runs: set[PlanRun] = set()

    @property
    def running(self) -> bool:
        """Whether a collective is under way on this socket."""
        return bool(self._runs)

    def form(self, generation: int, predecessor: RingMember, successor: RingMember,
             members: Sequence[RingMember] = (), rank: int = -1) -> None:
        """Join ring ``generation`` between these two neighbours (the same node when n = 2). With
        ``members`` (all, in rank order) and this node's ``rank``, also link to the tree partners."""
        self._break(RingError(f"the ring was re-formed (generation {generation})"))
        self.generation = generation
        self._neighbours = (predecessor, successor)
        self.members, self.rank = tuple(members), rank
        peers = {m.public_key: m for m in (predecessor, successor)}
        if self.members:
            peers.update({self.members[p].public_key: self.members[p] for p in tree_partners(rank, len(self.members))})
        peers.pop(self.identity.public_key, None)  # a ring of one
        loop = asyncio.get_running_loop()
        for key, member in peers.items():
            slot = _Slot(member, initiator=self.identity.public_key < key)
            self._slots[key] = slot
            if not self._authorized(key):  # neither dialled nor admitted: fail the ring's collectives at once
                slot.error = RingError(f"ring member {key[:16]} is not an authorized key on this node",
                                       RingCode.UNAUTHORIZED)
                slot.ready.set()
            elif slot.initiator:
                slot.task = loop.create_task(self._dial(slot, generation))

    def fail_pending(self, error: Exception) -> None:
        """Wake everything waiting on this ring with ``error`` (a reset, or a dead peer). The
        generation's links are closed: the ring is formed again to go on."""
        self._break(error)

    def close(self) -> None:
        self._break(RingError("the ring was closed"))
        self._listener.close()

    def _break(self, error: Exception) -> None:
        self._broken = error
        for run in list(self._runs):
            run.fail(error)
        for slot in self._slots.values():
            if slot.task is not None:
                slot.task.cancel()
            if slot.link is not None:
                slot.link.close()
            slot.ready.set()
        self._slots = {}

    # --- links -------------------------------------------------------------------------------------

    async def _dial(self, slot: _Slot, generation: int) -> None:
        delay = RETRY_FIRST_S
        while True:
            try:
                link = await dial(self.identity, slot.member.endpoint, slot.member.public_key, generation, self.mode)
            except BulkLinkError as exc:
                slot.error = exc
                if exc.code == BulkLinkCode.PEER_MISMATCH:
                    log.warning("ring generation %d: %s", generation, exc)
                    slot.ready.set()
                    return
                await asyncio.sleep(delay)  # not joined yet, or not up yet: try again
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            if self._slots.get(slot.member.public_key) is not slot:  # re-formed meanwhile
                link.close()
                return
            slot.link, slot.error = link, None
            slot.ready.set()
            return

    def _admit(self, hello: Hello) -> bool:
        slot = self._slots.get(hello.initiator_key)
        return (hello.generation == self.generation and hello.mode == self.mode and slot is not None
                and not slot.initiator and slot.link is None and self._authorized(hello.initiator_key))

    def _adopt(self, hello: Hello, link: BulkLink) -> None:
        if not self._admit(hello):  # re-formed, or another connection won, during the handshake
            link.close()
            return
        slot = self._slots[hello.initiator_key]
        slot.link = link
        slot.ready.set()

    async def _links(self, peers: dict[int, str], timeout: float) -> dict[int, BulkLink]:
        deadline = time.monotonic() + timeout
        links = {}
        for rank, key in peers.items():
            slot = self._slots.get(key)
            if slot is not None:
                try:
                    await asyncio.wait_for(slot.ready.wait(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    why = f": {slot.error}" if slot.error else " (it did not connect)"
                    raise RingError(f"no link to ring member {key[:16]} within {timeout:g}s{why}",
                                    RingCode.TIMEOUT) from None
            if slot is None or self._slots.get(key) is not slot:  # reset, re-formed or closed meanwhile
                error = _ring_error(self._broken, timeout)
                raise RingError(f"{error} (form the ring again)", error.code)
            if slot.link is None:
                raise _ring_error(slot.error, timeout)
            links[rank] = slot.link
        return links

    def neighbours(self, rank: int, size: int) -> dict[int, str]:
        """Ranks -> keys of the predecessor and successor."""
        if self._neighbours is None:
            raise RingError("the ring has not been formed", RingCode.NOT_FORMED)
        predecessor, successor = self._neighbours
        return {(rank - 1) % size: predecessor.public_key, (rank + 1) % size: successor.public_key}

    async def execute(self, plan: Plan, array: np.ndarray, peers: dict[int, str], step: int, timeout: float) -> None:
        """Run ``plan`` over the links to ``peers`` (rank -> node key). Any failure closes this
        generation's links (the ring must be formed again) and returns the buffer untouched by any
        thread, its contents undefined."""
        generation = self.generation
        links = await self._links(peers, timeout)
        if self.generation != generation:
            raise RingError("the ring was re-formed")
        run = PlanRun(plan, array, links, generation, step & (2**64 - 1))  # the tag's unsigned field
        self._runs.add(run)
        try:
            await run.run(timeout)
        except BaseException as exc:
            error = _ring_error(exc, timeout)
            if self.generation == generation:
                self._break(error)
            await run.quiesce(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise error from None
        finally:
            self._runs.discard(run)


def _ring_error(exc: BaseException, timeout: float) -> RingError:
    if isinstance(exc, RingError):
        return exc
    if isinstance(exc, BulkLinkError):
        return RingError(str(exc), exc.code)
    if isinstance(exc, TimeoutError):
        return RingError(f"the all-reduce made no progress for {timeout:g}s", RingCode.TIMEOUT)
    return RingError(f"the all-reduce was interrupted: {exc!r}")


@dataclass
class AllReduceStats:
    seconds: float = 0.0
    bytes_sent: int = 0


def bucket_size(ring: RingSocket, bucket_bytes: int | None = None) -> int:
    """The bucket size ``ring_allreduce`` uses: ``bucket_bytes``, or the best default for the ring."""
    if bucket_bytes:
        return bucket_bytes
    return PLAINTEXT_BUCKET_BYTES if ring.plaintext else DEFAULT_BUCKET_BYTES


def in_flight_buckets(bucket_bytes: int) -> int:
    return max(MIN_IN_FLIGHT_BUCKETS, min(MAX_IN_FLIGHT_BUCKETS, MAX_IN_FLIGHT_BYTES // max(1, bucket_bytes)))


def sent_bytes(plan: Plan, itemsize: int) -> int:
    return sum(op.hi - op.lo for op in plan.ops if op.kind == OpKind.SEND) * itemsize


async def ring_allreduce(ring: RingSocket, flat: torch.Tensor, rank: int, size: int, step: int,
                         bucket_bytes: int | None = None, timeout: float = 60.0) -> AllReduceStats:
    """Sum ``flat`` (a contiguous 1-D CPU tensor) over the ring, in place; every rank calls this
    with the same size, step and bucket size (by default ``bucket_size(ring)``: every rank's ring
    is encrypted or none is). ``timeout``: the longest wait without progress."""
    stats = AllReduceStats()
    if size == 1:
        return stats
    started = time.perf_counter()
    array = flat.numpy()
    bucket_bytes = bucket_size(ring, bucket_bytes)
    plan = ring_plan(rank, size, array.size, bucket_bytes // array.itemsize, in_flight_buckets(bucket_bytes))
    await ring.execute(plan, array, ring.neighbours(rank, size), step, timeout)
    stats.bytes_sent = sent_bytes(plan, array.itemsize)
    stats.seconds = time.perf_counter() - started
    return stats
