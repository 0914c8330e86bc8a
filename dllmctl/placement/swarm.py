"""Layouts over many nodes (a swarm): as many chains as raise the throughput, each of nodes that suit
one another, and nodes that would only slow a chain left out. Pure functions, no I/O.

:func:`~dllmctl.placement.planner.plan_layout` deals the nodes into exactly R chains of equal memory
and splits each chain's layers in proportion to speed. Over a thousand nodes that mixes fast and
slow nodes in every chain, and a node given one whole layer where its share was a fraction becomes
its chain's slowest stage: measured on a Llama-70B-shaped model over 1000 nodes it reached 0.23 to
0.64 of :func:`~dllmctl.placement.throughput.throughput_bound`. Here instead:

* **Chain rate by thresholds.** A node of speed ``s`` holding ``k`` layers keeps up with a chain
  that runs ``s / k`` (in GFLOP/s per layer); it can hold ``k`` for every ``k`` up to what its memory
  allows. So the fastest a set of nodes can run as one chain is the ``need``-th largest of all their
  ``s / k`` (``need``: the layers, plus the head rounded up to whole layers): whole layers and memory
  counted exactly, and a node all of whose ``s / k`` lie below it gets no layer, which is how a node
  whose one layer would be the chain's slowest stage is left out.
* **Chains of nodes that suit one another.** Nodes are sorted by speed over memory to the power
  0.5-1 (a node with little memory for its speed is best used where each node holds few layers,
  among faster ones), and cut into consecutive runs, each run a chain, by dynamic programming that
  maximizes the sum of the chains' rates: the number of chains is what pays, at least
  ``min_replicas`` (more chains is also more replicas). The exponent tried that scores best wins.
* **Bottleneck-optimal whole layers.** Within a chain, the layers are counted so that the slowest
  stage is as fast as whole layers allow (:func:`min_max_counts`), the last stage carrying the head;
  :func:`shifted_counts` does the same within a budget of moved layers, for a chain that lost a node.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from dllmctl.placement.layout import Layout, ModelShape, NodeCapacity, PlanError, Span, span_bytes
from dllmctl.placement.planner import (DEFAULT_RESERVE_FRACTION, capacity, check_request, expected_ms,
                                       head_layer_equivalents, usable_budgets)

# Sort keys tried: speed / memory**e. Measured over 1000 drawn nodes (docs/inference.md): 0.85 scores
# best on most draws, 0.5 where memory and speed go together, 1.0 on a few; each try costs ~0.1 s.
MEMORY_EXPONENTS = (0.5, 0.85, 1.0)
TIE_BONUS = 1e-9  # of the best chain's rate, per chain: breaks ties between partitions only


def plan_swarm(model: ModelShape, nodes: list[NodeCapacity], min_replicas: int = 1,
               reserve_fraction: float = DEFAULT_RESERVE_FRACTION) -> Layout:
    """A layout of ``model`` over ``nodes`` with as many disjoint chains (each covering every layer
    once) as raise the aggregate throughput, at least ``min_replicas``. Raises :class:`PlanError`
    naming what is missing when the nodes cannot hold that many chains."""
    check_request(model, nodes, min_replicas, reserve_fraction)
    budgets = usable_budgets(nodes, reserve_fraction)
    chains = form_chains(model, nodes, budgets, min_replicas)
    spans: list[Span] = []
    kept = 0
    for chain in chains:
        try:
            spans.extend(plan_chain(model, chain, budgets))
            kept += 1
        except PlanError:
            continue  # its ends cannot hold the embeddings or the head after all: its nodes stay idle
    if kept < min_replicas:
        raise PlanError(f"the nodes hold {kept} chain(s) of {model.name}, fewer than the {min_replicas} replicas "
                        f"asked for: add nodes or memory, or lower --replicas")
    layout = Layout(model.name, kept, spans)
    speed = {node.name: node.gflops for node in nodes}
    layout.expected_ms = {s.node: expected_ms(model, s, speed[s.node]) for s in spans}
    return layout


def layers_needed(model: ModelShape) -> int:
    """Layer slots one chain must fill: its layers, and the head as whole layers (rounded up)."""
    return model.num_layers + math.ceil(head_layer_equivalents(model) - 1e-9)


def end_slots(model: ModelShape) -> int:
    """Layer slots of memory a chain's ends give up to the embeddings and the head (with the embeddings
    again when they are tied), in the heaviest layer's bytes."""
    heaviest = max(model.layer_bytes)
    head = model.head_bytes + (model.embed_bytes if model.tied else 0)
    return math.ceil(model.embed_bytes / heaviest) + math.ceil(head / heaviest) if heaviest else 0


def slots(model: ModelShape, budget: int) -> int:
    """Layer slots of memory a node offers a chain (each as heavy as the heaviest layer), up to what one
    chain can use: its layers and head (:func:`layers_needed`) plus :func:`end_slots`, so that a node
    with room for the whole model can be a chain of its own (a replica) where that pays."""
    heaviest = max(model.layer_bytes)
    cap = layers_needed(model) + end_slots(model)
    return cap if heaviest == 0 else min(cap, budget // heaviest)


def form_chains(model: ModelShape, nodes: list[NodeCapacity], budgets: dict[str, int],
                min_chains: int) -> list[list[NodeCapacity]]:
    """The chains (at least ``min_chains``) whose rates sum highest over the sort keys tried."""
    usable = [n for n in nodes if n.gflops > 0 and slots(model, budgets[n.name]) > 0]
    room = {n.name: slots(model, budgets[n.name]) for n in usable}
    need = layers_needed(model)
    best: tuple[bool, float, list[list[NodeCapacity]]] | None = None
    most = 0
    for exponent in MEMORY_EXPONENTS:
        order = sorted(usable, key=lambda n: (-n.gflops / room[n.name] ** exponent, n.name))
        total, runs = partition(order, [room[n.name] for n in order], need, end_slots(model), min_chains)
        found = (len(runs) >= min_chains, total, [order[a:b] for a, b in runs])
        most = max(most, len(runs))
        if best is None or found[:2] > (best[0], best[1] + 1e-9):
            best = found
    if best is None or not best[0]:
        raise PlanError(f"the nodes hold at most {most} chain(s) of {model.name} ({need} layer slots each, with "
                        f"memory for the embeddings and head at the ends), fewer than the {min_chains} asked for: "
                        f"add nodes or memory, or lower --replicas")
    return best[2]


def partition(order: Sequence[NodeCapacity], room: Sequence[int], need: int, ends: int = 0,
              min_chains: int = 1) -> tuple[float, list[tuple[int, int]]]:
    """Consecutive runs ``[a, b)`` of ``order``, each a chain, maximizing the sum of their rates (nodes
    between runs are left out), with at least ``min_chains`` runs where the nodes allow. A bonus per
    chain, found by bisection, buys more chains where the best partition has too few."""
    rates = window_rates([n.gflops for n in order], room, need, ends)
    top = max((r for row in rates for r in row), default=0.0)
    # Where more chains tie with fewer, more: a replica serves one session without a hop, a longer
    # chain reaches its rate only with many sessions in flight.
    total, runs = _best_runs(rates, TIE_BONUS * top)
    if len(runs) >= min_chains:
        return total, runs
    most = _best_runs(rates, top * len(order) + 1.0)[1]  # a bonus this large maximizes the count
    if len(most) < min_chains:
        return _rate_sum(rates, most), most
    low, high = 0.0, top * len(order) + 1.0
    for _ in range(25):  # the count only steps, so a coarse bonus suffices
        mid = (low + high) / 2
        if len(_best_runs(rates, mid)[1]) >= min_chains:
            high = mid
        else:
            low = mid
    runs = _best_runs(rates, high)[1]
    return _rate_sum(rates, runs), runs


def window_rates(speeds: Sequence[float], room: Sequence[int], need: int, ends: int = 0) -> list[list[float]]:
    """``rates[a][k]``: the rate of a chain of nodes ``a .. a+k`` (0: they cannot fill ``need`` slots,
    or their memory cannot hold ``need + ends``: the ends also hold the embeddings and the head).

    A node of speed ``s`` with room for ``c`` layers offers the thresholds ``s/1 .. s/c``; the chain's
    rate is the ``need``-th largest threshold of its nodes, kept in a heap as the run grows. Runs are
    at most ``2 * need`` long: longer ones would leave most of their nodes without a layer.
    """
    n = len(speeds)
    longest = 2 * need
    rates = []
    for a in range(n):
        heap: list[float] = []
        row = []
        held = 0
        for b in range(a, min(n, a + longest)):
            s = speeds[b]
            held += room[b]
            for k in range(1, min(room[b], need) + 1):
                t = s / k
                if len(heap) < need:
                    heapq.heappush(heap, t)
                elif t > heap[0]:
                    heapq.heapreplace(heap, t)
                else:
                    break  # thresholds only fall with k
            row.append(heap[0] if len(heap) == need and held >= need + ends else 0.0)
        rates.append(row)
    return rates


def _best_runs(rates: list[list[float]], bonus: float) -> tuple[float, list[tuple[int, int]]]:
    """Dynamic programming over the cut points: ``best[b]`` is the highest sum (rates + ``bonus`` per
    chain) of runs within the first ``b`` nodes."""
    n = len(rates)
    longest = max(map(len, rates), default=0)
    best = [0.0] * (n + 1)
    start: list[int | None] = [None] * (n + 1)
    for b in range(1, n + 1):
        best[b], start[b] = best[b - 1], None
        for a in range(max(0, b - longest), b):
            row, k = rates[a], b - 1 - a
            if k < len(row) and row[k] > 0 and best[a] + row[k] + bonus > best[b]:
                best[b], start[b] = best[a] + row[k] + bonus, a
    runs, b = [], n
    while b > 0:
        if start[b] is None:
            b -= 1
        else:
            runs.append((start[b], b))
            b = start[b]
    runs.reverse()
    return _rate_sum(rates, runs), runs


def _rate_sum(rates: list[list[float]], runs: list[tuple[int, int]]) -> float:
    return sum(rates[a][b - 1 - a] for a, b in runs)


def plan_chain(model: ModelShape, members: list[NodeCapacity], budgets: dict[str, int]) -> list[Span]:
    """One chain over ``members`` covering every layer once, its slowest stage as fast as whole layers
    allow. The member with the most memory takes the head, the next the embeddings; members given no
    layer are left out."""
    n = model.num_layers
    if len(members) == 1:
        only = members[0]
        if capacity(model, budgets[only.name], True, "first") < n:
            raise PlanError(f"{only.name} cannot hold {model.name} alone")
        return [Span(only.name, 0, n, True, True, span_bytes(model, 0, n))]
    by_room = sorted(members, key=lambda m: (-budgets[m.name], m.name))
    last = next((m for m in by_room if capacity(model, budgets[m.name], False, "last") > 0), None)
    first = next((m for m in by_room if m is not last and capacity(model, budgets[m.name], False, "first") > 0), None)
    if last is None or first is None:
        raise PlanError(f"no two of {', '.join(m.name for m in members)} can hold the embeddings and the head")
    return spans_in_order(model, [first, *(m for m in members if m is not first and m is not last), last], budgets)


def spans_in_order(model: ModelShape, arranged: list[NodeCapacity], budgets: dict[str, int]) -> list[Span]:
    """A chain of ``arranged`` in this order (the first holds the embeddings, the last the head), its
    layers counted so that the slowest stage is as fast as whole layers allow; nodes given no layer
    are left out. Raises PlanError when their memory cannot hold the model."""
    caps, preload, floor = chain_limits(model, arranged, budgets)
    counts = min_max_counts(model.num_layers, [m.gflops for m in arranged], caps, preload, floor)
    return spans_from_counts(model, arranged, counts, budgets)


def chain_limits(model: ModelShape, arranged: list[NodeCapacity],
                 budgets: dict[str, int]) -> tuple[list[int], list[float], list[int]]:
    """For a chain in this order: the most layers each node may hold where it stands (the first also
    holds the embeddings, the last the head), the work besides its layers (the head, in layers), and
    the fewest (the ends hold at least one)."""
    if len(arranged) < 2:
        raise PlanError("a chain in order needs a first and a last node")
    positions = ["first", *["middle"] * (len(arranged) - 2), "last"]
    caps = [capacity(model, budgets[m.name], False, p) for m, p in zip(arranged, positions)]
    preload = [0.0] * (len(arranged) - 1) + [head_layer_equivalents(model)]
    floor = [1] + [0] * (len(arranged) - 2) + [1]
    return caps, preload, floor


def spans_from_counts(model: ModelShape, arranged: list[NodeCapacity], counts: Sequence[int],
                      budgets: dict[str, int]) -> list[Span]:
    """Consecutive spans, ``counts[i]`` layers on ``arranged[i]`` (none where it is 0)."""
    n = model.num_layers
    spans, start = [], 0
    for member, count in zip(arranged, counts):
        if count:
            spans.append(Span(member.name, start, start + count, start == 0, start + count == n,
                              span_bytes(model, start, start + count)))
            start += count
    for span in spans:  # capacities are conservative, so this holds by construction
        assert span.bytes <= budgets[span.node], (span, budgets[span.node])
    return spans


def min_max_counts(total: int, speeds: Sequence[float], caps: Sequence[int], preload: Sequence[float],
                   floor: Sequence[int]) -> list[int]:
    """Whole layers per node, summing to ``total``, that make the slowest stage as fast as possible:
    a stage's time is ``(count + preload) / speed``, each count within ``[floor, cap]``; a node
    without a floor may get none (it is left out). Raises PlanError when the caps cannot add up.

    Bisection on the time ``t`` (each node then holds as many layers as fit in ``t``), then the layers
    beyond ``total`` are taken back from the stages that would finish last.
    """
    if sum(caps) < total or any(f > c for f, c in zip(floor, caps)) or sum(floor) > total:
        raise PlanError(f"the nodes can hold {sum(caps)} of {total} layers")
    if any(s <= 0 for s in speeds):
        raise PlanError("every node of a chain needs a measured speed")

    def counts_at(t: float) -> list[int] | None:
        counts = []
        for s, c, p, f in zip(speeds, caps, preload, floor):
            k = min(c, math.floor(t * s - p + 1e-9))
            if k < f:
                return None
            counts.append(k)
        return counts

    low, high = 0.0, max((c + p) / s for s, c, p in zip(speeds, caps, preload))
    for _ in range(200):
        mid = (low + high) / 2
        counts = counts_at(mid)
        low, high = (low, mid) if counts is not None and sum(counts) >= total else (mid, high)
    counts = counts_at(high)
    assert counts is not None and sum(counts) >= total
    while sum(counts) > total:  # drop a layer from whoever would finish last (ties: the later node)
        worst = max((i for i in range(len(counts)) if counts[i] > floor[i]),
                    key=lambda i: ((counts[i] + preload[i]) / speeds[i], i))
        counts[worst] -= 1
    return counts


def shifted_counts(total: int, speeds: Sequence[float], caps: Sequence[int], preload: Sequence[float],
                   floor: Sequence[int], before: Sequence[tuple[int, int] | None], budget: int) -> list[int] | None:
    """Whole layers per node, in order, summing to ``total``, whose slowest stage (``(count + preload) /
    speed``) is fastest among those that move at most ``budget`` layers from ``before`` (each node's
    layers now, None for none); None when no such split exists.

    The slowest stage's time is one of the ``(k + preload) / speed``: binary search over those, and for
    each, dynamic programming over the boundaries finds the fewest moved layers with every stage within
    it (``fewest[b]``: after each node, for the first ``b`` layers taken).
    """
    def least_moved(t: float) -> list[int] | None:
        inf = budget + 1
        fewest = [0] + [inf] * total  # before any node: no layer taken, nothing moved
        choices: list[list[int]] = []
        for s, cap, p, low, old in zip(speeds, caps, preload, floor, before):
            most = min(cap, math.floor(t * s - p + 1e-9)) if s > 0 else 0
            lo, hi = old if old else (0, 0)
            nxt, took = [inf] * (total + 1), [0] * (total + 1)
            for b, moved in enumerate(fewest):
                if moved >= inf:
                    continue
                for k in range(low, min(most, total - b) + 1):
                    # new layers: the k taken, less those of [b, b + k) this node holds now
                    cost = moved + k - max(0, min(hi, b + k) - max(lo, b))
                    if cost < nxt[b + k]:
                        nxt[b + k], took[b + k] = cost, k
            fewest = nxt
            choices.append(took)
        if fewest[total] > budget:
            return None
        counts, b = [], total
        for took in reversed(choices):
            counts.append(took[b])
            b -= took[b]
        return counts[::-1]

    times = sorted({(k + p) / s for s, c, p, f in zip(speeds, caps, preload, floor) if s > 0
                    for k in range(max(f, 1), min(c, total) + 1)})
    found = least_moved(times[-1]) if times else None
    if found is None:
        return None
    low, high = 0, len(times) - 1  # times[high] is feasible
    while low < high:
        mid = (low + high) // 2
        counts = least_moved(times[mid])
        if counts is None:
            low = mid + 1
        else:
            high, found = mid, counts
    return found
