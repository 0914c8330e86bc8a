"""A userspace TCP proxy that makes a loopback connection behave like a WAN link.

Home machines talk over links with tens of milliseconds of latency and limited uplink, but tests and
benchmarks here run on one host over loopback, and this kernel has no ``netem`` (``tc qdisc ... netem
delay``) to fake that. So we put a proxy between client and server instead:

    client ──▶ DelayProxy (127.0.0.1:port) ──▶ target host:port

Each direction of each connection is modelled as its own link with

* propagation delay ``delay_s``: bytes read from one side at time ``t`` are written to the other at
  ``t + delay_s`` (one way, so a request/response round trip costs at least ``2 * delay_s``);
* optional bandwidth ``bandwidth_bps``: a chunk of ``n`` bytes occupies the link for
  ``n * 8 / bandwidth_bps`` seconds, queued behind earlier chunks, before propagating.

Bytes are queued with their due time and a writer task sleeps until each is due, so a burst of small
writes costs one delay, not one per write, and order is preserved. Buffering is unbounded (the sender is
never pushed back): fine for the request sizes of tests and benchmarks, not a model of TCP windows.
Connection setup is not delayed; a close (FIN) travels with the same delay as data and closes both sides.
"""

from __future__ import annotations

import asyncio
import socket
import threading

READ_SIZE = 64 * 1024


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # Nagle plus delayed ACKs would add up to ~40 ms to small writes on top of the emulated delay.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DelayProxy:
    """Forward TCP connections to ``target`` with per-direction delay and optional bandwidth limit.

    Starts listening (on asyncio, in a daemon thread) as soon as it is constructed; use as a context
    manager or call :meth:`close`. ``bytes_up`` counts client→target bytes delivered, ``bytes_down``
    target→client bytes delivered.
    """

    def __init__(self, target: tuple[str, int], delay_s: float = 0.0, bandwidth_bps: float | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        if delay_s < 0 or (bandwidth_bps is not None and bandwidth_bps <= 0):
            raise ValueError("delay_s must be >= 0 and bandwidth_bps > 0")
        self.target = target
        self.delay_s = delay_s
        self.bandwidth_bps = bandwidth_bps
        self.host = host
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0  # accepted so far, including ones whose target was down
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wan-proxy", daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._accept, host, port), self._loop).result(timeout=10)
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening and drop every open connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        # Let cancelled tasks unwind here, so none is destroyed pending when the loop closes.
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- per connection (runs on the proxy's loop) ---

    def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        # Serve in a task of our own rather than the one start_server makes: on Python 3.11 cancelling
        # that one (at close) makes asyncio log a spurious CancelledError traceback.
        self.connections += 1
        task = asyncio.get_running_loop().create_task(self._serve(c_reader, c_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self._writers.add(c_writer)
        t_writer = None
        try:
            try:
                t_reader, t_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # target down: the finally closes the client; we keep listening
            self._writers.add(t_writer)
            _no_delay(c_writer)
            _no_delay(t_writer)

            def abort() -> None:
                # A reset or write error on either side ends the whole connection at once.
                c_writer.transport.abort()
                t_writer.transport.abort()

            await asyncio.gather(self._link(c_reader, t_writer, "bytes_up", abort),
                                 self._link(t_reader, c_writer, "bytes_down", abort))
        finally:
            for w in (c_writer, t_writer):
                if w is not None:
                    w.close()
                    self._writers.discard(w)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str,
                    abort) -> None:
        """One direction: read as fast as the sender writes, deliver each chunk when it is due."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        link_free_at = 0.0  # when the (bandwidth-limited) link finishes sending what is queued

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    # The FIN arrived: close this side, whose reader then sees EOF and sends the
                    # close back the other way with the same delay.
                    writer.close()
                    return
                # Count before writing, so a reader that has the bytes also sees them counted.
                setattr(self, counter, getattr(self, counter) + len(data))
                try:
                    writer.write(data)
                    await writer.drain()
                except (OSError, RuntimeError):  # peer gone (RuntimeError: transport already closed)
                    abort()
                    return

        deliverer = asyncio.create_task(deliver())
        try:
            while True:
                try:
                    data = await reader.read(READ_SIZE)
                except OSError:
                    data = b""
                    abort()
                now = loop.time()
                if self.bandwidth_bps and data:
                    # Serialization: the chunk leaves only after everything queued ahead of it.
                    link_free_at = max(link_free_at, now) + len(data) * 8 / self.bandwidth_bps
                    due = link_free_at + self.delay_s
                else:
                    due = max(link_free_at, now) + self.delay_s
                queue.put_nowait((due, data or None))
                if not data:
                    break
            await deliverer
        finally:
            deliverer.cancel()
            await asyncio.gather(deliverer, return_exceptions=True)

