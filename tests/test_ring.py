"""The ring and the tree all-reduce over real bulk links on 127.0.0.1: sums equal a local sum, bitwise
identical on every rank, encrypted (the default) and over explicitly allowed plaintext, for any node
count; a reset wakes waiting ranks with its own error."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dllmd.net.bulk.link import BulkLinkCode
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.train.allreduce import allreduce, pick, tree_allreduce
from dllmd.train.allreduce_plan import TREE_MAX_BYTES
from dllmd.train.ring import RingCode, RingError, RingMember, RingSocket, ring_allreduce


def make_ring(tmp_path, size: int, plaintext: bool = False, endpoints=None):
    """``size`` ring sockets of authorized peers, formed as generation 1 with their member list.
    ``endpoints(rank, members)`` may change the member list a rank is given (a proxy in between)."""
    ids = [Identity.generate() for _ in range(size)]
    keys = AuthorizedKeys(tmp_path / "authorized_keys.toml")
    for identity in ids:
        keys.authorize(identity.public_key, Role.PEER)
    sockets = [RingSocket(identity, "127.0.0.1", plaintext=plaintext, authorized=keys.admits) for identity in ids]
    members = [RingMember(identity.public_key, s.endpoint) for identity, s in zip(ids, sockets)]
    form(sockets, members, 1, endpoints)

    def close():
        for sock in sockets:
            sock.close()

    return sockets, members, close


def form(sockets, members, generation: int, endpoints=None) -> None:
    size = len(sockets)
    for rank, sock in enumerate(sockets):
        view = endpoints(rank, members) if endpoints else members
        sock.form(generation, view[(rank - 1) % size], view[(rank + 1) % size], view, rank)


def inputs(size: int, elements: int) -> list[torch.Tensor]:
    return [torch.randn(elements, generator=torch.Generator().manual_seed(r)) for r in range(size)]


async def run_all(fn, sockets, buffers, step: int = 3, timeout: float = 30.0, **kwargs):
    size = len(sockets)
    return await asyncio.wait_for(asyncio.gather(*(fn(sockets[r], buffers[r], r, size, step=step, **kwargs)
                                                   for r in range(size))), timeout + 5)


def with_ring(tmp_path, size: int, body, plaintext: bool = False) -> None:
    """Run ``await body(sockets, members)`` on a fresh ring of ``size``, closed afterwards."""
    async def main():
        sockets, members, close = make_ring(tmp_path, size, plaintext)
        try:
            await body(sockets, members)
        finally:
            close()

    asyncio.run(main())


async def assert_ring_sums(sockets, step: int, elements: int = 1000) -> None:
    """Every rank contributes rank + 1: the ring works if every element becomes n(n+1)/2."""
    size = len(sockets)
    buffers = [torch.full((elements,), float(r + 1)) for r in range(size)]
    await run_all(ring_allreduce, sockets, buffers, step=step)
    assert all(bool((b == size * (size + 1) / 2).all()) for b in buffers)


@pytest.mark.parametrize("size,plaintext,elements", [(2, False, 1000), (3, False, 3 * 1024 * 1024 + 7),
                                                     (4, True, 10), (4, False, 100_003), (5, False, 4)])
def test_ring_sum_matches_local_sum_and_is_identical_everywhere(tmp_path, size, plaintext, elements):
    async def body(sockets, _members):
        xs = inputs(size, elements)
        expected = torch.stack(xs).double().sum(0)
        # Twice on the same links, with another bucket size and step: nothing is left over in between.
        for step, bucket in ((3, 1 << 20), (4, 4096 * size)):
            buffers = [t.clone() for t in xs]
            await run_all(ring_allreduce, sockets, buffers, step=step, bucket_bytes=bucket)
            assert all(torch.equal(b, buffers[0]) for b in buffers)  # bitwise: every rank takes the same step
            assert torch.allclose(buffers[0].double(), expected, atol=1e-5)

    with_ring(tmp_path, size, body, plaintext)


@pytest.mark.parametrize("size,elements", [(1, 5), (2, 7), (3, 1), (5, 1001), (6, 64)])
def test_tree_sum_is_exact_within_rounding_and_bitwise_identical_everywhere(tmp_path, size, elements):
    async def body(sockets, _members):
        xs = inputs(size, elements)
        buffers = [t.clone() for t in xs]
        await run_all(tree_allreduce, sockets, buffers)
        assert all(b.numpy().tobytes() == buffers[0].numpy().tobytes() for b in buffers)
        assert torch.allclose(buffers[0].double(), torch.stack(xs).double().sum(0), atol=1e-5)

    with_ring(tmp_path, size, body)


def test_auto_takes_the_tree_for_small_buffers_and_the_ring_for_large_ones(tmp_path):
    small, large = TREE_MAX_BYTES // 4, TREE_MAX_BYTES // 4 + 1

    async def body(sockets, _members):
        assert pick(sockets[0], torch.zeros(small), 3) == "tree"
        assert pick(sockets[0], torch.zeros(large), 3) == "ring"
        for elements in (small, large):
            xs = inputs(3, elements)
            buffers = [t.clone() for t in xs]
            stats = await run_all(allreduce, sockets, buffers)
            assert all(torch.equal(b, buffers[0]) for b in buffers)
            assert torch.allclose(buffers[0].double(), torch.stack(xs).double().sum(0), atol=1e-5)
            # Rank 1 of the tree sends the whole buffer once; of the ring, 2(n-1)/n of it.
            sent = stats[1].bytes_sent
            assert sent == small * 4 if elements == small else abs(sent - 4 / 3 * large * 4) < 64

    with_ring(tmp_path, 3, body)


def test_a_ring_of_one_is_a_no_op(tmp_path):
    async def body(sockets, _members):
        buffer = torch.arange(10.0)
        for fn in (ring_allreduce, tree_allreduce, allreduce):
            await fn(sockets[0], buffer, 0, 1, step=1)
        assert torch.equal(buffer, torch.arange(10.0))

    with_ring(tmp_path, 1, body)


def test_reset_wakes_a_waiting_rank_with_an_error(tmp_path):
    async def body(sockets, _members):
        # Rank 2 never joins: the others wait until the ring is reset under them.
        pending = [asyncio.ensure_future(ring_allreduce(sockets[r], torch.ones(100), r, 3, step=1)) for r in range(2)]
        await until(lambda: all(s.running for s in sockets[:2]))  # both are inside an all-reduce
        for sock in sockets[:2]:
            sock.fail_pending(RingError("peer died"))
        # At once, not after the ring's timeout: the reset's own error, or (for rank 1, whose link
        # rank 0's reset closed a moment before its own reset came) the lost link.
        errors = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
        assert isinstance(errors[0], RingError) and "peer died" in str(errors[0])
        assert isinstance(errors[1], RingError) and ("peer died" in str(errors[1]) or
                                                      errors[1].code == BulkLinkCode.LOST), errors[1]
        # A reset ring refuses to run until it is formed again.
        with pytest.raises(RingError) as refused:
            await ring_allreduce(sockets[0], torch.ones(100), 0, 3, step=2, timeout=5)
        assert refused.value.code == RingCode.ABORTED

    with_ring(tmp_path, 3, body)


def test_a_re_formed_ring_runs_on_new_links(tmp_path):
    async def body(sockets, members):
        await assert_ring_sums(sockets, step=1)
        form(sockets, members, 2)
        await assert_ring_sums(sockets, step=1)

    with_ring(tmp_path, 3, body)


def test_a_member_the_node_does_not_authorize_never_links(tmp_path):
    async def body(sockets, members):
        outsider = Identity.generate()  # named in the ring, but not in the authorized keys
        stranger = RingSocket(outsider, "127.0.0.1")
        try:
            ring = [members[0], RingMember(outsider.public_key, stranger.endpoint)]
            sockets[0].form(2, ring[1], ring[1], ring, 0)
            stranger.form(2, ring[0], ring[0], ring, 1)
            results = await asyncio.gather(ring_allreduce(sockets[0], torch.ones(10), 0, 2, step=1, timeout=1.5),
                                           ring_allreduce(stranger, torch.ones(10), 1, 2, step=1, timeout=1.5),
                                           return_exceptions=True)
            # The node that authorizes says so at once; the outsider never gets a link.
            assert [r.code for r in results] == [RingCode.UNAUTHORIZED, RingCode.TIMEOUT], results
        finally:
            stranger.close()

    with_ring(tmp_path, 2, body)


async def until(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
