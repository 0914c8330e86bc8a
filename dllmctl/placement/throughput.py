"""How many tokens per second a layout can decode, and an upper bound no layout can beat. Pure.

A stage's rate is one token per :func:`~dllmctl.placement.planner.expected_ms` of its span (the
planner's compute model: decode reads every weight once per token). A layout's throughput is the
most tokens per second its spans can carry from the first layer to the head when every stage runs
full pipelines: a maximum flow over the layer boundaries, each span an edge from its first layer to
its end with its stage's rate as capacity. That is the routed capacity whatever the chains the
planner meant (routing may join any span that ends where another starts), so it judges a layout
without trusting the planner's own bookkeeping.

The bound: every token needs every layer and the head computed once, and a node computes at most
its GFLOP/s, so no layout decodes more than the nodes' total GFLOP/s over one token's FLOPs. It
ignores memory, whole layers and chains, so it is an upper bound, not a target.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Mapping

from dllmctl.placement.layout import ModelShape, NodeCapacity, Span, span_bytes
from dllmctl.placement.planner import expected_ms


def throughput_bound(model: ModelShape, nodes: list[NodeCapacity]) -> float:
    """Tokens/s of the whole model run on every node's GFLOP/s at once (no layout does better)."""
    whole = Span("", 0, model.num_layers, True, True)
    return sum(1000 / expected_ms(model, whole, node.gflops) for node in nodes if node.gflops > 0)


def stage_rates(model: ModelShape, spans: list[Span], gflops: Mapping[str, float]) -> dict[tuple[int, int], float]:
    """Tokens/s each run of layers ``(start, end)`` can take, summed over the stages that hold it. A
    tensor-parallel group is one stage, as fast as its slowest member."""
    groups: dict[tuple[str, int, int], float] = {}
    rates: dict[tuple[int, int], float] = defaultdict(float)
    for span in spans:
        share = 1.0
        if span.tensor_slice is not None:
            whole = span_bytes(model, span.start, span.end) or 1
            share = min(1.0, span.bytes / whole)
        speed = gflops.get(span.node, 0.0)
        rate = 1000 / expected_ms(model, span, speed, share) if speed > 0 else 0.0
        if span.tensor_slice is None:
            rates[(span.start, span.end)] += rate
        else:
            key = (span.group, span.start, span.end)
            groups[key] = min(groups.get(key, rate), rate)
    for (_, start, end), rate in groups.items():
        rates[(start, end)] += rate
    return dict(rates)


def layout_throughput(model: ModelShape, spans: list[Span], gflops: Mapping[str, float]) -> float:
    """The most tokens/s the spans carry from layer 0 through the head (a maximum flow, Dinic's)."""
    return max_flow(stage_rates(model, spans, gflops), 0, model.num_layers)


def max_flow(capacity: Mapping[tuple[int, int], float], source: int, sink: int) -> float:
    """Maximum flow from ``source`` to ``sink`` over edges ``(a, b) -> capacity``. Dinic's algorithm:
    breadth-first levels, then blocking flows by depth-first search; the layer graph is small (one
    vertex per layer boundary), so this takes milliseconds even for a thousand spans."""
    residual: dict[int, dict[int, float]] = defaultdict(dict)
    for (a, b), cap in capacity.items():
        if cap > 0 and a != b:
            residual[a][b] = residual[a].get(b, 0.0) + cap
            residual[b].setdefault(a, 0.0)
    total = 0.0
    while True:
        level = _levels(residual, source)
        if sink not in level:
            return total
        pointers = {v: list(edges) for v, edges in residual.items()}
        while True:
            pushed = _push(residual, level, pointers, source, sink, float("inf"))
            if pushed <= 0:
                break
            total += pushed


EPSILON = 1e-12  # residual capacity below this counts as none (float sums of rates)


def _levels(residual: dict[int, dict[int, float]], source: int) -> dict[int, int]:
    level = {source: 0}
    queue = deque([source])
    while queue:
        v = queue.popleft()
        for w, cap in residual[v].items():
            if cap > EPSILON and w not in level:
                level[w] = level[v] + 1
                queue.append(w)
    return level


def _push(residual: dict[int, dict[int, float]], level: dict[int, int], pointers: dict[int, list[int]], v: int,
          sink: int, limit: float) -> float:
    if v == sink:
        return limit
    edges = pointers.get(v, [])
    while edges:
        w = edges[-1]
        cap = residual[v][w]
        if cap > EPSILON and level.get(w) == level[v] + 1:
            pushed = _push(residual, level, pointers, w, sink, min(limit, cap))
            if pushed > 0:
                residual[v][w] -= pushed
                residual[w][v] += pushed
                return pushed
        edges.pop()
    return 0.0
