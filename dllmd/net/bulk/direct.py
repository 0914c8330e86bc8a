"""A direct link: whole messages over one authenticated TCP connection, sealed, written, read and opened
by the calling thread itself.

For exchanges that are latency-bound and lock-step (a tensor-parallel group's partial sums: a few KiB,
sixty times per token), every thread a message passes through costs a wake-up, and on a loaded machine
a wake-up costs more than the transfer. zmq moves each message through an I/O thread on both ends; a
:class:`BulkLink` through a sender and a receiver thread. Here the thread that computed the partial
writes it to the kernel, and the thread that needs it reads it from there: the only wake-up left is
the reader's, in ``poll``.

The connection is opened by the bulk handshake (Noise KK over both node keys, fresh keys per
connection: :mod:`dllmd.net.bulk.handshake`). A message is a 4-byte length, then the sealed body
(AES-256-GCM, the length as associated data): the frame count, each frame's length, the frames. Frame
k of a direction is sealed under ``prefix || k``; the reader opens it with its own count, so a
replayed, dropped or reordered message fails authentication. Any failure breaks the link for good.

A reader may spin (``spin_s``) before it sleeps: a message that arrives while it spins costs no
wake-up on either side (the writer's kernel need not wake a sleeping thread). It yields the CPU on
every turn, so on a crowded machine it takes no time another thread could use.

Not thread-safe: one thread sends and receives on a link at a time (its owner's lock-step protocol).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dllmd.net.bulk.handshake import LinkKeys

LENGTH = struct.Struct("!I")
COUNT = struct.Struct("!H")
FRAME_LENGTH = struct.Struct("!I")
GCM_TAG_BYTES = 16
MAX_FRAMES = 64
READ_CHUNK = 1 << 16


_FRAME_HEADERS: dict[int, struct.Struct] = {}


def _frame_header(count: int) -> struct.Struct:
    """The body's header for ``count`` frames (the count, then each frame's length), compiled once."""
    header = _FRAME_HEADERS.get(count)
    if header is None:
        header = _FRAME_HEADERS[count] = struct.Struct(f"!H{count}I")
    return header


class LinkBroken(RuntimeError):
    """The link cannot carry another message: closed by either end, failed authentication, or broke."""


class LinkTimeout(TimeoutError):
    """Nothing (or not a whole message) arrived within the time given; the link is still usable."""


class DirectLink:
    def __init__(self, sock: socket.socket, keys: LinkKeys, peer: str, max_message_bytes: int, spin_s: float = 0.0):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a partial must not wait for the next
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock, self.peer = sock, peer
        self.max_message_bytes = max_message_bytes
        self._seal, self._open = AESGCM(keys.send), AESGCM(keys.receive)
        self._prefixes = (keys.send_prefix, keys.receive_prefix)
        self._sent = self._received = 0
        self._buffer = bytearray()
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self.broken: str | None = None
        self.spin_s = spin_s  # how long a read spins for data before it sleeps in poll

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self.broken is None:
            self.broken = "closed by this end"
        try:
            self.sock.close()
        except OSError:
            pass

    def _fail(self, why: str) -> LinkBroken:
        self.close()
        self.broken = why
        return LinkBroken(f"the link to {self.peer[:16]}: {why}")

    # --- sending ---------------------------------------------------------------------------------------

    def send(self, frames: Sequence[bytes | memoryview], timeout_s: float) -> None:
        """Seal ``frames`` (bytes-like) as one message and write all of it (within ``timeout_s``, or
        LinkBroken)."""
        if self.broken:
            raise LinkBroken(f"the link to {self.peer[:16]}: {self.broken}")
        if len(frames) > MAX_FRAMES:
            raise ValueError(f"a message of {len(frames)} frames; at most {MAX_FRAMES}")
        header = _frame_header(len(frames))
        body = b"".join([header.pack(len(frames), *[memoryview(f).nbytes for f in frames]), *frames])
        length = len(body) + GCM_TAG_BYTES
        if length > self.max_message_bytes:
            raise ValueError(f"a message of {length} bytes; the link carries at most {self.max_message_bytes}")
        prefix = LENGTH.pack(length)
        sealed = self._seal.encrypt(self._prefixes[0] + self._sent.to_bytes(8, "big"), body, prefix)
        self._sent += 1
        try:
            sent = self.sock.sendmsg([prefix, sealed])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise self._fail(f"write failed: {exc.strerror or exc}") from None
        if sent < len(prefix) + len(sealed):  # the kernel's buffer is full: the rest as room comes
            self._write(memoryview(prefix + sealed)[sent:], timeout_s)

    def _write(self, data: memoryview, timeout_s: float) -> None:
        deadline = None
        while data:
            try:
                data = data[self.sock.send(data):]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._fail(f"write failed: {exc.strerror or exc}") from None
            # The peer is not reading (its buffer is full): wait for room, not for ever.
            deadline = deadline or time.monotonic() + timeout_s
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.sock], [], left)[1]:
                raise self._fail(f"the peer took no data for {timeout_s:g}s")

    # --- receiving -------------------------------------------------------------------------------------

    def receive(self, timeout_s: float) -> list[bytes]:
        """The next whole message's frames; LinkTimeout if none arrived within ``timeout_s``."""
        if self.broken:
            raise LinkBroken(f"the link to {self.peer[:16]}: {self.broken}")
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._parse()
            if message is not None:
                return message
            if not self._fill(deadline):
                raise LinkTimeout(f"no message from {self.peer[:16]} within {timeout_s:g}s")

    def _fill(self, deadline: float) -> bool:
        """Read what the kernel holds (waiting until ``deadline`` for something); False on timeout."""
        spin_until = time.perf_counter() + self.spin_s
        while True:
            try:
                chunk = self.sock.recv(READ_CHUNK)
            except BlockingIOError:
                if self.spin_s and time.perf_counter() < spin_until:
                    os.sched_yield()  # a runnable thread of this CPU (the peer, on a crowded machine) goes first
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    self._poller.poll(max(1, int(left * 1000 + 0.999)))
                except InterruptedError:
                    pass
                continue
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise self._fail(f"read failed: {exc.strerror or exc}") from None
            if not chunk:
                raise self._fail("closed by the peer")
            self._buffer += chunk
            return True

    def _parse(self) -> list[bytes] | None:
        if len(self._buffer) < LENGTH.size:
            return None
        (length,) = LENGTH.unpack_from(self._buffer)
        if not GCM_TAG_BYTES + COUNT.size <= length <= self.max_message_bytes:
            raise self._fail(f"a message of {length} bytes (at most {self.max_message_bytes})")
        end = LENGTH.size + length
        if len(self._buffer) < end:
            return None
        # Opened in place (no copies of the sealed bytes), then dropped from the buffer.
        with memoryview(self._buffer) as view:
            try:
                body = self._open.decrypt(self._nonce(1, self._received), view[LENGTH.size:end], view[:LENGTH.size])
            except InvalidTag:
                body = None
        if body is None:
            raise self._fail("a message failed authentication (tampered, replayed or reordered)")
        del self._buffer[:end]
        self._received += 1
        return self._frames(body)

    def _frames(self, body: bytes) -> list[bytes]:
        (count,) = COUNT.unpack_from(body)
        offset = COUNT.size + count * FRAME_LENGTH.size
        if count > MAX_FRAMES or offset > len(body):
            raise self._fail(f"a message that says it has {count} frames")
        lengths = [FRAME_LENGTH.unpack_from(body, COUNT.size + i * FRAME_LENGTH.size)[0] for i in range(count)]
        if offset + sum(lengths) != len(body):
            raise self._fail("a message whose frames do not add up to its length")
        frames = []
        for n in lengths:
            frames.append(body[offset:offset + n])
            offset += n
        return frames

    def _nonce(self, direction: int, counter: int) -> bytes:
        return self._prefixes[direction] + counter.to_bytes(8, "big")
