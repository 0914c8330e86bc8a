"""What the ring's bulk links refuse: a tampered, a replayed and a reordered chunk each fail the
all-reduce at once with their own code (and the daemon keeps serving); a connection that does not
prove the link keys gets nothing and leaves nothing behind; the handshake's keys are fresh and
known only to the two ends."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import torch

from dllmd.net.bulk import connect as bulk_connect
from dllmd.net.bulk.connect import split_endpoint
from dllmd.net.bulk.handshake import CONFIRM_BYTES, HELLO, REPLY, HandshakeRefused, Initiator, Mode, Responder, \
    parse_hello
from dllmd.net.bulk.link import HEADER, BulkLinkCode
from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import Role
from dllmd.train.ring import RingError, RingMember, RingSocket, ring_allreduce
from tests.test_ring import assert_ring_sums, form, make_ring, with_ring

HANDSHAKE_UP = (HELLO.size, CONFIRM_BYTES)  # the handshake's messages, each relayed as soon as it is whole
HANDSHAKE_DOWN = (REPLY.size,)


class FrameProxy:
    """A man in the middle of one bulk link: relays the handshake untouched, then hands each frame to
    ``up(index, frame)`` (initiator to responder) or ``down(index, frame)`` (back), which return the
    frames to forward instead."""

    def __init__(self, target: str, up=None, down=None):
        self.target = split_endpoint(target)
        self.up, self.down = up or forward, down or forward
        self.frames = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.close()

    async def _relay(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        pipes = [asyncio.ensure_future(self._frames(reader, up_writer, HANDSHAKE_UP, self.up)),
                 asyncio.ensure_future(self._frames(up_reader, writer, HANDSHAKE_DOWN, self.down))]
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        up_writer.close()
        writer.close()

    async def _frames(self, reader, writer, handshake: tuple[int, ...], mutate) -> None:
        try:
            for size in handshake:
                writer.write(await reader.readexactly(size))
                await writer.drain()
            index = 0
            while True:
                header = await reader.readexactly(HEADER.size)
                frame = header + await reader.readexactly(int.from_bytes(header[-4:], "big"))
                for out in mutate(index, frame):
                    writer.write(out)
                index += 1
                self.frames += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


def forward(index: int, frame: bytes) -> list[bytes]:
    return [frame]


def tampered(index: int, frame: bytes) -> list[bytes]:
    if index != 2:
        return [frame]
    broken = bytearray(frame)
    broken[HEADER.size + 5] ^= 0x01  # one bit of the sealed chunk
    return [bytes(broken)]


def replayed(index: int, frame: bytes) -> list[bytes]:
    return [frame, frame] if index == 2 else [frame]


class Reordered:
    def __init__(self):
        self.held = None

    def __call__(self, index: int, frame: bytes) -> list[bytes]:
        if index == 2:
            self.held = frame
            return []
        if index == 3:
            return [frame, self.held]
        return [frame]


@pytest.mark.parametrize("mutation,code", [(lambda: tampered, BulkLinkCode.REJECTED),
                                           (lambda: replayed, BulkLinkCode.UNEXPECTED),
                                           (Reordered, BulkLinkCode.REJECTED)],
                         ids=["tampered", "replayed", "reordered"])
def test_a_tampered_replayed_or_reordered_chunk_fails_the_all_reduce_with_its_code(tmp_path, mutation, code):
    async def main():
        sockets, members, close = make_ring(tmp_path, 3)  # generation 1, without a proxy
        # The link of ranks 0 and 1 goes through the proxy, whichever of them dials; ring data flows
        # from 0 to 1 on it, so rank 1 receives what the proxy did.
        dialer, responder = sorted((0, 1), key=lambda r: members[r].public_key)
        proxy = FrameProxy(members[responder].endpoint, up=mutation(), down=mutation())
        endpoint = await proxy.start()

        def through_proxy(rank, view):
            if rank != dialer:
                return view
            view = list(view)
            view[responder] = RingMember(view[responder].public_key, endpoint)
            return view

        try:
            form(sockets, members, 2, through_proxy)
            buffers = [torch.randn(40_000) for _ in range(3)]
            results = await asyncio.gather(*(ring_allreduce(sockets[r], buffers[r], r, 3, step=1, bucket_bytes=12288,
                                                            timeout=10) for r in range(3)), return_exceptions=True)
            assert all(isinstance(r, RingError) for r in results), results  # every rank fails; none waits it out
            assert results[1].code == code, results[1]
            assert proxy.frames > 2
            form(sockets, members, 3)  # formed anew without the man in the middle, the ring works again
            await assert_ring_sums(sockets, step=1)
        finally:
            proxy.close()
            close()

    asyncio.run(main())


def _raw_exchange(endpoint: str, payload: bytes, timeout: float = 3.0) -> bytes:
    """Connect, send ``payload``, and return everything the listener sends back before it closes."""
    host, port = split_endpoint(endpoint)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        received = b""
        try:
            sock.sendall(payload)
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:  # closed with some of what we sent unread: a reset, and still nothing for us
            pass
        return received


def test_a_connection_that_does_not_prove_the_keys_gets_nothing_and_allocates_nothing(tmp_path, monkeypatch):
    links = []
    real_link = bulk_connect.BulkLink
    monkeypatch.setattr(bulk_connect, "BulkLink", lambda *a, **k: links.append(a) or real_link(*a, **k))

    async def body(sockets, members):
        await assert_ring_sums(sockets, step=1)  # every link is up now
        formed = len(links)
        assert formed == 6  # three pairs, one end each side
        target = max(sockets, key=lambda t: t.identity.public_key)  # both other members dial it
        member = next(t for t in sockets if t is not target).identity
        outsider = Identity.generate()
        impostor = bytearray(Initiator(outsider, target.identity.public_key, 1, Mode.AEAD).hello())
        impostor[17:49] = bytes.fromhex(member.public_key)  # claims a member's key without its secret
        attempts = {
            "garbage": os.urandom(HELLO.size + 64),
            "an outsider's handshake": Initiator(outsider, target.identity.public_key, 1, Mode.AEAD).hello(),
            "a member's key without its secret": bytes(impostor),
            "a member, for another generation": Initiator(member, target.identity.public_key, 99, Mode.AEAD).hello(),
            "a member, in plaintext": Initiator(member, target.identity.public_key, 1, Mode.PLAINTEXT).hello(),
            "a member already linked": Initiator(member, target.identity.public_key, 1, Mode.AEAD).hello(),
        }
        for what, payload in attempts.items():
            got = await asyncio.to_thread(_raw_exchange, target.endpoint, payload)
            assert got == b"", f"{what}: the listener answered {got[:16]!r}"
        assert len(links) == formed  # no link, no threads, no buffers for any of them
        await assert_ring_sums(sockets, step=2)

    with_ring(tmp_path, 3, body)


def test_a_silent_connection_is_dropped_after_the_handshake_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(bulk_connect, "HANDSHAKE_TIMEOUT_S", 0.3)

    async def body(sockets, _members):
        host, port = split_endpoint(sockets[0].endpoint)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"DLLM")  # a start, and then nothing
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the listener, nothing sent
        writer.close()

    with_ring(tmp_path, 2, body)


def test_the_handshake_agrees_fresh_keys_only_the_two_ends_know():
    initiator_id, responder_id, other = Identity.generate(), Identity.generate(), Identity.generate()
    sessions = []
    for _ in range(2):
        initiator = Initiator(initiator_id, responder_id.public_key, 7, Mode.AEAD)
        hello = parse_hello(initiator.hello())
        assert (hello.generation, hello.initiator_key, hello.responder_key) == (7, initiator_id.public_key,
                                                                               responder_id.public_key)
        responder = Responder(responder_id, hello)
        confirm, keys_i = initiator.finish(responder.reply())
        keys_r = responder.finish(confirm)
        assert keys_i.send == keys_r.receive and keys_i.receive == keys_r.send and keys_i.send != keys_i.receive
        assert keys_i.send_prefix != keys_i.receive_prefix
        sessions.append((initiator.hello(), responder.reply(), confirm, keys_i))
    assert sessions[0][3].send != sessions[1][3].send  # fresh per connection, same generation and nodes

    # A replayed HELLO gets a REPLY, but no one without the initiator's ephemeral key can confirm it.
    replay = Responder(responder_id, parse_hello(sessions[0][0]))
    for confirm in (sessions[0][2], os.urandom(32)):
        with pytest.raises(HandshakeRefused):
            replay.finish(confirm)
    # A HELLO for another node, and a REPLY from a node that does not hold the responder's key.
    with pytest.raises(HandshakeRefused):
        Responder(other, parse_hello(sessions[0][0]))
    initiator = Initiator(initiator_id, responder_id.public_key, 7, Mode.AEAD)
    wrong = Responder(other, parse_hello(Initiator(initiator_id, other.public_key, 7, Mode.AEAD).hello()))
    with pytest.raises(HandshakeRefused) as mismatch:
        initiator.finish(wrong.reply())
    assert mismatch.value.mismatch
    # A key that is not a curve point of any use (all zeros: a low-order point) is refused.
    bad = bytearray(Initiator(initiator_id, responder_id.public_key, 7, Mode.AEAD).hello())
    bad[81:113] = bytes(32)
    with pytest.raises(HandshakeRefused):
        Responder(responder_id, parse_hello(bytes(bad)))


def test_a_daemon_survives_a_tampered_ring_and_runs_the_next_one(daemon_factory):
    admin, peer = Identity.generate(), Identity.generate()
    node = daemon_factory("ring", keys={admin.public_key: Role.ADMIN, peer.public_key: Role.PEER},
                          config={"bench_operations": True})

    async def main():
        local = RingSocket(peer, "127.0.0.1")
        async with RpcClient(admin, node.address, node.public_key) as c:
            opened, _ = await c.call("ring.open", {"plaintext": False}, timeout=10)
            daemon = RingMember(node.public_key, opened["endpoint"])
            mine = RingMember(peer.public_key, local.endpoint)
            # Whoever dials goes through a proxy that flips a bit of the third frame towards the daemon.
            daemon_dials = node.public_key < peer.public_key
            if daemon_dials:
                proxy = FrameProxy(local.endpoint, down=tampered)
                via = RingMember(peer.public_key, await proxy.start())
                daemon_view, local_view = [daemon, via], [daemon, mine]
            else:
                proxy = FrameProxy(daemon.endpoint, up=tampered)
                via = RingMember(node.public_key, await proxy.start())
                daemon_view, local_view = [daemon, mine], [via, mine]
            local.form(1, local_view[0], local_view[0], local_view, 1)
            run = {"members": [{"public_key": m.public_key, "endpoint": m.endpoint} for m in daemon_view], "rank": 0,
                   "elements": 40_000, "iterations": 1, "bucket_bytes": 8192, "generation": 1, "timeout_s": 10,
                   "algorithm": "ring"}
            remote = asyncio.ensure_future(c.call("ring.run", run, timeout=30))
            with pytest.raises(RingError):
                await ring_allreduce(local, torch.full((40_000,), 2.0), 1, 2, step=0, bucket_bytes=8192, timeout=10)
            with pytest.raises(RemoteError) as failed:
                await remote
            assert failed.value.code == "unavailable" and BulkLinkCode.REJECTED.value in failed.value.message
            proxy.close()
            assert (await c.call("ping", timeout=10))[0]  # the daemon kept serving
            # Generation 2, without the proxy: the daemon's ring runs again.
            local.form(2, daemon, daemon, [daemon, mine], 1)
            run["members"] = [{"public_key": m.public_key, "endpoint": m.endpoint} for m in (daemon, mine)]
            remote = asyncio.ensure_future(c.call("ring.run", {**run, "generation": 2}, timeout=30))
            for step in range(2):  # the warm-up and one timed all-reduce
                buffer = torch.full((40_000,), 2.0)
                await ring_allreduce(local, buffer, 1, 2, step=step, bucket_bytes=8192, timeout=10)
                assert bool((buffer == 3).all())
            result, _ = await remote
            assert len(result["seconds"]) == 1
        local.close()

    asyncio.run(main())
