"""DelayProxy: emulated WAN latency and bandwidth over loopback.

Lower bounds are strict: the emulated delay is really applied. Upper bounds never name a wall time
(a loaded machine would break them): each is relative to what the same exchange costs without the
emulated delay, measured in the same test, with twice that as slack (more where many connections
share the cores); what they rule out costs many times more (a delay per read, connections served
one after another, a delay or bandwidth charged twice)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest
import zmq

from dllmctl.bench.wan import DelayProxy

pytestmark = pytest.mark.timeout(60)

DELAY_S = 0.05


def _below(measured: float, expected: float, factor: float = 2.0) -> None:
    """``measured`` costs less than ``factor`` times what it should (``expected``, machine time included)."""
    assert measured < factor * expected, f"{measured * 1e3:.1f} ms, expected about {expected * 1e3:.1f} ms"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the default 5 drops SYNs from many concurrent connections (1 s retry)


def _serve(handler, port: int = 0) -> _Server:
    server = _Server(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def echo_server():
    server = _serve(_Echo)
    yield server.server_address
    server.shutdown()
    server.server_close()


def _connect(proxy: DelayProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return buf


def _round_trips(address: tuple[str, int], count: int = 5) -> list[float]:
    with socket.create_connection(address, timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for i in range(count):
            t0 = time.monotonic()
            sock.sendall(b"ping%d" % i)
            assert _recv_exactly(sock, 5) == b"ping%d" % i
            rtts.append(time.monotonic() - t0)
        return rtts


def test_round_trip_costs_two_delays(echo_server):
    direct = min(_round_trips(echo_server))  # this machine's own cost of the exchange, right now
    with DelayProxy(target=echo_server, delay_s=DELAY_S) as proxy:
        assert proxy.address == f"tcp://127.0.0.1:{proxy.port}"
        rtts = _round_trips(("127.0.0.1", proxy.port))
        assert min(rtts) >= 2 * DELAY_S
        _below(min(rtts), 2 * DELAY_S + direct)  # two delays, not four
        assert proxy.bytes_up == proxy.bytes_down == 25


def test_burst_pays_the_delay_once(echo_server):
    with DelayProxy(target=echo_server, delay_s=DELAY_S) as proxy:
        one = min(_round_trips(("127.0.0.1", proxy.port), 3))  # a single message's round trip
        with _connect(proxy) as sock:
            msg = b"x" * 100
            t0 = time.monotonic()
            for _ in range(20):
                sock.sendall(msg)
            _recv_exactly(sock, 20 * len(msg))
            elapsed = time.monotonic() - t0
        # Per-read sleeping would cost up to 20 such round trips here.
        assert elapsed >= 2 * DELAY_S
        _below(elapsed, one)


def test_many_concurrent_connections(echo_server):
    with DelayProxy(target=echo_server, delay_s=DELAY_S) as proxy:
        one = min(_round_trips(("127.0.0.1", proxy.port), 3))
        socks = [_connect(proxy) for _ in range(20)]
        try:
            t0 = time.monotonic()
            for i, s in enumerate(socks):
                s.sendall(b"%02d" % i)
            for i, s in enumerate(socks):
                assert _recv_exactly(s, 2) == b"%02d" % i
            elapsed = time.monotonic() - t0
        finally:
            for s in socks:
                s.close()
        # Connections share nothing: 20 round trips in parallel still cost about one, not twenty.
        assert elapsed >= 2 * DELAY_S
        _below(elapsed, one, factor=4.0)


def test_close_propagates_with_the_delay():
    class CloseAfterHello(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"hello")

    server = _serve(CloseAfterHello)
    try:
        with DelayProxy(target=server.server_address, delay_s=DELAY_S) as proxy, _connect(proxy) as sock:
            t0 = time.monotonic()
            assert _recv_exactly(sock, 5) == b"hello"
            assert sock.recv(1) == b""  # the server's close reaches the client
            assert time.monotonic() - t0 >= DELAY_S
    finally:
        server.shutdown()
        server.server_close()


def test_bandwidth_limit_serializes_bytes():
    size = 1_000_000

    class Sink(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            got = 0
            while got < size and (chunk := self.request.recv(65536)):
                got += len(chunk)
            self.request.sendall(b"ok")

    def upload(address: tuple[str, int]) -> float:
        with socket.create_connection(address, timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.monotonic()
            sock.sendall(b"\0" * size)
            assert _recv_exactly(sock, 2) == b"ok"
            return time.monotonic() - t0

    server = _serve(Sink)
    try:
        direct = upload(server.server_address)
        with DelayProxy(target=server.server_address, delay_s=0.01, bandwidth_bps=8_000_000) as proxy:
            elapsed = upload(("127.0.0.1", proxy.port))
            # 8 Mbit at 8 Mbit/s is 1 s on the wire, plus two one-way delays (not 2 s: charged once).
            assert elapsed >= 1.0 + 0.02
            _below(elapsed, 1.0 + 0.02 + direct)
            assert proxy.bytes_up == size and proxy.bytes_down == 2
    finally:
        server.shutdown()
        server.server_close()


def test_zmq_req_rep_through_proxy():
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    req = ctx.socket(zmq.REQ)
    plain = ctx.socket(zmq.REQ)  # straight to the REP socket: the same exchange without the proxy
    for s in (rep, req, plain):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        port = rep.bind_to_random_port("tcp://127.0.0.1")
        plain.connect(f"tcp://127.0.0.1:{port}")
        with DelayProxy(target=("127.0.0.1", port), delay_s=DELAY_S) as proxy:
            req.connect(proxy.address)

            def round_trip(sock: zmq.Socket, payload: bytes) -> float:
                t0 = time.monotonic()
                sock.send(payload)
                rep.send(rep.recv())
                assert sock.recv() == payload
                return time.monotonic() - t0

            for sock in (plain, req):
                round_trip(sock, b"warmup")  # the first one also carries the ZMTP handshake
            direct = min(round_trip(plain, b"ping") for _ in range(5))
            rtts = [round_trip(req, b"ping") for _ in range(5)]
            assert min(rtts) >= 2 * DELAY_S
            _below(min(rtts), 2 * DELAY_S + direct)
    finally:
        for s in (req, plain, rep):
            s.close()
        ctx.term()


def test_target_down_then_up():
    # Reserve a free port, then leave nothing listening on it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with DelayProxy(target=("127.0.0.1", port), delay_s=0.01) as proxy:
        with _connect(proxy) as sock:
            try:
                assert sock.recv(1) == b""  # closed by the proxy, not hung
            except ConnectionResetError:
                pass

        server = _serve(_Echo, port)
        try:
            with _connect(proxy) as sock:
                sock.sendall(b"back")
                assert _recv_exactly(sock, 4) == b"back"
            assert proxy.connections == 2
        finally:
            server.shutdown()
            server.server_close()
