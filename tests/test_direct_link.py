"""The direct link a tensor-parallel group's partial sums travel on (dllmd/net/bulk/direct.py), and the
group listener that admits only the group's members (dllmd/inference/tensor_group.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from dllmd.inference.tensor_group import GroupChannel, GroupMember
from dllmd.net.bulk.connect import dial_blocking, join_endpoint
from dllmd.net.bulk.direct import LENGTH, DirectLink, LinkBroken, LinkTimeout
from dllmd.net.bulk.handshake import LinkKeys
from dllmd.net.bulk.link import BulkLinkCode, BulkLinkError
from dllmd.net.identity import Identity


def _pair(max_bytes: int = 1 << 20, spin_s: float = 0.0) -> tuple[DirectLink, DirectLink, socket.socket]:
    """Two ends over loopback TCP with matching keys (the handshake is tested below and in the ring
    tests), and the raw socket of the second end's peer, for writing what an attacker would."""
    server = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    server.close()
    k1, k2 = os.urandom(32), os.urandom(32)
    left = DirectLink(a, LinkKeys(k1, k2, b"i2r\0", b"r2i\0"), "a" * 64, max_bytes, spin_s)
    right = DirectLink(b, LinkKeys(k2, k1, b"r2i\0", b"i2r\0"), "b" * 64, max_bytes, spin_s)
    return left, right, a


def test_messages_of_several_frames_arrive_whole_and_in_order_both_ways():
    left, right, _ = _pair(spin_s=0.0002)
    big = os.urandom(300_000)  # more than one read of the kernel's buffer
    for i in range(5):
        left.send([struct.pack("!I", i), memoryview(big), b""], 5)
    right.send([b"back"], 5)
    for i in range(5):
        assert right.receive(5) == [struct.pack("!I", i), big, b""]
    assert left.receive(5) == [b"back"]


def test_a_timeout_leaves_the_link_usable_and_a_closed_peer_breaks_it():
    left, right, _ = _pair()
    with pytest.raises(LinkTimeout):
        right.receive(0.05)
    left.send([b"late"], 5)
    assert right.receive(2) == [b"late"]
    left.close()
    with pytest.raises(LinkBroken, match="closed by the peer"):
        right.receive(2)
    with pytest.raises(LinkBroken):  # for good
        right.send([b"x"], 1)


def _sealed(link: DirectLink, frames: list[bytes]) -> bytes:
    """What ``link.send`` writes, captured from a socket pair of its own."""
    a, b = socket.socketpair()
    real, link.sock = link.sock, a
    try:
        link.send(frames, 1)
        return b.recv(1 << 20)
    finally:
        link.sock = real
        a.close()
        b.close()


def test_tampered_replayed_and_oversized_messages_break_the_link():
    left, right, raw = _pair()
    wire = bytearray(_sealed(left, [b"partial sum"]))
    wire[-1] ^= 1
    raw.sendall(wire)
    with pytest.raises(LinkBroken, match="authentication"):
        right.receive(2)

    left, right, raw = _pair()
    wire = _sealed(left, [b"step 1"])
    raw.sendall(wire)
    assert right.receive(2) == [b"step 1"]
    raw.sendall(wire)  # the same bytes again: frame 1 is not sealed under frame 0's nonce
    with pytest.raises(LinkBroken, match="authentication"):
        right.receive(2)

    left, right, raw = _pair(max_bytes=4096)
    raw.sendall(LENGTH.pack(1 << 30))  # claims a gigabyte: refused before anything is read or allocated
    with pytest.raises(LinkBroken, match="at most 4096"):
        right.receive(2)
    with pytest.raises(ValueError, match="at most 4096"):
        left.send([bytes(5000)], 1)


def test_the_group_listener_admits_its_members_only():
    async def main():
        identities = [Identity.generate() for _ in range(3)]
        lower = GroupChannel(identities[0], "127.0.0.1", 1 << 20)
        upper = GroupChannel(identities[1], "127.0.0.1", 1 << 20)
        endpoints = [join_endpoint("127.0.0.1", c.port) for c in (lower, upper)]
        members = [GroupMember(i.public_key, e) for i, e in zip(identities, endpoints)]
        try:
            outsider = identities[2]
            # Before the group is formed, and afterwards to a key outside it: refused, nothing sent back.
            with pytest.raises(BulkLinkError) as refused:
                await asyncio.to_thread(dial_blocking, outsider, endpoints[0], identities[0].public_key, lower.port, 1.0)
            assert refused.value.code == BulkLinkCode.REFUSED
            lower.connect(0, members[:2])
            upper.connect(1, members[:2])
            with pytest.raises(BulkLinkError):
                await asyncio.to_thread(dial_blocking, outsider, endpoints[0], identities[0].public_key, lower.port, 1.0)
            # The member of rank 1 dials rank 0; a message goes each way.
            await asyncio.to_thread(upper.send, 0, 5, 1, 0, b"to the leader")
            got = await asyncio.to_thread(lower.receive, 1, 1, 0, (5,), 2.0)
            assert got == [b"to the leader"]
            await asyncio.to_thread(lower.send, 1, 5, 1, 1, b"and back")
            assert await asyncio.to_thread(upper.receive, 0, 1, 1, (5,), 2.0) == [b"and back"]
        finally:
            lower.close()
            upper.close()
            await asyncio.sleep(0.05)

    asyncio.run(main())
