"""Bounded memory per caller: a client-role key that floods a node with large requests and never reads
a reply leaves the daemon's memory within +256 MiB, and the daemon keeps answering others."""

from __future__ import annotations

import asyncio
import time

import psutil
import torch
import zmq

from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity, curve_public_z85
from dllmd.net.keys import Role
from dllmd.net.wire import Request, encode_request

MIB = 1 << 20
FLOOD_S = 6.0


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_a_flooding_client_cannot_hold_the_nodes_memory(daemon_factory, user):
    flooder = Identity.generate()
    daemon = daemon_factory(keys={user.public_key: Role.ADMIN, flooder.public_key: Role.CLIENT})

    async def admin_ping() -> float:
        async with RpcClient(user, daemon.address, daemon.public_key) as admin:
            started = time.monotonic()
            assert (await admin.call("ping", timeout=20))[0]["pong"]
            return time.monotonic() - started

    asyncio.run(admin_ping())  # warm: the daemon's own first-request allocations are not the flood's
    baseline = _rss(daemon.proc.pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_secretkey, sock.curve_publickey = flooder.curve_secret, flooder.curve_public
    sock.curve_serverkey = curve_public_z85(daemon.public_key)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 1)  # it never reads: replies pile up on the daemon's side, not ours
    sock.linger = 0
    sock.connect(daemon.address)
    payload = torch.zeros(MIB // 4)  # 1 MiB a request
    requests = [encode_request(Request(id=i, op=op, args=args, tensors=[payload])) for i, (op, args) in enumerate(
        [("ping", {}), ("jobs.metrics", {"job": "none"}), ("session.close", {"session": "abcdefgh12"})] * 3)]
    sent, peak, pings = 0, baseline, []
    deadline = time.monotonic() + FLOOD_S
    try:
        while time.monotonic() < deadline:
            try:
                sock.send_multipart(requests[sent % len(requests)], zmq.NOBLOCK, copy=False)
                sent += 1
            except zmq.Again:  # the node stopped reading: what backpressure looks like from here
                time.sleep(0.01)
            if sent % 200 == 0:
                peak = max(peak, _rss(daemon.proc.pid))
            if sent % 1000 == 0:
                pings.append(asyncio.run(admin_ping()))
        peak = max(peak, _rss(daemon.proc.pid))
        pings.append(asyncio.run(admin_ping()))
    finally:
        sock.close()
        ctx.term()
    print(f"flood: {sent} requests ({sent} MiB) in {FLOOD_S:.0f} s; RSS {baseline / MIB:.0f} MiB before, "
          f"{peak / MIB:.0f} MiB at most; admin pings {max(pings):.2f} s at worst")
    assert sent >= 500, "the flood did not get going"
    assert peak - baseline <= 256 * MIB
    assert daemon.proc.poll() is None and max(pings) < 30  # answered, not a speed target


def test_each_caller_has_a_budget_of_requests_in_progress():
    """The budget a flood meets when its requests are slow to finish: counted per key, by role."""
    from dllmd.net.server import CALLER_BUDGET

    client_count, client_bytes = CALLER_BUDGET[None]
    assert client_bytes <= 256 * MIB and client_count <= 64
    assert CALLER_BUDGET[Role.PEER][1] >= 64 * MIB * 4  # a peer's training chunks are tens of MiB each
