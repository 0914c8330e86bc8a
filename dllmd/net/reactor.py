"""Drive a plain (blocking-API) zmq socket from an asyncio loop with no future per message.

zmq.asyncio allocates futures and enum flags for every send and receive; on a loopback round trip
that costs more than CURVE encryption does. Here the loop watches the socket's file descriptor,
and a readable signal drains every queued message into a callback. Sends are non-blocking.

The zmq FD is edge-triggered: any send or receive may consume the readable edge, so after each
send we schedule one more drain; otherwise a message that arrived meanwhile would sit unseen.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

import zmq

from dllmd.net import tap

Frames = list[zmq.Frame]
DRAIN_BATCH = 64  # messages handled per loop turn before yielding to other callbacks


class SocketReactor:
    def __init__(self, sock: zmq.Socket, on_message: Callable[[Frames], None]):
        self.sock = sock
        self.on_message = on_message
        self.loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._drain_scheduled = False
        self.loop.add_reader(self._fd, self._drain)
        self._schedule_drain()  # messages may already be queued

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        for _ in range(DRAIN_BATCH):
            if self.sock.closed or not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.on_message(frames)
        self._schedule_drain()  # more may be waiting; let other callbacks run first

    def send(self, frames: Sequence) -> None:
        """Queue a message without blocking; raises ``zmq.Again`` if it cannot be queued now."""
        tap.record(frames)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        finally:
            self._schedule_drain()

    def close(self) -> None:
        try:
            self.loop.remove_reader(self._fd)
        except (ValueError, OSError):
            pass
        self.sock.close(linger=0)
