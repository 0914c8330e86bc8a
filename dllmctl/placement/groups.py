"""Tensor-parallel and hybrid layouts: which nodes form each group, which layers each group holds, and
each member's slice. Pure.

A group acts as one stage whose speed is the sum of its members' and whose memory is what its most
loaded member allows: slices are sized by throughput (:mod:`.tensor`), so a member holds about
its share of the group's bytes (more by the rounding of whole heads; where its memory cannot
take that, the byte-balanced split, which holds it to its share). Groups are formed from nodes close to each other (round trips measured by the
nodes themselves, ``peers.ping``, where they are known: the fastest nodes whose neighbours are within
a LAN round trip), and the pipeline planner then gives each group its layers as it would a node, so
the links between stages may be slower.
``tensor`` is one group per replica holding every layer; ``hybrid`` a chain of groups per replica.
"""

from __future__ import annotations

from collections.abc import Mapping

from dllmctl.placement.layout import Layout, ModelShape, NodeCapacity, PlanError, Span, span_bytes
from dllmctl.placement.planner import DEFAULT_RESERVE_FRACTION, expected_ms, plan_layout, usable_budgets
from dllmctl.placement.tensor import TensorShape, member_bytes, split_span

Latency = Mapping[tuple[str, str], float]  # (node, node) -> measured round trip in ms
CLOSE_MS = 2.0  # a round trip a tensor-parallel group takes as a fast (LAN) link: two reductions a layer wait on it


def link_latency(measured: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Round trips per pair, both ways: the slower of what either end measured (a link is as slow as
    its slower direction, and each end may reach the other by another path)."""
    links: dict[tuple[str, str], float] = {}
    for (a, b), ms in measured.items():
        if a != b:
            slower = max(ms, measured.get((b, a), ms))
            links[(a, b)] = links[(b, a)] = slower
    return links


def plan_groups(model: ModelShape, shape: TensorShape, nodes: list[NodeCapacity], tp: int, replicas: int = 1,
                stages: int | None = None, latency: Latency | None = None,
                reserve_fraction: float = DEFAULT_RESERVE_FRACTION) -> Layout:
    """Groups of ``tp`` members: ``stages`` of them chained per replica (1: tensor parallelism; None:
    as many as the nodes allow). Raises :class:`PlanError` saying what is missing."""
    if tp < 1:
        raise PlanError("--tp must be at least 1")
    if tp > shape.kv_heads:
        raise PlanError(f"a group of {tp} cannot split {model.name}'s attention: it works with "
                        f"{shape.counts_that_work()}")
    if replicas < 1:
        raise PlanError("--replicas must be at least 1")
    usable = [n for n in nodes if n.gflops > 0 and n.free_memory_bytes > 0]
    per_chain = len(usable) // (tp * replicas)
    stages = per_chain if stages is None else stages
    if stages < 1 or tp * replicas * stages > len(usable):
        raise PlanError(f"{replicas} replica(s) of {max(stages, 1)} group(s) of {tp} need "
                        f"{tp * replicas * max(stages, 1)} nodes; {len(usable)} are up with memory and "
                        f"throughput: add nodes or lower --tp / --replicas")
    # Without round trips, the fastest nodes; with them, the fastest that have close neighbours.
    pool = usable if latency else sorted(usable, key=lambda n: (-n.gflops, n.name))[:tp * replicas * stages]
    groups = _form_groups(pool, tp, latency or {}, replicas * stages)
    budgets = usable_budgets(nodes, reserve_fraction)
    layout = Layout(model.name, replicas)
    for replica in range(replicas):
        chain = groups[replica::replicas]  # deal the groups round-robin: every chain gets fast and slow ones
        spans = _plan_chain(model, shape, chain, budgets, replica, reserve_fraction)
        if stages >= 2 and len({s.group for s in spans}) < 2:
            raise PlanError(f"{model.name} ended up in one group: a hybrid layout needs at least two stages "
                            f"(more nodes, or use --parallelism tensor)")
        layout.spans.extend(spans)
    speed = {n.name: n.gflops for n in nodes}
    for span in layout.spans:
        whole = span_bytes(model, span.start, span.end)  # the whole span, of which the member holds a slice
        share = span.bytes / whole if whole else 1.0
        layout.expected_ms[span.node] = expected_ms(model, span, speed[span.node], share)
    return layout


def _form_groups(nodes: list[NodeCapacity], tp: int, latency: Latency, count: int) -> list[list[NodeCapacity]]:
    """``count`` groups of ``tp``, one at a time: each seeded by the fastest free node with ``tp - 1``
    free nodes within :data:`CLOSE_MS` of it (its fastest such), or, where no seed has that many, by the
    one whose farthest member is nearest. So tensor parallelism runs among nodes with fast links, and a
    node far from the others is left to another group or out."""
    def rtt(a: str, b: str) -> float:
        return latency.get((a, b), latency.get((b, a), 0.0))

    def nearness(seed: NodeCapacity, n: NodeCapacity) -> tuple:
        ms = rtt(seed.name, n.name)  # within a LAN round trip the faster node, beyond it the nearer
        return (ms > CLOSE_MS, ms if ms > CLOSE_MS else 0.0, -n.gflops, n.name)

    free = sorted(nodes, key=lambda n: (-n.gflops, n.name))
    groups = []
    for _ in range(count):
        options = []
        for seed in free:
            near = sorted((n for n in free if n is not seed), key=lambda n: nearness(seed, n))
            members = [seed, *near[:tp - 1]]
            if len(members) == tp:
                options.append((max((rtt(seed.name, m.name) for m in members[1:]), default=0.0), members))
        if not options:
            break
        close = [option for option in options if option[0] <= CLOSE_MS]
        _, members = close[0] if close else min(options, key=lambda option: option[0])
        groups.append(members)
        free = [n for n in free if n not in members]
    return groups


def _plan_chain(model: ModelShape, shape: TensorShape, groups: list[list[NodeCapacity]], budgets: dict[str, int],
                replica: int, reserve_fraction: float) -> list[Span]:
    stand_ins = [NodeCapacity(name=str(i), free_memory_bytes=_group_memory(g, budgets, reserve_fraction),
                              gflops=sum(m.gflops for m in g)) for i, g in enumerate(groups)]
    try:
        chain = plan_layout(model, stand_ins, replicas=1, reserve_fraction=reserve_fraction)
    except PlanError as exc:
        names = "; ".join(", ".join(m.name for m in g) for g in groups)
        raise PlanError(f"groups {names}: {exc}") from None
    spans = []
    for stage, held in enumerate(chain.spans):
        members = groups[int(held.node)]
        name = f"r{replica}s{stage}" if len(chain.spans) > 1 else f"r{replica}"
        # Each part split by speed (the fastest passes); where a member's memory cannot take the extra head
        # that rounding gave it, every member's bytes held to its share instead.
        for even_bytes in (False, True):
            slices = split_span(shape, held.layers, [m.gflops for m in members], name, embed=held.embed,
                                head=held.head, even_bytes=even_bytes)
            sizes = [member_bytes(shape, held.layers, s, held.embed, held.head, model.tied) for s in slices]
            over = [(m, size) for m, size in zip(members, sizes) if size > budgets[m.name]]
            if not over:
                break
        if over:
            member, size = over[0]
            raise PlanError(f"{member.name}'s slice of layers [{held.start}, {held.end}) needs "
                            f"{size / 2**20:.1f} MiB, more than its {budgets[member.name] / 2**20:.1f} MiB usable")
        for member, tensor_slice, size in zip(members, slices, sizes):
            spans.append(Span(member.name, held.start, held.end, held.embed, held.head, size, tensor_slice))
    return spans


def _group_memory(members: list[NodeCapacity], budgets: dict[str, int], reserve_fraction: float) -> int:
    """The free memory a group offers as one stage: members hold shares of its bytes in proportion to
    their speed (at most, with the byte-balanced split), so the member with the least room per share
    sets the bound (before the planner's own reserve, which it applies again)."""
    total = sum(m.gflops for m in members)
    room = min(budgets[m.name] * total / m.gflops for m in members)
    return int(room / (1 - reserve_fraction))
