"""Rebalancing a swarm as nodes join and leave: the best throughput a move budget buys. Pure.

Over a thousand nodes something changes all the time, so a change must cost about what it took
away, not a fresh plan (which moves nearly every layer). :func:`rebalance_swarm` spends at most
``budget`` moved layers, by default twice :func:`fewest_moves` (the layers that left; nothing for a
join while the layout holds 90 % of the bound), and among the layouts within it keeps the one with
the most routed throughput (:func:`~dllmctl.placement.throughput.layout_throughput`), idle nodes
counted for part of theirs (:func:`idle_worth`). The candidates:

* the repair (:func:`~dllmctl.placement.rebalance.plan_rebalance`): the same chains, a gap taken by the
  slowest idle node that keeps its chain's rate, else by its neighbours and idle nodes;
* the gap taken whole by one idle node, a few speeds tried;
* the broken chain shifted over its survivors in their order, with none, one or two idle nodes of
  about the departed node's speed where it was (:func:`~dllmctl.placement.swarm.shifted_counts`);
* a swap: a serving node fast enough for the gap moves there, an idle node takes its shorter span;
* an idle node beside the slowest stage of a lagging chain, taking layers off it;
* the broken chain dropped (its survivors go idle, ready to repair the next gap), where the chains
  left are at least ``min_replicas``;
* where the budget holds a whole chain, new chains over the survivors and the idle nodes.

What the budget leaves then puts idle nodes to work in lagging chains (*absorb*), so that nodes that
joined (which move nothing) do not pile up.
"""

from __future__ import annotations

import math

from dllmctl.placement.chains import Chain, complete_chains, current_chains, span_rates, stage_seconds
from dllmctl.placement.coverage import layer_coverage
from dllmctl.placement.layout import Layout, ModelShape, NodeCapacity, PlanError, Span, span_bytes
from dllmctl.placement.planner import DEFAULT_RESERVE_FRACTION, head_layer_equivalents, usable_budgets
from dllmctl.placement.rebalance import Rebalance, moved_layers, moves_between, plan_rebalance
from dllmctl.placement.swarm import chain_limits, plan_swarm, shifted_counts, spans_from_counts
from dllmctl.placement.throughput import layout_throughput, throughput_bound

IDLE_TRIED = (0, 1, 2)  # idle nodes added to a broken chain planned again
SWAPS_TRIED = 3  # serving nodes tried as the gap's taker, each leaving its span to an idle node
INSERTS_TRIED = 3  # lagging chains, and fastest idle nodes, tried for an insertion
ABSORB_ROUNDS = 2  # idle nodes put to work with what the budget leaves, one after the other
# What idle nodes count for (idle_worth): a node left idle now replaces the next node of its speed that
# leaves, so a candidate that spends a fast idle node on a slow gap scores lower; but only a reserve of
# them is worth keeping. Measured over 1000 nodes and 300 events (docs/inference.md): 0.5 of their part
# of the bound, up to 2 % of it, kept the most (0.8 flat let idle nodes pile up to 8 %).
IDLE_WORTH = 0.5
RESERVE = 0.02
TARGET_FRACTION = 0.9  # of the throughput bound, what a swarm's layout should keep


def rebalance_swarm(model: ModelShape, nodes: list[NodeCapacity], current: list[Span], min_replicas: int = 1,
                    budget: int | None = None, reserve_fraction: float = DEFAULT_RESERVE_FRACTION) -> Rebalance:
    """The best-scoring layout over ``nodes`` among those that move at most ``budget`` layers from
    ``current`` (default: twice :func:`fewest_moves`): the routed throughput, plus :data:`IDLE_WORTH`
    of what the idle nodes could add; ties go to fewer moves. ``Rebalance.how`` names the candidate
    kept. Raises :class:`PlanError` when none fits."""
    present = {node.name for node in nodes}
    if budget is None:
        budget = 2 * fewest_moves(model, nodes, current)
    chains = max(_chain_count(model, current), min_replicas)
    held = {s.node: (s.start, s.end) for s in current if s.node in present}
    speeds = {node.name: node.gflops for node in nodes}
    candidates: list[tuple[str, list[Span]]] = []
    failure: PlanError | None = None
    for how, count in (("repair", chains), ("drop", chains - 1)):
        if count >= max(min_replicas, 1):
            try:
                candidates.append((how, plan_rebalance(model, nodes, current, count, reserve_fraction,
                                                       fresh_plans=False).layout.spans))
            except PlanError as exc:
                failure = failure or exc
    candidates.extend(_local_candidates(model, nodes, held, chains, usable_budgets(nodes, reserve_fraction), budget))
    bound = throughput_bound(model, nodes)
    costed = [(moved_layers(moves), how, spans, moves) for how, spans in candidates
              for moves in [moves_between(nodes, held, spans)]]
    within = [c for c in costed if c[0] <= budget]
    if not within:
        if not costed:
            raise failure or PlanError(f"no layout of {model.name} fits the nodes left")
        within = [min(costed, key=lambda c: c[0])]  # none within the budget: the fewest moves
    scored = [(moved, _score(model, nodes, spans, speeds, bound), how, spans, moves)
              for moved, how, spans, moves in within]
    moved, score, how, spans, moves = max(scored, key=lambda c: (c[1], -c[0]))
    budgets = usable_budgets(nodes, reserve_fraction)
    for _ in range(ABSORB_ROUNDS):  # what the budget leaves puts idle nodes to work in other chains
        better = None
        for absorbed in _absorptions(model, nodes, spans, budgets, speeds, budget - moved):
            absorbed_moves = moves_between(nodes, held, absorbed)
            cost = moved_layers(absorbed_moves)
            if cost > budget:
                continue
            value = _score(model, nodes, absorbed, speeds, bound)
            if value > score + 1e-9 and (better is None or value > better[1]):
                better = (cost, value, absorbed, absorbed_moves)
        if better is None:
            break
        moved, score, spans, moves = better
        how = how if how.endswith("+absorb") else how + "+absorb"
    return Rebalance(Layout(model.name, _chain_count(model, spans), spans), moves, how)


def _score(model: ModelShape, nodes: list[NodeCapacity], spans: list[Span], speeds: dict[str, float],
           bound: float) -> float:
    """A candidate's worth: its routed throughput, and what its idle nodes count for (:func:`idle_worth`)."""
    serving = {span.node for span in spans}
    spare = throughput_bound(model, [node for node in nodes if node.name not in serving])
    return layout_throughput(model, spans, speeds) + idle_worth(spare, bound)


def _absorptions(model: ModelShape, nodes: list[NodeCapacity], spans: list[Span], budgets: dict[str, int],
                 speeds: dict[str, float], left: int) -> list[list[Span]]:
    """Layouts in which one of the fastest idle nodes joins a chain whose slowest stage lags its next
    slowest most, beside that stage, the chain shifted within ``left`` more moved layers."""
    if left <= 0:
        return []
    held = {s.node: (s.start, s.end) for s in spans}
    starts = sum(1 for r in held.values() if r[0] == 0)
    complete = complete_chains(held, model.num_layers, starts, span_rates(model, held, speeds))
    idle = sorted((n for n in nodes if n.name not in held and n.gflops > 0), key=lambda n: (-n.gflops, n.name))
    by_name = {node.name: node for node in nodes}
    layouts = []
    for index, slow in _lagging(model, complete, speeds)[:INSERTS_TRIED]:
        chain = complete[index]
        start, end = chain[slow]
        at = (end, end) if start == 0 else (start, start)  # beside it, keeping the embeddings where they are
        others = [s for s in spans if s.node not in chain]
        for newcomer in idle[:INSERTS_TRIED]:
            try:
                layouts.append(others + _shifted(model, chain, at, [newcomer], budgets, by_name, left))
            except PlanError:
                continue
    return layouts


def _lagging(model: ModelShape, complete: list[Chain], speeds: dict[str, float]) -> list[tuple[int, str]]:
    """(chain index, its slowest node) for chains whose slowest stage is unique, the most lagging first
    (slowest over next slowest stage time; a chain of one node, a replica, lags most: splitting it in
    two is what an idle node can do for it)."""
    lagging = []
    for index, chain in enumerate(complete):
        times = sorted(((stage_seconds(model, r, speeds[node]), node) for node, r in chain.items()), reverse=True)
        if len(times) == 1:
            lagging.append((math.inf, index, times[0][1]))
        elif times[0][0] > times[1][0]:
            lagging.append((times[0][0] / times[1][0], index, times[0][1]))
    return [(index, slow) for _, index, slow in sorted(lagging, reverse=True)]


def idle_worth(spare: float, bound: float) -> float:
    """What idle nodes of ``spare`` tokens/s (their part of the bound) count for: :data:`IDLE_WORTH` of
    it up to :data:`RESERVE` of the bound, as replacements for nodes that leave; beyond, no more (a
    pool larger than the reserve waits for leaves it will not see soon, so a candidate that puts idle
    nodes to work scores higher)."""
    return IDLE_WORTH * min(spare, RESERVE * bound)


def fewest_moves(model: ModelShape, nodes: list[NodeCapacity], current: list[Span],
                 target: float = TARGET_FRACTION) -> int:
    """A lower bound on the layers any layout holding ``target`` of the throughput bound must move from
    ``current`` over ``nodes``, and so half what a change may move.

    * A node that left took its layers: its chain serves again only once they are loaded elsewhere
      (the bound the issue names; strictly, dropping that chain moves nothing, and where that would
      hold ``target`` the fewest is 0).
    * Otherwise none while the spans left hold ``target`` (a join needs no move).
    * Below ``target``, the nodes that serve can do no more work than their GFLOP/s: where those fall
      short of ``target`` of the bound, idle nodes must start serving, each loading at least a layer,
      so at least as many as the fastest idle nodes that make up the shortfall; and at least one.
    """
    present = {node.name for node in nodes}
    lost = sum(s.layers for s in current if s.node not in present and s.leads)
    kept = [s for s in current if s.node in present]
    bound = throughput_bound(model, nodes)
    if lost == 0 and (bound == 0 or layout_throughput(model, kept, {n.name: n.gflops for n in nodes}) >= target * bound):
        return 0
    serving = {s.node for s in kept}
    short = target * bound - throughput_bound(model, [n for n in nodes if n.name in serving])
    needed = 0
    for node in sorted((n for n in nodes if n.name not in serving), key=lambda n: -n.gflops):
        if short <= 0:
            break
        short -= throughput_bound(model, [node])
        needed += 1
    return max(lost, needed, 1)


def _chain_count(model: ModelShape, spans: list[Span]) -> int:
    """How many nodes hold the most-held layer: the chains a layout has."""
    return max([run.count for run in layer_coverage(model.num_layers, [(s.start, s.end) for s in spans])] + [1])


def _local_candidates(model: ModelShape, nodes: list[NodeCapacity], held: dict[str, tuple[int, int]], chains: int,
                      budgets: dict[str, int], budget: int) -> list[tuple[str, list[Span]]]:
    """Layouts that change the first broken chain (and, for a swap, one span elsewhere), that put idle
    nodes beside chains' slowest stages, or that plan new chains over the broken chain and the idle."""
    if budget <= 0:
        return []
    keepable = {node: r for node, r in held.items() if span_bytes(model, *r) <= budgets[node]}
    speeds = {node.name: node.gflops for node in nodes}
    current = current_chains(keepable, chains, model.num_layers, span_rates(model, keepable, speeds))
    complete = [other for other in current if _covered(other) == model.num_layers]
    in_chains = {node for other in current for node in other}
    idle = [node for node in nodes if node.name not in in_chains and node.gflops > 0]
    kept = [_span(model, node, r) for other in complete for node, r in sorted(other.items(), key=lambda kv: kv[1])]

    def candidate(how: str, changed: list[Span], dropped: list[int] = ()) -> tuple[str, list[Span]]:
        """``changed``: the spans of the chains made or remade; ``dropped``: the chains they replace."""
        gone = {node for i in dropped for node in complete[i]}
        return how, [span for span in kept if span.node not in gone] + changed

    layouts = [candidate("insert", changed, [index])
               for index, changed in _insertions(model, complete, idle, budgets, speeds, budget)]
    broken = [chain for chain in current if chain and _covered(chain) < model.num_layers]
    if not broken:
        return layouts
    chain = broken[0]
    gap = _first_gap(chain, model.num_layers)
    need = _gap_speed(model, chain, gap, speeds)
    survivors = [_span(model, node, r) for node, r in sorted(chain.items(), key=lambda kv: kv[1])]
    layouts += [candidate("replace", survivors + [_span(model, name, gap)])
                for name in _replacements(model, idle, gap, need, budgets)]
    by_closeness = sorted(idle, key=lambda n: (abs(math.log(n.gflops / need)), n.name))
    by_name = {node.name: node for node in nodes}
    for extra in IDLE_TRIED[:len(by_closeness) + 1]:
        try:
            layouts.append(candidate(f"shift+{extra}", _shifted(model, chain, gap, by_closeness[:extra], budgets,
                                                             by_name, budget)))
        except PlanError:
            continue
    for index, serving, stand_in in _swaps(model, complete, idle, gap, need, budgets, speeds, budget):
        other = [_span(model, stand_in if node == serving else node, r)
                 for node, r in sorted(complete[index].items(), key=lambda kv: kv[1])]
        layouts.append(candidate("swap", other + survivors + [_span(model, serving, gap)], [index]))
    if budget >= model.num_layers:
        layouts += [candidate("rechain", spans) for spans in _new_chains(model, [by_name[node] for node in chain] + idle,
                                                                      keepable, speeds, budget)]
    return layouts


def _new_chains(model: ModelShape, pool: list[NodeCapacity], held: dict[str, tuple[int, int]],
                speeds: dict[str, float], budget: int) -> list[list[Span]]:
    """The broken chain's survivors and the idle nodes planned afresh (:func:`plan_swarm`), keeping its
    fastest chains while their new layers fit ``budget``: where a node with many layers left, its
    budget can turn idle nodes into a chain instead of patching one."""
    try:
        layout = plan_swarm(model, pool, 1)
    except PlanError:
        return []
    planned = {span.node: (span.start, span.end) for span in layout.spans}
    chains = current_chains(planned, model.num_layers, model.num_layers, span_rates(model, planned, speeds))
    kept: list[Span] = []
    left = budget
    for chain in (c for c in chains if _covered(c) == model.num_layers):
        cost = sum(b - a - max(0, min(b, held[n][1]) - max(a, held[n][0])) if n in held else b - a
                   for n, (a, b) in chain.items())
        if cost > left:
            break
        left -= cost
        kept += [_span(model, node, r) for node, r in sorted(chain.items(), key=lambda kv: kv[1])]
    return [kept] if kept else []


def _insertions(model: ModelShape, complete: list[Chain], idle: list[NodeCapacity], budgets: dict[str, int],
                speeds: dict[str, float], budget: int) -> list[tuple[int, list[Span]]]:
    """Chains (by index, with their new spans) in which one of the fastest idle nodes takes layers off
    the slowest stage, beside it, for chains whose slowest stage lags their next slowest most: the
    stage gives up as many layers as even the two out, within ``budget``."""
    if not idle:
        return []
    changes = []
    fastest = sorted(idle, key=lambda n: (-n.gflops, n.name))[:INSERTS_TRIED]
    for index, slow in _lagging(model, complete, speeds)[:INSERTS_TRIED]:
        for newcomer in fastest:
            spans = _split(model, complete[index], slow, newcomer, budgets, speeds, budget)
            if spans is not None:
                changes.append((index, spans))
    return changes


def _split(model: ModelShape, chain: Chain, slow: str, newcomer: NodeCapacity, budgets: dict[str, int],
           speeds: dict[str, float], budget: int) -> list[Span] | None:
    """The chain with ``newcomer`` taking the end of ``slow``'s span (its start where ``slow`` holds the
    head), as many layers as make the slower of the two fastest."""
    start, end = chain[slow]
    head_end = end == model.num_layers
    best = None
    for moved in range(1, min(end - start - 1, budget) + 1):
        kept_r, given = ((start + moved, end), (start, start + moved)) if head_end else \
            ((start, end - moved), (end - moved, end))
        if span_bytes(model, *given) > budgets[newcomer.name]:
            break
        worst = max(stage_seconds(model, kept_r, speeds[slow]), stage_seconds(model, given, newcomer.gflops))
        if best is None or worst < best[0]:
            best = (worst, kept_r, given)
    if best is None:
        return None
    _, kept_r, given = best
    return [_span(model, node, kept_r if node == slow else r) for node, r in sorted(chain.items(), key=lambda kv: kv[1])] \
        + [_span(model, newcomer.name, given)]


def _replacements(model: ModelShape, idle: list[NodeCapacity], gap: tuple[int, int], speed: float,
                  budgets: dict[str, int]) -> list[str]:
    """Idle nodes with room for ``gap``: the slowest at least ``speed`` fast, the fastest, and a few
    between (by rank), so that the score picks among speeds without trying every idle node."""
    need = span_bytes(model, *gap)
    fitting = sorted((n for n in idle if budgets[n.name] >= need), key=lambda n: (-n.gflops, n.name))
    if not fitting:
        return []
    ranks = {0, len(fitting) // 8, len(fitting) // 4, len(fitting) // 2}
    enough = [i for i, n in enumerate(fitting) if n.gflops >= speed]
    if enough:
        ranks.add(enough[-1])
    return [fitting[i].name for i in sorted(ranks)]


def _swaps(model: ModelShape, complete: list[Chain], idle: list[NodeCapacity], gap: tuple[int, int], need: float,
           budgets: dict[str, int], speeds: dict[str, float], budget: int) -> list[tuple[int, str, str]]:
    """Triples (chain index, serving node, idle node): the serving node, fast enough for ``gap``, moves there, and the
    idle node takes its span in its own chain, fast enough for that. Where no idle node suits the gap
    (a fast node left), one that suits a shorter span elsewhere frees a node that does. The serving
    nodes tried are the slowest that suit, at most :data:`SWAPS_TRIED`; each moves its span's layers
    and the gap's, within ``budget``."""
    gap_bytes = span_bytes(model, *gap)
    room = budget - (gap[1] - gap[0])
    options = []
    for index, chain in enumerate(complete):
        slowest = max(stage_seconds(model, r, speeds[node]) for node, r in chain.items())
        for node, r in chain.items():
            if r[1] - r[0] <= room and speeds[node] >= need and budgets[node] >= gap_bytes:
                options.append((speeds[node], node, index, r, slowest))
    pairs = []
    for _, node, index, r, slowest in sorted(options)[:4 * SWAPS_TRIED]:
        fits = [n for n in idle if budgets[n.name] >= span_bytes(model, *r)
                and stage_seconds(model, r, n.gflops) <= slowest]
        if fits:
            pairs.append((index, node, min(fits, key=lambda n: (n.gflops, n.name)).name))
        if len(pairs) == SWAPS_TRIED:
            break
    return pairs


def _span(model: ModelShape, node: str, layers: tuple[int, int]) -> Span:
    start, end = layers
    return Span(node, start, end, start == 0, end == model.num_layers, span_bytes(model, start, end))


def _covered(chain: Chain) -> int:
    return sum(b - a for a, b in chain.values())


def _first_gap(chain: Chain, num_layers: int) -> tuple[int, int]:
    position = 0
    for a, b in sorted(chain.values()):
        if a > position:
            return position, a
        position = b
    return position, num_layers


def _gap_speed(model: ModelShape, chain: Chain, gap: tuple[int, int], speeds: dict[str, float]) -> float:
    """The speed a node holding ``gap`` needs to keep up with the chain's slowest stage."""
    slowest = max(stage_seconds(model, r, speeds[node]) for node, r in chain.items())
    head = head_layer_equivalents(model) if gap[1] == model.num_layers else 0.0
    return max((gap[1] - gap[0] + head) / slowest, 1e-9) if math.isfinite(slowest) and slowest > 0 else 1.0


def _shifted(model: ModelShape, chain: Chain, gap: tuple[int, int], extra: list[NodeCapacity],
             budgets: dict[str, int], nodes: dict[str, NodeCapacity], budget: int) -> list[Span]:
    """The chain's survivors in their order with ``extra`` nodes where the gap is, their spans shifted
    so that the slowest stage is as fast as ``budget`` moved layers allow."""
    order = [nodes[name] for name, _ in sorted(chain.items(), key=lambda kv: kv[1])]
    cut = sum(1 for node in order if chain[node.name][1] <= gap[0])
    arranged = order[:cut] + extra + order[cut:]
    caps, preload, floor = chain_limits(model, arranged, budgets)
    before = [chain.get(node.name) for node in arranged]
    counts = shifted_counts(model.num_layers, [n.gflops for n in arranged], caps, preload, floor, before, budget)
    if counts is None:
        raise PlanError(f"the chain cannot be shifted within {budget} moved layers")
    return spans_from_counts(model, arranged, counts, budgets)
