"""DelayProxy: emulated WAN latency and bandwidth over loopback (lower bounds strict, upper bounds loose)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest
import zmq

from dllmctl.bench.wan import DelayProxy

pytestmark = pytest.mark.timeout(60)

SLACK_S = 0.04  # what a slow 2-core VM may add on top of the emulated delay


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


def test_round_trip_costs_two_delays(echo_server):
    with DelayProxy(target=echo_server, delay_s=0.05) as proxy:
        assert proxy.address == f"tcp://127.0.0.1:{proxy.port}"
        with _connect(proxy) as sock:
            rtts = []
            for i in range(3):
                t0 = time.monotonic()
                sock.sendall(b"ping%d" % i)
                assert _recv_exactly(sock, 5) == b"ping%d" % i
                rtts.append(time.monotonic() - t0)
        assert min(rtts) >= 0.100
        assert min(rtts) < 0.100 + SLACK_S
        assert proxy.bytes_up == proxy.bytes_down == 15


def test_burst_pays_the_delay_once(echo_server):
    with DelayProxy(target=echo_server, delay_s=0.05) as proxy, _connect(proxy) as sock:
        msg = b"x" * 100
        t0 = time.monotonic()
        for _ in range(20):
            sock.sendall(msg)
        _recv_exactly(sock, 20 * len(msg))
        elapsed = time.monotonic() - t0
        # Per-read sleeping would cost up to 20 x 100 ms here.
        assert 0.100 <= elapsed < 0.100 + 2 * SLACK_S


def test_many_concurrent_connections(echo_server):
    with DelayProxy(target=echo_server, delay_s=0.05) as proxy:
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
        # Connections share nothing: 20 round trips in parallel still cost about one.
        assert 0.100 <= elapsed < 0.100 + 4 * SLACK_S


def test_close_propagates_with_the_delay():
    class CloseAfterHello(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"hello")

    server = _serve(CloseAfterHello)
    try:
        with DelayProxy(target=server.server_address, delay_s=0.05) as proxy, _connect(proxy) as sock:
            t0 = time.monotonic()
            assert _recv_exactly(sock, 5) == b"hello"
            assert sock.recv(1) == b""  # the server's close reaches the client
            assert time.monotonic() - t0 >= 0.05
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

    server = _serve(Sink)
    try:
        with DelayProxy(target=server.server_address, delay_s=0.01, bandwidth_bps=8_000_000) as proxy:
            with _connect(proxy) as sock:
                t0 = time.monotonic()
                sock.sendall(b"\0" * size)
                assert _recv_exactly(sock, 2) == b"ok"
                elapsed = time.monotonic() - t0
            # 8 Mbit at 8 Mbit/s is 1 s on the wire, plus two one-way delays.
            assert elapsed >= 1.0 + 0.02
            assert elapsed < 3.0
            assert proxy.bytes_up == size and proxy.bytes_down == 2
    finally:
        server.shutdown()
        server.server_close()


def test_zmq_req_rep_through_proxy():
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    req = ctx.socket(zmq.REQ)
    for s in (rep, req):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        port = rep.bind_to_random_port("tcp://127.0.0.1")
        with DelayProxy(target=("127.0.0.1", port), delay_s=0.02) as proxy:
            req.connect(proxy.address)

            def round_trip(payload: bytes) -> float:
                t0 = time.monotonic()
                req.send(payload)
                rep.send(rep.recv())
                assert req.recv() == payload
                return time.monotonic() - t0

            round_trip(b"warmup")  # the first one also carries the ZMTP handshake
            rtts = [round_trip(b"ping") for _ in range(3)]
            assert min(rtts) >= 0.040
            assert min(rtts) < 0.040 + 2 * SLACK_S
    finally:
        req.close()
        rep.close()
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
