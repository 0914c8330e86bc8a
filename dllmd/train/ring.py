"""Ring all-reduce between training workers: bucketed reduce-scatter, then all-gather.

Each worker binds one ring socket (a ROUTER) and connects a DEALER to its successor's. Data only
ever flows to the successor, so with n workers every link carries 2(n-1)/n of the buffer and all
links work at once: the bandwidth-optimal schedule for a ring. The buffer is cut into buckets that
go through the ring concurrently, so encrypting, sending and adding overlap.

Security: ring sockets are CURVE-encrypted with the node's own key, and the daemon's ZAP handler
admits only authorized keys; a receiver also checks that a message comes from its predecessor's
key. Plaintext is possible only when the node's config allows it (trusted links) *and* the job
asks for it.

Exactness: in the all-gather every node copies the one chunk its owner reduced, so all nodes end
with bitwise identical sums, and therefore identical optimizer steps.

A message is ``[tag, payload]`` where the tag names (generation, step, bucket, phase, hop). A ring
is re-formed with a new generation after a failure; late messages of an old one are dropped.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import struct
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from dllmd.net.identity import Identity, curve_public_z85
from dllmd.net.reactor import SocketReactor
from dllmd.net.transport import ZAP_DOMAIN

log = logging.getLogger("dllmd.ring")

TAG = struct.Struct("!QQIBI")  # generation, step, bucket, phase (0 reduce-scatter, 1 all-gather), hop
# Tuned on loopback (dllmctl bench allreduce, 4 ranks, 64 MB; docs/allreduce.md). CURVE is fastest
# with 4 MiB buckets: larger ones spend more in libzmq's per-message copies, smaller ones more in
# Python. Plaintext has no per-byte work in libzmq, so larger buckets only save per-message overhead.
DEFAULT_BUCKET_BYTES = 4 * 1024 * 1024
PLAINTEXT_BUCKET_BYTES = 16 * 1024 * 1024
# Bytes of buckets in flight: enough to cover a LAN's bandwidth-delay product many times over, few
# enough that what is being encrypted, sent and added stays in cache. Measured with 4 MiB CURVE
# buckets: 2 in flight took 12% less CPU and time than 8.
MAX_IN_FLIGHT_BYTES = 8 * 1024 * 1024
MIN_IN_FLIGHT_BUCKETS = 2  # one bucket's hops are sequential: another must fill the gaps
MAX_IN_FLIGHT_BUCKETS = 8  # small buckets: enough to keep every link busy without queueing the whole buffer
RELEASE_POLL_S = 0.0002  # how often the end of an all-reduce checks that zmq let go of the buffer


class RingError(RuntimeError):
    """The ring could not finish (a peer died, timed out, or the ring was reset)."""


@dataclass(frozen=True)
class RingMember:
    public_key: str
    endpoint: str  # its ring socket


_MALLOC_TUNED = False


def _keep_freed_buffers() -> None:
    """Let this process's allocator reuse the memory of freed ring messages (glibc only, once).

    Every message libzmq receives (and with CURVE, every one it encrypts or decrypts) is a fresh
    allocation of about a bucket's chunk. Over glibc's mmap threshold (128 KiB, adjusted upwards
    only up to the largest block freed so far, and trimmed back at twice that) each one is a new
    mapping whose pages fault in, zeroed by the kernel, and go back when freed: measured on
    loopback with 4 ranks and 64 MiB, this costs 15% (CURVE) to 25% (plaintext) of an all-reduce.
    Raising the mmap threshold to 32 MiB (glibc's own dynamic ceiling) and the trim threshold to
    256 MiB keeps that memory in the heap for the next message instead. Process-wide: blocks up to
    32 MiB now come from the heap everywhere in the daemon, and up to 256 MiB of freed heap per
    arena may stay mapped instead of going back to the system."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 256 * 1024 * 1024)


class RingSocket:
    """One worker's ends of the ring: a bound receiving socket and a link to the successor."""

    def __init__(self, ctx: zmq.Context, identity: Identity, host: str, port: int = 0, plaintext: bool = False,
                 max_message_bytes: int = 256 * 1024 * 1024):
        _keep_freed_buffers()
        self.ctx, self.identity, self.plaintext = ctx, identity, plaintext
        self.max_message_bytes = max_message_bytes
        sock = ctx.socket(zmq.ROUTER)
        self._options(sock)
        if not plaintext:
            sock.curve_server = True
            sock.curve_secretkey, sock.curve_publickey = identity.curve_secret, identity.curve_public
            sock.zap_domain = ZAP_DOMAIN.encode()
        sock.bind(f"tcp://{host}:{port or '*'}")
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._receiver = SocketReactor(sock, self._on_message)
        self._sender: SocketReactor | None = None
        self._successor: RingMember | None = None
        self._predecessor_key: str | None = None
        self.generation = 0
        self.aborts = 0  # how many times fail_pending was called: ends waits that no message would end
        self._mailbox: dict[bytes, memoryview | zmq.Frame] = {}
        self._waiting: dict[bytes, asyncio.Future] = {}

    def _options(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 4000)
        sock.setsockopt(zmq.SNDHWM, 0)  # bounded by the buckets in flight instead: never drop or block
        sock.setsockopt(zmq.RCVHWM, 0)

    def form(self, generation: int, predecessor: RingMember, successor: RingMember) -> None:
        """Join ring ``generation`` between these two neighbours (the same node when n = 2)."""
        self.fail_pending(RingError(f"the ring was re-formed (generation {generation})"))
        self.generation = generation
        self._mailbox.clear()
        self._predecessor_key = predecessor.public_key
        if self._successor != successor:
            if self._sender is not None:
                self._sender.close()
            sock = self.ctx.socket(zmq.DEALER)
            self._options(sock)
            if not self.plaintext:
                sock.curve_secretkey, sock.curve_publickey = self.identity.curve_secret, self.identity.curve_public
                sock.curve_serverkey = curve_public_z85(successor.public_key)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.connect(successor.endpoint)
            self._sender = SocketReactor(sock, lambda frames: None)
            self._successor = successor

    def fail_pending(self, error: Exception) -> None:
        """Wake everything waiting on this ring with ``error`` (a reset, or a dead peer)."""
        self.aborts += 1
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiting.clear()

    def close(self) -> None:
        self.fail_pending(RingError("the ring was closed"))
        if self._sender is not None:
            self._sender.close()
        self._receiver.close()

    # --- messages ------------------------------------------------------------------------------

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 3 or len(frames[1].bytes) != TAG.size:
            return
        if not self.plaintext:
            try:
                sender = frames[1].get("User-Id")
            except zmq.ZMQError:
                return
            if sender != self._predecessor_key:
                log.warning("ring message from %s, who is not this ring's predecessor: dropped", str(sender)[:16])
                return
        tag = frames[1].bytes
        if TAG.unpack(tag)[0] != self.generation:
            return  # a late message of an earlier ring
        fut = self._waiting.pop(tag, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(frames[2])
        else:
            self._mailbox[tag] = frames[2]

    async def send(self, tag: bytes, payload: np.ndarray, copy: bool = True) -> zmq.MessageTracker | None:
        """Queue ``payload`` for the successor. With ``copy=False`` zmq reads the caller's memory
        itself, later: the caller must not change it until the returned tracker is done (or until
        it knows the successor has received it)."""
        if self._sender is None:
            raise RingError("the ring has not been formed")
        if copy:
            data = payload.tobytes()  # zmq sends later, and the caller goes on changing its buffer
            tracker = None
        else:
            data = zmq.Frame(payload, track=True)
            tracker = data.tracker
        while True:
            if TAG.unpack(tag)[0] != self.generation:
                raise RingError("the ring was re-formed")
            try:
                self._sender.send([tag, data])
                return tracker
            except zmq.Again:
                await asyncio.sleep(0.001)

    async def receive(self, tag: bytes, timeout: float) -> zmq.Frame:
        if TAG.unpack(tag)[0] != self.generation:
            raise RingError("the ring was re-formed")
        frame = self._mailbox.pop(tag, None)
        if frame is not None:
            return frame
        fut = asyncio.get_running_loop().create_future()
        self._waiting[tag] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RingError(f"no ring data from the predecessor within {timeout:g}s") from None
        finally:
            self._waiting.pop(tag, None)


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


async def ring_allreduce(ring: RingSocket, flat: torch.Tensor, rank: int, size: int, step: int,
                         bucket_bytes: int | None = None, timeout: float = 60.0) -> AllReduceStats:
    """Sum ``flat`` (a contiguous 1-D CPU tensor) over the ring, in place; every rank calls this
    with the same size, step and bucket size (by default ``bucket_size(ring)``: every rank's ring
    is encrypted or none is)."""
    stats = AllReduceStats()
    if size == 1:
        return stats
    started = time.perf_counter()
    array = flat.numpy()
    bucket_bytes = bucket_size(ring, bucket_bytes)
    per_bucket = max(size, bucket_bytes // array.itemsize)
    bounds = [(lo, min(lo + per_bucket, array.size)) for lo in range(0, array.size, per_bucket)]
    limit = asyncio.Semaphore(in_flight_buckets(bucket_bytes))
    generation = ring.generation  # a reset mid-way makes every later send and receive fail
    aborts = ring.aborts

    unacknowledged: list[zmq.MessageTracker] = []

    # Chunks go out straight from ``flat`` (no copy). That is safe because every chunk this rank
    # changes after sending it is one whose reduce-scatter message the successor must have received
    # before the all-gather can bring that chunk back. All-gather messages come back to nobody, so
    # their trackers say when zmq is done with them; the caller gets its buffer back only then.
    # After an error, messages of the failed step may still go out from ``flat``: a ring re-formed
    # with a new generation drops them.
    async def one(index: int, lo: int, hi: int) -> None:
        async with limit:
            chunks = np.array_split(array[lo:hi], size)

            def tag(phase: int, hop: int) -> bytes:
                return TAG.pack(generation, step, index, phase, hop)

            for hop in range(size - 1):  # reduce-scatter: rank r ends owning chunk r + 1
                outgoing, incoming = chunks[(rank - hop) % size], chunks[(rank - hop - 1) % size]
                await ring.send(tag(0, hop), outgoing, copy=False)
                stats.bytes_sent += outgoing.nbytes
                frame = await ring.receive(tag(0, hop), timeout)
                np.add(incoming, _view(frame, incoming), out=incoming)
            for hop in range(size - 1):  # all-gather: pass the owned chunks around
                outgoing, incoming = chunks[(rank - hop + 1) % size], chunks[(rank - hop) % size]
                unacknowledged.append(await ring.send(tag(1, hop), outgoing, copy=False))
                stats.bytes_sent += outgoing.nbytes
                frame = await ring.receive(tag(1, hop), timeout)
                incoming[:] = _view(frame, incoming)

    tasks = [asyncio.ensure_future(one(i, lo, hi)) for i, (lo, hi) in enumerate(bounds)]
    try:
        await asyncio.gather(*tasks)
        await _released(ring, unacknowledged, generation, aborts, timeout)
    finally:
        for task in tasks:
            task.cancel()
    stats.seconds = time.perf_counter() - started
    return stats


async def _released(ring: RingSocket, trackers: list[zmq.MessageTracker], generation: int, aborts: int,
                    timeout: float) -> None:
    """Wait until zmq has read every message sent from the caller's buffer (written it to the
    socket, or encrypted it into a buffer of its own). Every chunk has arrived by now, so the sum is
    complete: a reset or re-formed ring (whose successor may be gone, its messages never taken) ends
    the wait without an error, since the new generation drops whatever the old one still sends."""
    deadline = time.monotonic() + timeout
    while not all(t.done for t in trackers):
        if ring.generation != generation or ring.aborts != aborts:
            return
        if time.monotonic() > deadline:
            raise RingError(f"the successor did not take the last ring data within {timeout:g}s")
        await asyncio.sleep(RELEASE_POLL_S)


def _view(frame: zmq.Frame, like: np.ndarray) -> np.ndarray:
    data = np.frombuffer(frame.buffer, dtype=like.dtype)
    if data.shape != like.shape:
        raise RingError(f"ring chunk of {data.size} elements where {like.size} were expected: the peers disagree "
                        f"on the buffer layout")
    return data
