"""The ring all-reduce itself: sums equal a local sum, bitwise identical on every rank, over CURVE
(only authorized predecessors) and over explicitly allowed plaintext."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.train.ring import RingError, RingMember, RingSocket, ring_allreduce


def _ring(tmp_path, size: int, plaintext: bool):
    ids = [Identity.generate() for _ in range(size)]
    keys = AuthorizedKeys(tmp_path / "authorized_keys.toml")
    for identity in ids:
        keys.authorize(identity.public_key, Role.PEER)
    sockets = [RingSocket(identity, "127.0.0.1", plaintext=plaintext, authorized=keys.admits) for identity in ids]
    members = [RingMember(identity.public_key, s.endpoint) for identity, s in zip(ids, sockets)]
    for rank, sock in enumerate(sockets):
        sock.form(1, members[(rank - 1) % size], members[(rank + 1) % size], members, rank)

    def close():
        for sock in sockets:
            sock.close()

    return sockets, close


@pytest.mark.parametrize("size,plaintext,elements", [(2, False, 1000), (3, False, 3 * 1024 * 1024 + 7),
                                                     (4, True, 10), (5, False, 4)])
def test_ring_sum_matches_local_sum_and_is_identical_everywhere(tmp_path, size, plaintext, elements):
    async def main():
        sockets, close = _ring(tmp_path, size, plaintext)
        try:
            inputs = [torch.randn(elements, generator=torch.Generator().manual_seed(r)) for r in range(size)]
            buffers = [t.clone() for t in inputs]
            await asyncio.gather(*(ring_allreduce(sockets[r], buffers[r], r, size, step=3, bucket_bytes=1 << 20)
                                   for r in range(size)))
            expected = torch.stack(inputs).double().sum(0)
            for buffer in buffers:
                assert torch.equal(buffer, buffers[0])  # bitwise: every rank takes the same step
            assert torch.allclose(buffers[0].double(), expected, atol=1e-5)
        finally:
            close()

    asyncio.run(main())


def test_reset_wakes_a_waiting_rank_with_an_error(tmp_path):
    async def main():
        sockets, close = _ring(tmp_path, 3, False)
        try:
            # Rank 2 never joins: the others wait until the ring is reset under them.
            pending = [asyncio.ensure_future(ring_allreduce(sockets[r], torch.ones(100), r, 3, step=1))
                       for r in range(2)]
            await _until(lambda: all(s.running for s in sockets[:2]))  # both are blocked on a receive
            for sock in sockets[:2]:
                sock.fail_pending(RingError("peer died"))
            for task in pending:
                # The reset's own error, at once: not the ring's receive timeout.
                with pytest.raises(RingError, match="peer died"):
                    await asyncio.wait_for(task, 10)
        finally:
            close()

    asyncio.run(main())


async def _until(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
