"""All-reduce over a ring socket's links, by the algorithm that suits the buffer.

``allreduce(..., algorithm="auto")`` takes the ring for large buffers (bandwidth-optimal) and the
tree (recursive doubling: floor(log2 n) messages deep, one more when n is not a power of two) for
small ones, where the ring's 2(n-1) sequential hops cost more than its lower traffic saves.
The threshold (``allreduce_plan.TREE_MAX_BYTES``) is measured: ``dllmctl bench allreduce --sweep``.
Every rank computes the same choice from the same size, so they always agree.
"""

from __future__ import annotations

import time

import torch

from dllmd.train.allreduce_plan import TREE_PIECE_BYTES, choose, tree_plan
from dllmd.train.ring import AllReduceStats, RingCode, RingError, RingSocket, ring_allreduce, sent_bytes

ALGORITHMS = ("auto", "ring", "tree")


async def tree_allreduce(ring: RingSocket, flat: torch.Tensor, rank: int, size: int, step: int,
                         timeout: float = 60.0) -> AllReduceStats:
    """Sum ``flat`` over the ring's members by recursive doubling, in place; bitwise the same on
    every rank (not necessarily the ring's bits: the order of the additions differs). Needs a
    ring formed with its member list."""
    stats = AllReduceStats()
    if size == 1:
        return stats
    if len(ring.members) != size or ring.rank != rank:
        raise RingError("the tree needs the ring formed with its members and this rank", RingCode.NOT_FORMED)
    started = time.perf_counter()
    array = flat.numpy()
    plan = tree_plan(rank, size, array.size, max(1, TREE_PIECE_BYTES // array.itemsize))
    peers = {op.peer: ring.members[op.peer].public_key for op in plan.ops if op.peer >= 0}
    await ring.execute(plan, array, peers, step, timeout)
    stats.bytes_sent = sent_bytes(plan, array.itemsize)
    stats.seconds = time.perf_counter() - started
    return stats


def pick(ring: RingSocket, flat: torch.Tensor, size: int, algorithm: str = "auto") -> str:
    """``ring`` or ``tree``: what ``allreduce`` runs for this buffer."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    if algorithm != "auto":
        return algorithm
    return choose(flat.numel() * flat.element_size(), size, tree_possible=len(ring.members) == size)


async def allreduce(ring: RingSocket, flat: torch.Tensor, rank: int, size: int, step: int, algorithm: str = "auto",
                    bucket_bytes: int | None = None, timeout: float = 60.0) -> AllReduceStats:
    """Sum ``flat`` (a contiguous 1-D CPU tensor) over the ring's members, in place, by ``pick``'s algorithm."""
    if pick(ring, flat, size, algorithm) == "tree":
        return await tree_allreduce(ring, flat, rank, size, step, timeout)
    return await ring_allreduce(ring, flat, rank, size, step, bucket_bytes, timeout)
