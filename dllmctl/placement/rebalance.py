"""A new layout after nodes joined or left, moving as few layers as possible. Pure functions, no I/O.

What a change costs is the layers nodes must fetch and load: per node, the layers of its new span
that it does not hold now ("moved layers"). Three candidate layouts are compared:

* the repair: the current chains stay as they are, and the layers a chain lacks are taken by its
  spans next to the gap growing into it and by nodes that serve nothing, layer by layer to whoever
  would then finish its share soonest; chains lost entirely are planned afresh over the idle nodes.
  It moves only the missing layers, the least possible, whenever memory allows it;
* a fresh plan with the nodes ordered by the layers they hold now, so that it tends to line up
  with the current spans;
* a fresh plan in the caller's order, as ``dllmctl plan`` makes it.

The one moving the fewest layers wins; ties go to the better balance (the slowest node's
layers / GFLOP/s is smaller), then to the earlier candidate. Memory budgets are those of
:func:`~dllmctl.planner.plan_layout`: free memory less the reserve, against :func:`span_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from dllmctl.placement.chains import Chain, Range, current_chains, span_rates, stage_seconds
from dllmctl.placement.layout import Layout, ModelShape, NodeCapacity, PlanError, Span, span_bytes
from dllmctl.placement.planner import DEFAULT_RESERVE_FRACTION, check_request, plan_layout, usable_budgets


@dataclass(frozen=True)
class Move:
    """One node's change of span: ``before``/``after`` are its layers, None when it holds none."""

    node: str
    before: Range | None
    after: Range | None

    @property
    def new_layers(self) -> int:
        """Layers of its new span the node does not hold now: what it must fetch and load."""
        return self.after[1] - self.after[0] - _overlap(self.before, self.after) if self.after else 0

    def to_json(self) -> dict:
        return {"node": self.node, "from": list(self.before) if self.before else None,
                "to": list(self.after) if self.after else None}


@dataclass
class Rebalance:
    layout: Layout
    moves: list[Move]
    """Every node whose span changes (grows, shrinks, shifts, appears or goes), in the caller's order."""
    how: str = ""
    """Which kind of candidate it is, where a caller compared several (:mod:`.churn`)."""

    @property
    def moved_layers(self) -> int:
        """Layers nodes must fetch and load: what the change costs."""
        return moved_layers(self.moves)

    @property
    def changed(self) -> bool:
        return bool(self.moves)

    def to_json(self) -> dict:
        """``{"model", "replicas", "moved_layers", "spans": [as plan_layout's], "moves": [{"node", "from", "to"}]}``,
        with ``throughput`` (as :meth:`Layout.to_json`) and ``how`` where the swarm rebalancer chose it."""
        plan = self.layout.to_json()
        doc = {"model": plan["model"], "replicas": plan["replicas"], "moved_layers": self.moved_layers,
               "spans": plan["spans"], "moves": [move.to_json() for move in self.moves]}
        if "throughput" in plan:
            doc["throughput"] = plan["throughput"]
        if self.how:
            doc["how"] = self.how
        return doc


def plan_rebalance(model: ModelShape, nodes: list[NodeCapacity], current: list[Span], replicas: int = 1,
                   reserve_fraction: float = DEFAULT_RESERVE_FRACTION, fresh_plans: bool = True) -> Rebalance:
    """The layout of ``model`` over ``nodes`` (``replicas`` chains) closest to the ``current`` spans.

    ``current`` holds what nodes serve now, at most one span per node; spans of nodes missing from
    ``nodes`` (they left or are down) are dropped. ``nodes[i].free_memory_bytes`` is what the node
    could give this model, counting the weights it holds for it now as free. ``fresh_plans=False``
    considers the repair only (over a swarm a fresh plan moves nearly every layer). Raises
    :class:`PlanError` naming what is missing when no layout fits.
    """
    check_request(model, nodes, replicas, reserve_fraction)
    budgets = usable_budgets(nodes, reserve_fraction)
    present = {node.name for node in nodes}
    held = {span.node: (span.start, span.end) for span in current if span.node in present}
    candidates = []
    repaired = _repair(model, nodes, held, budgets, replicas, reserve_fraction)
    if repaired is not None:
        candidates.append(repaired)
    failure = PlanError(f"the current chains of {model.name} cannot be repaired: no idle node or neighbour can "
                        f"take the missing layers")
    for order in (_by_held_layers(nodes, held), nodes) if fresh_plans else ():
        try:
            candidates.append(plan_layout(model, order, replicas, reserve_fraction).spans)
        except PlanError as exc:
            failure = exc  # the last one kept is the caller's order: the message 'dllmctl plan' gives
    if not candidates:
        raise failure
    speeds = {node.name: node.gflops for node in nodes}
    moves = [moves_between(nodes, held, spans) for spans in candidates]
    # Fewest layers moved, then fewest spans rebuilt (a node that only drops its span loads nothing),
    # then the fastest chain.
    best = min(range(len(candidates)),
               key=lambda i: (moved_layers(moves[i]), sum(1 for m in moves[i] if m.after),
                              _slowest_seconds(candidates[i], speeds), i))
    return Rebalance(Layout(model.name, replicas, candidates[best]), moves[best])


def moved_layers(moves: list[Move]) -> int:
    return sum(move.new_layers for move in moves)


def _overlap(a: Range | None, b: Range) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0])) if a else 0


def _slowest_seconds(spans: list[Span], gflops: dict[str, float]) -> float:
    return max(_seconds(span.end - span.start, gflops[span.node]) for span in spans)


def _seconds(layers: int, gflops: float) -> float:
    """Relative compute time; a node measured at zero GFLOP/s is the slowest possible."""
    return layers / gflops if gflops > 0 else math.inf


def moves_between(nodes: list[NodeCapacity], held: dict[str, Range], spans: list[Span]) -> list[Move]:
    """Every node of ``nodes`` whose span changes from ``held`` (node -> layers) to ``spans``."""
    after = {span.node: (span.start, span.end) for span in spans}
    return [Move(node.name, held.get(node.name), after.get(node.name)) for node in nodes
            if held.get(node.name) != after.get(node.name)]


def _by_held_layers(nodes: list[NodeCapacity], held: dict[str, Range]) -> list[NodeCapacity]:
    """Nodes holding early layers first, idle nodes last (each group in the caller's order)."""
    position = {node.name: i for i, node in enumerate(nodes)}
    return sorted(nodes, key=lambda n: (held.get(n.name, (math.inf, math.inf)), position[n.name]))


# --- the repair candidate ------------------------------------------------------------------------

def _repair(model: ModelShape, nodes: list[NodeCapacity], held: dict[str, Range], budgets: dict[str, int],
            replicas: int, reserve_fraction: float) -> list[Span] | None:
    """The current chains with their gaps filled, or None when memory does not allow it."""
    n = model.num_layers
    # A span is kept only if its node can still afford it (its free memory may have shrunk).
    keepable = {node: r for node, r in held.items()
                if 0 <= r[0] < r[1] <= n and span_bytes(model, *r) <= budgets[node]}
    speeds = {node.name: node.gflops for node in nodes}
    chains = current_chains(keepable, replicas, n, span_rates(model, keepable, speeds))
    in_chains = {node for chain in chains for node in chain}
    idle = [node for node in nodes if node.name not in in_chains]
    try:
        _fill_gaps(model, [chain for chain in chains if chain], idle, budgets, speeds)
        lost = sum(1 for chain in chains if not chain)
        rebuilt = plan_layout(model, idle, lost, reserve_fraction).spans if lost else []
    except PlanError:
        return None
    spans = [Span(node, start, end, start == 0, end == n, span_bytes(model, start, end))
             for chain in chains if chain for node, (start, end) in sorted(chain.items(), key=lambda kv: kv[1])]
    for span in spans:  # the growth limits below are conservative, so this holds by construction
        assert span.bytes <= budgets[span.node], (span, budgets[span.node])
    return spans + rebuilt


def _fill_gaps(model: ModelShape, chains: list[Chain], idle: list[NodeCapacity], budgets: dict[str, int],
               speeds: dict[str, float]) -> None:
    """Give every layer the ``chains`` lack to a neighbouring span or to an idle node (removed from
    ``idle`` once it holds layers). Raises PlanError when a gap does not fit.

    Largest gaps first, each offered its share of the idle nodes, so that one gap does not take
    every idle node in slivers while another is left to its neighbours alone.
    """
    gaps = sorted(((chain, gap) for chain in chains for gap in _gaps(chain, model.num_layers)),
                  key=lambda item: -(item[1][1] - item[1][0]))
    for remaining, (chain, gap) in zip(range(len(gaps), 0, -1), gaps):
        names = [node.name for node in idle]
        try:
            _fill_gap(model, chain, gap, names[:math.ceil(len(names) / remaining)], budgets, speeds)
        except PlanError:
            _fill_gap(model, chain, gap, names, budgets, speeds)  # its share was not enough: offer them all
        idle[:] = [node for node in idle if node.name not in chain]


def _gaps(chain: Chain, num_layers: int) -> list[Range]:
    gaps, position = [], 0
    for start, end in sorted(chain.values()):
        if start > position:
            gaps.append((position, start))
        position = end
    if position < num_layers:
        gaps.append((position, num_layers))
    return gaps


def _fill_gap(model: ModelShape, chain: Chain, gap: Range, idle: list[str], budgets: dict[str, int],
              speeds: dict[str, float]) -> None:
    """Layers ``gap`` in order: one idle node takes them all if it can without becoming the chain's
    slowest stage (the slowest such node, so faster ones stay free for other gaps); otherwise the left
    neighbour grows into its start, idle nodes take the middle, the right neighbour grows into its end,
    how many each takes balanced by compute time."""
    start, end = gap
    fit = _best_fit(model, chain, gap, idle, budgets, speeds)
    if fit is not None:
        chain[fit] = gap
        return
    left = next((node for node, (_, e) in chain.items() if e == start), None)
    right = next((node for node, (s, _) in chain.items() if s == end), None)
    takers = [*([left] if left else []), *idle, *([right] if right else [])]
    loads = [chain[name][1] - chain[name][0] if name in chain else 0 for name in takers]
    limits = [_room_to_grow(_span_bytes_when_grown(model, chain, gap, name, name == left), budgets[name], end - start)
              for name in takers]
    counts = _balanced_counts(end - start, loads, [speeds[name] for name in takers], limits)
    if counts is None:
        raise PlanError(f"layers {start}-{end - 1} fit neither the spans next to them nor the idle nodes")
    position = start
    for name, count in zip(takers, counts):
        if count and name == left:
            chain[name] = (chain[name][0], position + count)
        elif count and name == right:
            chain[name] = (position, chain[name][1])
        elif count:
            chain[name] = (position, position + count)
        position += count


def _best_fit(model: ModelShape, chain: Chain, gap: Range, idle: list[str], budgets: dict[str, int],
              speeds: dict[str, float]) -> str | None:
    """The slowest idle node that holds ``gap`` within its memory and no slower than the chain's slowest
    stage now (ties: the earlier node), or None. Over a swarm this keeps a chain's rate when a node of
    it leaves, and moves only the layers it held."""
    if not chain:
        return None
    slowest = max(stage_seconds(model, r, speeds[node]) for node, r in chain.items())
    need = span_bytes(model, *gap)
    fits = [name for name in idle if budgets[name] >= need and stage_seconds(model, gap, speeds[name]) <= slowest]
    return min(fits, key=lambda name: speeds[name], default=None)


def _span_bytes_when_grown(model: ModelShape, chain: Chain, gap: Range, name: str,
                           is_left: bool) -> Callable[[int], int]:
    """Bytes ``name`` would hold after taking ``k`` layers of ``gap``.

    Exact for the neighbours. An idle node's place in the gap is not known yet, so it is charged
    as if each layer weighed as much as the gap's heaviest, plus the embeddings or the head when
    the gap holds them.
    """
    start, end = gap
    n = model.num_layers
    if is_left:
        return lambda k: span_bytes(model, chain[name][0], start + k)
    if name in chain:
        return lambda k: span_bytes(model, end - k, chain[name][1])
    heaviest = max(model.layer_bytes[start:end])
    ends = (model.embed_bytes if start == 0 else 0) + \
        (model.head_bytes + (model.embed_bytes if model.tied else 0) if end == n else 0)
    return lambda k: k * heaviest + ends


def _room_to_grow(bytes_after: Callable[[int], int], budget: int, limit: int) -> int:
    """The most layers, up to ``limit``, a node can take within ``budget`` (bytes grow with layers)."""
    k = 0
    while k < limit and bytes_after(k + 1) <= budget:
        k += 1
    return k


def _balanced_counts(total: int, loads: list[int], speeds: list[float], limits: list[int]) -> list[int] | None:
    """How many of ``total`` layers each taker gets: one at a time to whoever would then finish its
    whole share soonest (ties to the earlier taker), which minimizes the slowest one. None when the
    takers' limits do not add up to ``total``."""
    if sum(limits) < total:
        return None
    counts = [0] * len(loads)
    for _ in range(total):
        open_takers = [i for i in range(len(loads)) if counts[i] < limits[i]]
        taker = min(open_takers, key=lambda i: (_seconds(loads[i] + counts[i] + 1, speeds[i]), i))
        counts[taker] += 1
    return counts
