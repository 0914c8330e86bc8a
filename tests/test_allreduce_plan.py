"""The all-reduce schedules as data: every rank's plan of a ring or a tree, executed together over an
in-memory network in random orders (no sockets), sums exactly, is bitwise the same on every rank,
never writes a region a pending send still reads, and never reuses a tag on a link."""

from __future__ import annotations

import random
from collections import defaultdict, deque

import numpy as np
import pytest

from dllmd.train.allreduce_plan import TREE_MAX_BYTES, OpKind, Plan, choose, ring_plan, split, tree_partners, tree_plan


def simulate(plans: list[Plan], inputs: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Run every rank's plan, one step at a time in a random order that respects what the executor
    guarantees: a send or an add starts once its dependencies are done; a send is queued on its
    link and read from the buffer only when the link gets to it (then it is done and on the wire);
    a receive happens once its message is on the wire. Writing a region that a queued send has not
    read yet is the hazard the plans must exclude by construction."""
    rng = random.Random(seed)
    buffers = [x.copy() for x in inputs]
    scratch = [np.zeros(p.scratch_elements, dtype=x.dtype) for p, x in zip(plans, inputs)]
    waiting = [[len(op.deps) for op in p.ops] for p in plans]
    dependents = [defaultdict(list) for _ in plans]
    receives = {}  # (from, to, tag) -> op index at "to"
    for rank, plan in enumerate(plans):
        for i, op in enumerate(plan.ops):
            for d in op.deps:
                dependents[rank][d].append(i)
            if op.kind not in (OpKind.SEND, OpKind.ADD):
                key = (op.peer, rank, op.bucket, op.phase, op.hop)
                assert key not in receives, "a tag is expected twice on one link"
                receives[key] = i
    ready = [(r, i) for r, p in enumerate(plans) for i, op in enumerate(p.ops)
             if op.kind in (OpKind.SEND, OpKind.ADD) and not op.deps]
    links: dict[tuple[int, int], deque] = defaultdict(deque)  # (from, to) -> queued send ops
    queued_regions = [defaultdict(int) for _ in plans]  # rank -> (lo, hi) -> queued sends reading it
    left = sum(len(p.ops) for p in plans)

    def complete(rank: int, i: int) -> None:
        nonlocal left
        left -= 1
        for later in dependents[rank][i]:
            waiting[rank][later] -= 1
            if not waiting[rank][later]:
                ready.append((rank, later))

    def check_write(rank: int, lo: int, hi: int) -> None:
        assert not any(lo < h and l < hi for (l, h), n in queued_regions[rank].items() if n), \
            f"rank {rank} writes [{lo}, {hi}) while a queued send still reads it"

    while left:
        busy = [key for key, q in links.items() if q]
        assert ready or busy, "deadlock: nothing can proceed"
        if busy and (not ready or rng.random() < 0.4):
            rank, peer = rng.choice(busy)
            i = links[(rank, peer)].popleft()  # the link reads the region now and sends it
            op = plans[rank].ops[i]
            queued_regions[rank][(op.lo, op.hi)] -= 1
            j = receives.pop((rank, peer, op.bucket, op.phase, op.hop))  # the message is taken on arrival
            recv = plans[peer].ops[j]
            assert recv.hi - recv.lo == op.hi - op.lo
            payload = buffers[rank][op.lo:op.hi]
            if recv.kind == OpKind.RECV_SCRATCH:
                scratch[peer][recv.scratch:recv.scratch + recv.hi - recv.lo] = payload
            else:
                check_write(peer, recv.lo, recv.hi)
                if recv.kind == OpKind.RECV_ADD:
                    buffers[peer][recv.lo:recv.hi] += payload
                else:
                    buffers[peer][recv.lo:recv.hi] = payload
            complete(rank, i)
            complete(peer, j)
            continue
        rank, i = ready.pop(rng.randrange(len(ready)))
        op = plans[rank].ops[i]
        if op.kind == OpKind.SEND:
            links[(rank, op.peer)].append(i)
            queued_regions[rank][(op.lo, op.hi)] += 1
            continue
        check_write(rank, op.lo, op.hi)
        buffers[rank][op.lo:op.hi] += scratch[rank][op.scratch:op.scratch + op.hi - op.lo]
        complete(rank, i)
    assert not receives, "receives nobody sent to"
    return buffers


SIZES = [1, 2, 3, 4, 5, 7, 8]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("elements,bucket,in_flight", [(0, 8, 2), (1, 8, 2), (7, 8, 2), (503, 37, 3)])
def test_ring_plan_sums_exactly_and_identically(size, elements, bucket, in_flight):
    inputs = [np.arange(elements, dtype=np.float64) * (r + 1) for r in range(size)]  # integers: exact sums
    plans = [ring_plan(r, size, elements, bucket, in_flight) for r in range(size)]
    for seed in range(3):
        out = simulate(plans, inputs, seed)
        for buf in out:
            np.testing.assert_array_equal(buf, sum(inputs))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("elements,piece", [(0, 4), (1, 4), (257, 100)])
def test_tree_plan_is_bitwise_identical_on_every_rank(size, elements, piece):
    gen = np.random.default_rng(size * 1000 + elements)
    inputs = [gen.standard_normal(elements).astype(np.float32) for _ in range(size)]
    plans = [tree_plan(r, size, elements, piece) for r in range(size)]
    exact = np.sum(np.stack(inputs).astype(np.float64), axis=0) if elements else np.zeros(0)
    for seed in range(3):
        out = simulate(plans, inputs, seed)
        for buf in out:
            assert buf.tobytes() == out[0].tobytes()  # bitwise, not just close
        np.testing.assert_allclose(out[0], exact, rtol=1e-5, atol=1e-5)


def test_ring_plan_is_bitwise_identical_on_every_rank_with_floats():
    size, elements = 5, 4099
    gen = np.random.default_rng(7)
    inputs = [gen.standard_normal(elements).astype(np.float32) for _ in range(size)]
    out = simulate([ring_plan(r, size, elements, 256, 2) for r in range(size)], inputs, 0)
    assert all(buf.tobytes() == out[0].tobytes() for buf in out)


@pytest.mark.parametrize("size,rounds", [(2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (8, 3), (12, 4), (16, 4), (20, 5)])
def test_the_tree_is_log2_messages_deep_and_one_more_for_other_node_counts(size, rounds):
    # The longest chain of messages, each sent only after what it depends on arrived.
    plans = [tree_plan(r, size, 1, 1) for r in range(size)]
    depth = [[0] * len(p.ops) for p in plans]  # messages on the longest chain up to each op's completion
    changed = True
    while changed:
        changed = False
        for r, plan in enumerate(plans):
            for i, op in enumerate(plan.ops):
                if op.kind in (OpKind.SEND, OpKind.ADD):
                    # An add waits for its own send to be read out, not for it to arrive.
                    value = max((depth[r][d] - (plan.ops[d].kind == OpKind.SEND) for d in op.deps), default=0)
                    value += op.kind == OpKind.SEND
                else:
                    sender = plans[op.peer].ops
                    value = max(depth[op.peer][j] for j, s in enumerate(sender) if s.kind == OpKind.SEND and
                                s.peer == r and (s.bucket, s.phase, s.hop) == (op.bucket, op.phase, op.hop))
                if value != depth[r][i]:
                    depth[r][i], changed = value, True
    assert max(max(d) for d in depth) == rounds


def test_tree_partners_are_symmetric_and_few():
    for size in range(1, 40):
        for r in range(size):
            partners = tree_partners(r, size)
            assert r not in partners and all(r in tree_partners(p, size) for p in partners)
            assert len(partners) <= size.bit_length()


def test_split_and_choice():
    assert split(0, 10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert split(5, 5, 3) == [(5, 5)] * 3
    assert choose(1024, 4) == "tree" and choose(TREE_MAX_BYTES + 4, 4) == "ring"
    assert choose(1024, 4, tree_possible=False) == "ring"
