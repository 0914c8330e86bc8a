"""An established bulk link: chunks of a caller's buffer over one authenticated TCP connection.

A frame is a 29-byte header, then the payload: ``tag (generation, step, bucket, phase, hop)`` and
the payload's length, then the chunk, sealed with AES-256-GCM (``Mode.AEAD``) or as it is
(``Mode.PLAINTEXT``). The header is the AEAD's associated data, so a chunk cannot be moved to
another tag. Each direction has its own key (from the handshake, fresh per connection) and a
64-bit frame counter that starts at 0: frame k of a direction is sealed under nonce
``prefix || k``. The receiver never reads a nonce off the wire; it opens frame k with its own
count k, so a replayed, dropped or reordered frame fails authentication, and with it the link.

Two threads per link do the work, so that sealing, opening and adding (all of which release the
GIL) overlap with the transfers and with the event loop: the sender seals each queued chunk into
its own buffer and writes it; the receiver reads a header, checks that this side expects exactly
that tag with exactly that length (``expect``) *before* it reads the payload, then reads it into
the destination (plaintext copies: straight into the caller's buffer) or into its own buffer and
opens it into the destination or adds it there. A frame nobody expects yet waits, unread, until
the caller's next collective expects it; a frame that is not among what the current one expects
breaks the link. Any failure breaks the link for good: the ring is formed again to go on.

Owners (``dllmd.train.allreduce_run``) are told of completions from these threads, and say with
``enter``/``leave`` while the threads use their buffers, so a failed collective can wait until no
thread touches the caller's memory before giving it back.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dllmd.net.bulk.handshake import LinkKeys

log = logging.getLogger("dllmd.bulk")

TAG = struct.Struct("!QQIBI")  # generation, step, bucket, phase, hop
HEADER = struct.Struct("!QQIBII")  # the tag, then the payload's length in bytes
GCM_TAG_BYTES = 16


class BulkLinkCode(str, Enum):
    """Why a link failed (``BulkLinkError.code``): callers branch on these, never on messages."""

    REFUSED = "link_refused"  # the handshake was refused, or never completed
    PEER_MISMATCH = "link_peer_mismatch"  # the other end is not the node the ring names
    LOST = "link_lost"  # the connection closed or broke
    CLOSED = "link_closed"  # this side closed it (re-formed, reset, closed)
    REJECTED = "chunk_rejected"  # a chunk failed authentication: tampered, replayed or reordered
    UNEXPECTED = "chunk_unexpected"  # a chunk this side does not expect: a replayed tag, or layouts disagree


class BulkLinkError(RuntimeError):
    def __init__(self, code: BulkLinkCode, message: str):
        super().__init__(message)
        self.code = code


class Owner(Protocol):
    """The collective a send or receive belongs to."""

    def enter(self) -> bool: ...  # False: it has failed; leave its buffers alone

    def leave(self) -> None: ...

    def complete(self, op: int) -> None: ...

    def fail(self, error: Exception) -> None: ...


@dataclass
class Send:
    owner: Owner
    op: int
    tag: bytes
    data: memoryview  # bytes of the caller's buffer; read when the sender gets to it


@dataclass
class Receive:
    owner: Owner
    op: int
    nbytes: int
    into: memoryview | None = None  # copy the chunk here ...
    add_to: np.ndarray | None = None  # ... or add it to this array (same dtype, nbytes of it)


def describe_tag(tag: bytes) -> str:
    generation, step, bucket, phase, hop = TAG.unpack(tag)
    return f"generation {generation}, step {step}, bucket {bucket}, phase {phase}, hop {hop}"


class BulkLink:
    """One end of an authenticated connection (``keys`` None: plaintext mode)."""

    def __init__(self, sock: socket.socket, keys: LinkKeys | None, peer: str):
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock, self.peer = sock, peer
        self._seal = AESGCM(keys.send) if keys else None
        self._open = AESGCM(keys.receive) if keys else None
        self._prefixes = (keys.send_prefix, keys.receive_prefix) if keys else (b"", b"")
        self.error: BulkLinkError | None = None
        self._lock = threading.Condition()
        self._sends: deque[Send] = deque()
        self._expected: dict[bytes, Receive] = {}
        self._threads = 2  # the last one to stop closes the socket: never while the other may still use it
        for name, target in (("send", self._send_loop), ("receive", self._receive_loop)):
            threading.Thread(target=self._run, args=(target,), name=f"bulk-{name}-{peer[:8]}", daemon=True).start()

    # --- the caller's side -------------------------------------------------------------------

    def send(self, item: Send) -> None:
        with self._lock:
            if self.error is not None:
                raise self.error
            self._sends.append(item)
            self._lock.notify_all()

    def expect(self, receives: dict[bytes, Receive]) -> None:
        """The frames the caller's next collective takes from this link, by tag."""
        with self._lock:
            if self.error is not None:
                raise self.error
            if self._expected:
                raise BulkLinkError(BulkLinkCode.UNEXPECTED, f"the link to {self.peer[:16]} still expects chunks of an "
                                                     f"earlier collective")
            self._expected.update(receives)
            self._lock.notify_all()

    def close(self, error: BulkLinkError | None = None) -> None:
        self._fail(error or BulkLinkError(BulkLinkCode.CLOSED, f"the link to {self.peer[:16]} was closed"))

    # --- failure -------------------------------------------------------------------------------

    def _fail(self, error: BulkLinkError) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = error
            owners = {id(i.owner): i.owner for i in [*self._sends, *self._expected.values()]}
            self._sends.clear()
            self._expected.clear()
            self._lock.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes both threads out of blocking calls
        except OSError:
            pass
        for owner in owners.values():
            owner.fail(error)

    def _run(self, loop) -> None:
        try:
            loop()
        except Exception as exc:  # a bug, not the peer: still fail what waits, instead of leaving it to time out
            log.exception("bulk link to %s failed", self.peer[:16])
            self._fail(BulkLinkError(BulkLinkCode.LOST, f"the link to {self.peer[:16]} failed: {exc!r}"))
        finally:
            with self._lock:
                self._threads -= 1
                last = self._threads == 0
            if last:
                self.sock.close()

    # --- sender thread ---------------------------------------------------------------------------

    def _send_loop(self) -> None:
        out = bytearray()
        counter = 0
        while True:
            with self._lock:
                while not self._sends and self.error is None:
                    self._lock.wait()
                if self.error is not None:
                    return
                item = self._sends.popleft()
            if not item.owner.enter():  # its collective failed: so does the link (the stream would skip a frame)
                self.close()
                return
            try:
                length = len(item.data) + (GCM_TAG_BYTES if self._seal else 0)
                header = item.tag + length.to_bytes(4, "big")
                if self._seal is not None:
                    if len(out) < HEADER.size + length:
                        out = bytearray(HEADER.size + length)
                    view = memoryview(out)[:HEADER.size + length]
                    view[:HEADER.size] = header
                    nonce = self._prefixes[0] + counter.to_bytes(8, "big")
                    counter += 1
                    self._seal.encrypt_into(nonce, item.data, header, view[HEADER.size:])
                    self.sock.sendall(view)
                else:
                    self._send_parts(header, item.data)
            except OSError as exc:
                self._fail(self.error or BulkLinkError(BulkLinkCode.LOST, f"sending to {self.peer[:16]} failed: {exc}"))
                return
            finally:
                item.owner.leave()
            item.owner.complete(item.op)

    def _send_parts(self, header: bytes, data: memoryview) -> None:
        """Header and chunk in one system call where the socket takes them, without copying the chunk."""
        sent = self.sock.sendmsg([header, data])
        if sent < len(header):
            self.sock.sendall(header[sent:])
            sent = len(header)
        if sent - len(header) < len(data):
            self.sock.sendall(data[sent - len(header):])

    # --- receiver thread -------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        header = bytearray(HEADER.size)
        scratch = bytearray()
        counter = 0
        try:
            while True:
                self._read(memoryview(header))
                tag, length = bytes(header[:TAG.size]), int.from_bytes(header[TAG.size:], "big")
                item = self._take(tag)
                expected = item.nbytes + (GCM_TAG_BYTES if self._open else 0)
                if length != expected:
                    raise BulkLinkError(BulkLinkCode.UNEXPECTED,
                                        f"a chunk of {length} bytes from {self.peer[:16]} where {expected} were "
                                        f"expected ({describe_tag(tag)}): the peers disagree on the buffer layout")
                if not item.owner.enter():  # its collective failed: so does the link
                    self.close()
                    return
                try:
                    if self._open is None and item.add_to is None:
                        self._read(item.into)  # plaintext copy: straight into the caller's buffer
                    else:
                        if len(scratch) < length:
                            scratch = bytearray(length)
                        data = memoryview(scratch)[:length]
                        self._read(data)
                        plain = data[:item.nbytes]
                        if self._open is not None:
                            nonce = self._prefixes[1] + counter.to_bytes(8, "big")
                            counter += 1
                            try:
                                # A chunk to copy is opened straight into the caller's buffer; should it
                                # not authenticate, what was written there is never used (the collective fails).
                                self._open.decrypt_into(nonce, data, bytes(header),
                                                        item.into if item.add_to is None else plain)
                            except InvalidTag:
                                raise BulkLinkError(BulkLinkCode.REJECTED, f"a chunk from {self.peer[:16]} failed "
                                                                   f"authentication ({describe_tag(tag)}): tampered "
                                                                   f"with, replayed or reordered") from None
                        if item.add_to is not None:
                            add = item.add_to
                            np.add(add, np.frombuffer(plain, dtype=add.dtype, count=add.size), out=add)
                finally:
                    item.owner.leave()
                item.owner.complete(item.op)
        except BulkLinkError as exc:
            if self.error is None and (exc.code != BulkLinkCode.LOST or self._expected):  # not just an idle close
                log.warning("bulk link to %s broken: %s", self.peer[:16], exc)
            self._fail(exc)
        except OSError as exc:
            self._fail(BulkLinkError(BulkLinkCode.LOST, f"the link to {self.peer[:16]} broke: {exc}"))

    def _take(self, tag: bytes) -> Receive:
        """The receive that expects ``tag``; waits while nothing at all is expected (the frame
        belongs to the caller's next collective)."""
        with self._lock:
            while True:
                if self.error is not None:
                    raise self.error
                item = self._expected.pop(tag, None)
                if item is not None:
                    return item
                if self._expected:
                    raise BulkLinkError(BulkLinkCode.UNEXPECTED, f"an unexpected chunk from {self.peer[:16]} "
                                                         f"({describe_tag(tag)}): replayed, or the peers disagree "
                                                         f"on the collective")
                self._lock.wait()

    def _read(self, view: memoryview) -> None:
        got, size = 0, len(view)
        while got < size:
            n = self.sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
            if n == 0:
                raise BulkLinkError(BulkLinkCode.LOST, f"the link to {self.peer[:16]} was closed by the peer")
            got += n
