"""All-reduce schedules as data: what one rank sends, receives and adds, and in which order.

Pure (no I/O): ``dllmd.train.allreduce_run`` executes a plan over bulk links. A plan is a list of
``Op``; a send or a local add starts once the ops it depends on are done, and every receive is
expected from the start (it writes only where, by the schedule's causality, nothing reads any
more: see each plan). Regions are element ranges of the caller's flat buffer.

* ``ring_plan``: bucketed reduce-scatter then all-gather around the ring (bandwidth-optimal: every
  link carries 2(n-1)/n of the buffer; 2(n-1) messages deep per bucket).
* ``tree_plan``: recursive doubling (pairwise exchanges of the whole buffer, floor(log2 n) messages
  deep, one more when n is not a power of two), for buffers too small for bandwidth to matter,
  where the ring's 2(n-1) hops of latency do.

Both give bitwise identical sums on every rank: in the ring each chunk is summed by one owner and
copied; in the tree both ends of an exchange compute a + b of the same two partial sums, and IEEE
addition is commutative.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class OpKind(IntEnum):
    SEND = 0  # send region to peer
    RECV_ADD = 1  # receive a chunk from peer and add it to region
    RECV_COPY = 2  # receive a chunk from peer into region
    RECV_SCRATCH = 3  # receive a chunk from peer into scratch[scratch : scratch + len(region)]
    ADD = 4  # region += scratch[scratch : scratch + len(region)]


class Phase(IntEnum):
    REDUCE_SCATTER = 0
    ALL_GATHER = 1
    TREE_FOLD = 2  # a rank beyond the largest power of two hands its buffer to its partner below it
    TREE_LEVEL = 3  # hop = the level of recursive doubling
    TREE_UNFOLD = 4  # ... and gets the sum back


@dataclass(frozen=True)
class Op:
    kind: OpKind
    lo: int
    hi: int
    peer: int = -1  # the other rank (sends, receives)
    bucket: int = 0
    phase: Phase = Phase.REDUCE_SCATTER
    hop: int = 0
    scratch: int = -1  # an offset in the plan's scratch buffer (RECV_SCRATCH, ADD)
    deps: tuple[int, ...] = ()  # indices of the ops that must be done first (SEND, ADD)


@dataclass(frozen=True)
class Plan:
    ops: tuple[Op, ...]
    scratch_elements: int = 0  # elements of the scratch buffer the plan needs


# Measured on loopback (dllmctl bench allreduce --sweep, docs/allreduce.md): below this many bytes
# per rank the tree's fewer rounds win, above it the ring's lower traffic does.
TREE_MAX_BYTES = 256 * 1024
TREE_PIECE_BYTES = 4 * 1024 * 1024  # a tree exchanges at most this much per message


def split(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` in ``parts`` contiguous ranges, the first ones one longer (as numpy's array_split)."""
    size, extra = divmod(hi - lo, parts)
    bounds, start = [], lo
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def choose(nbytes: int, size: int, tree_possible: bool = True) -> str:
    """The algorithm ``allreduce(..., algorithm="auto")`` takes: every rank computes the same."""
    return "tree" if tree_possible and size >= 2 and nbytes <= TREE_MAX_BYTES else "ring"


def ring_plan(rank: int, size: int, elements: int, bucket_elements: int, in_flight: int) -> Plan:
    """Rank ``rank`` of a ring of ``size``: buckets of ``bucket_elements`` (at least ``size``), each cut
    into ``size`` chunks; at most ``in_flight`` buckets started and not finished.

    Chunks are sent straight from the buffer and received straight into it. That is safe because
    every chunk this rank writes after sending it is one whose reduce-scatter message the successor
    must have taken before the all-gather can bring that chunk back."""
    if size < 2:
        return Plan(())
    per_bucket = max(size, bucket_elements)
    pred, succ = (rank - 1) % size, (rank + 1) % size
    ops: list[Op] = []
    last_of_bucket: list[int] = []
    for index, lo in enumerate(range(0, elements, per_bucket)):
        chunks = split(lo, min(lo + per_bucket, elements), size)
        previous: tuple[int, ...] = (last_of_bucket[index - in_flight],) if index >= in_flight else ()
        for phase in (Phase.REDUCE_SCATTER, Phase.ALL_GATHER):
            for hop in range(size - 1):
                # reduce-scatter: rank r ends owning chunk r + 1; all-gather: the owned chunks go round.
                out = (rank - hop) % size if phase == Phase.REDUCE_SCATTER else (rank - hop + 1) % size
                into = (out - 1) % size
                ops.append(Op(OpKind.SEND, *chunks[out], succ, index, phase, hop, deps=previous))
                kind = OpKind.RECV_ADD if phase == Phase.REDUCE_SCATTER else OpKind.RECV_COPY
                ops.append(Op(kind, *chunks[into], pred, index, phase, hop))
                previous = (len(ops) - 1,)  # the next hop sends what this one received
        last_of_bucket.append(len(ops) - 1)
    return Plan(tuple(ops))


def tree_plan(rank: int, size: int, elements: int, piece_elements: int) -> Plan:
    """Recursive doubling for any ``size``: with p the largest power of two <= size, rank p + i first
    hands its buffer to rank i (which adds it), ranks below p exchange and add with rank ^ 2^k for
    each level k, and rank i hands the sum back to rank p + i. Long buffers go as independent
    pieces of ``piece_elements``, each with its own slot of scratch per level.

    The sum is the same binary tree on every rank. A region is added to only once its send is done
    (ADD depends on the SEND); the extra rank's receive overwrites its buffer only after the sum
    came back, which its partner sends only after it took the whole buffer."""
    if size < 2:
        return Plan(())
    power = 1 << (size.bit_length() - 1)
    levels = power.bit_length() - 1
    ops: list[Op] = []
    scratch = 0
    for index, (lo, hi) in enumerate(split(0, elements, max(1, -(-elements // max(1, piece_elements))))):
        if rank >= power:
            partner = rank - power
            ops.append(Op(OpKind.SEND, lo, hi, partner, index, Phase.TREE_FOLD))
            ops.append(Op(OpKind.RECV_COPY, lo, hi, partner, index, Phase.TREE_UNFOLD))
            continue
        previous: tuple[int, ...] = ()
        folded = rank + power < size
        if folded:
            ops.append(Op(OpKind.RECV_SCRATCH, lo, hi, rank + power, index, Phase.TREE_FOLD, scratch=scratch))
            ops.append(Op(OpKind.ADD, lo, hi, scratch=scratch, deps=(len(ops) - 1,)))
            scratch += hi - lo
            previous = (len(ops) - 1,)
        for level in range(levels):
            partner = rank ^ (1 << level)
            ops.append(Op(OpKind.SEND, lo, hi, partner, index, Phase.TREE_LEVEL, level, deps=previous))
            ops.append(Op(OpKind.RECV_SCRATCH, lo, hi, partner, index, Phase.TREE_LEVEL, level, scratch=scratch))
            ops.append(Op(OpKind.ADD, lo, hi, scratch=scratch, deps=(len(ops) - 2, len(ops) - 1)))
            scratch += hi - lo
            previous = (len(ops) - 1,)
        if folded:
            ops.append(Op(OpKind.SEND, lo, hi, rank + power, index, Phase.TREE_UNFOLD, deps=previous))
    return Plan(tuple(ops), scratch)


def tree_partners(rank: int, size: int) -> set[int]:
    """The ranks ``tree_plan`` exchanges with."""
    return {op.peer for op in tree_plan(rank, size, 1, 1).ops if op.peer >= 0}
