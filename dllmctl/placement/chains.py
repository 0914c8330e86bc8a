"""Which spans form chains: a layout is a flat list of spans (what nodes report), and a chain is a run
of them that covers every layer once, each meeting the next end to start. Pure.

Routing may join any span to any that starts where it ends, so chains are read back from the spans,
not remembered: as many complete chains as the spans hold, the fastest first (the widest path), so a
chain keeps spans of about one speed as the planner made it; a broken chain's survivors are what is
left.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping

from dllmctl.placement.layout import ModelShape
from dllmctl.placement.planner import head_layer_equivalents

Range = tuple[int, int]  # layers [start, end)
Chain = dict[str, Range]  # node -> its layers; the ranges of one chain never overlap


def current_chains(spans: Chain, replicas: int, num_layers: int,
                   rates: Mapping[str, float] | None = None) -> list[Chain]:
    """Split the current spans into ``replicas`` chains: as many complete ones (covering every layer)
    as the spans hold, then the rest each covering as many layers as it can.

    Complete chains come first, found as disjoint paths through the spans (a unit-capacity flow),
    because taking the longest cover greedily could mix a broken chain's fragments with a complete
    one and leave two broken. Spans left over (more chains than replicas, or spans overlapping oddly)
    belong to no chain: their nodes count as idle. A chain may come out empty when every node of a
    replica is gone. ``rates`` (node -> tokens/s of its span), where given, keep fast spans together.
    """
    chains = complete_chains(spans, num_layers, replicas, rates)
    used = {node for chain in chains for node in chain}
    left = sorted(((node, r) for node, r in spans.items() if node not in used),
                  key=lambda kv: (kv[1][1], kv[1][0], kv[0]))
    while len(chains) < replicas:
        chain = dict(_most_layers_without_overlap(left))
        chains.append(chain)
        left = [kv for kv in left if kv[0] not in chain]
    return chains


def complete_chains(spans: Chain, num_layers: int, most: int, rates: Mapping[str, float] | None = None) -> list[Chain]:
    """Up to ``most`` disjoint chains of ``spans``, each covering layers ``[0, num_layers)``, as many as
    the spans hold.

    The fastest chain first (the widest path by ``rates``), peeled off one after the other: a chain
    then keeps spans of about one speed, as the planner made it, and a broken chain's survivors are
    what is left. Where peeling strands spans that more chains could use, augmenting paths over the
    layer boundaries decide which spans are in chains (each span an edge of capacity one,
    Ford-Fulkerson) and the chains are peeled from those. Deterministic: spans by start, end, node.
    """
    rates = rates or {}
    chains = _peel(spans, num_layers, most, rates)
    if len(chains) < most:
        # Start from the peeled chains' flow: augmenting paths then only look for the chains beyond them.
        count, used = _disjoint_covers(spans, num_layers, most, {node for chain in chains for node in chain},
                                       len(chains))
        if count > len(chains):  # peeling within a union of disjoint covers always finds them all
            chains = _peel({node: spans[node] for node in used}, num_layers, most, rates)
    return chains


def _peel(spans: Chain, num_layers: int, most: int, rates: Mapping[str, float]) -> list[Chain]:
    """Widest chains, one after the other, until ``most`` or none is left."""
    order = sorted(spans.items(), key=lambda kv: (kv[1], kv[0]))
    taken: set[str] = set()
    chains = []
    while len(chains) < most:
        chain = _widest_path(order, taken, num_layers, rates)
        if chain is None:
            break
        chains.append(chain)
        taken.update(chain)
    return chains


def _widest_path(order: list[tuple[str, Range]], taken: set[str], num_layers: int,
                 rates: Mapping[str, float]) -> Chain | None:
    """The chain from layer 0 to ``num_layers`` through the spans of ``order`` (sorted by start, end,
    node) not ``taken`` whose slowest span is fastest (ties: the earlier span), or None."""
    best: dict[int, tuple[float, list[str]]] = {0: (math.inf, [])}
    for node, (start, end) in order:
        if start in best and node not in taken and 0 <= start < end <= num_layers:
            width = min(best[start][0], rates.get(node, 1.0))
            if end not in best or width > best[end][0]:
                best[end] = (width, best[start][1] + [node])
    if num_layers not in best:
        return None
    chosen = set(best[num_layers][1])
    return {node: r for node, r in order if node in chosen}


def _disjoint_covers(spans: Chain, num_layers: int, most: int, used: set[str] | None = None,
                     count: int = 0) -> tuple[int, set[str]]:
    """How many disjoint chains covering every layer the spans hold (up to ``most``), and the spans in
    them: augmenting paths over the layer boundaries, each span an edge of capacity one, from the
    flow of ``count`` disjoint covers made of the spans ``used``."""
    out: dict[int, list[tuple[int, str]]] = {}
    into: dict[int, list[tuple[int, str]]] = {}
    for node, (start, end) in sorted(spans.items(), key=lambda kv: (kv[1], kv[0])):
        if 0 <= start < end <= num_layers:
            out.setdefault(start, []).append((end, node))
            into.setdefault(end, []).append((start, node))
    used = set(used or ())
    while count < most:
        path = _augmenting_path(out, into, used, num_layers)
        if path is None:
            break
        for node, forward in path:
            (used.add if forward else used.discard)(node)
        count += 1
    return count, used


def _augmenting_path(out: dict[int, list[tuple[int, str]]], into: dict[int, list[tuple[int, str]]], used: set[str],
                     sink: int) -> list[tuple[str, bool]] | None:
    """Spans (forward: take it; backward: give a taken one back) from layer 0 to ``sink``, or None."""
    seen = {0}
    stack: list[tuple[int, list[tuple[str, bool]]]] = [(0, [])]
    while stack:
        position, path = stack.pop()
        if position == sink:
            return path
        steps = [(start, node, False) for start, node in into.get(position, []) if node in used]
        steps += [(end, node, True) for end, node in out.get(position, []) if node not in used]
        for nxt, node, forward in steps:  # the last pushed is tried first: forward spans, the longest first
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [(node, forward)]))
    return None


def _most_layers_without_overlap(spans: list[tuple[str, Range]]) -> list[tuple[str, Range]]:
    """Weighted interval scheduling over ``spans`` (sorted by end): the most layers, no overlaps."""
    ends = [end for _, (_, end) in spans]
    best: list[tuple[int, list]] = [(0, [])]  # best[i]: the best choice among the first i spans
    for i, (node, (start, end)) in enumerate(spans):
        before = best[bisect_right(ends, start, 0, i)]
        taken = (before[0] + end - start, before[1] + [(node, (start, end))])
        best.append(taken if taken[0] > best[i][0] else best[i])
    return best[-1][1]


def span_rates(model: ModelShape, spans: Chain, speeds: Mapping[str, float]) -> dict[str, float]:
    """Node -> how fast its span runs (the inverse of :func:`_stage_seconds`; 0 for an unmeasured node)."""
    return {node: 1 / stage_seconds(model, r, speeds[node]) if speeds[node] > 0 else 0.0
            for node, r in spans.items()}


def stage_seconds(model: ModelShape, layers: Range, gflops: float) -> float:
    """Relative decode time of a stage holding ``layers`` (the head counted where the span ends the model)."""
    head = head_layer_equivalents(model) if layers[1] == model.num_layers else 0.0
    return (layers[1] - layers[0] + head) / gflops if gflops > 0 else math.inf


