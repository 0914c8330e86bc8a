"""Layer layouts: which node holds which contiguous layers. Pure functions, no I/O.

A node's share of the layers is proportional to its measured throughput (GFLOP/s), capped by what
its free memory holds after a reserve for KV caches and activations; what a capped node cannot take
goes to the others, again by throughput ("water-filling"). The first span also holds the embeddings,
the last the final norm and head (and the embeddings again when they are tied). With ``replicas=R``
the nodes are dealt into R disjoint chains of about equal memory, each covering every layer once, so
every layer is held by exactly R distinct nodes. Nodes keep the caller's order within a chain; a node
whose share rounds to nothing gets no span at all.
"""

from __future__ import annotations

import math
from dataclasses import replace
from bisect import bisect_right
from itertools import accumulate

from dllmctl.placement.layout import Layout, ModelShape, NodeCapacity, PlanError, Span, span_bytes

DEFAULT_RESERVE_FRACTION = 0.2  # of a node's free memory, kept for KV caches and activations


def plan_layout(model: ModelShape, nodes: list[NodeCapacity], replicas: int = 1,
                reserve_fraction: float = DEFAULT_RESERVE_FRACTION) -> Layout:
    """Contiguous spans of ``model`` over ``nodes``, every layer held by ``replicas`` distinct nodes.

    Raises :class:`PlanError` naming what is missing when the nodes cannot hold it.
    """
    check_request(model, nodes, replicas, reserve_fraction)
    budgets = usable_budgets(nodes, reserve_fraction)
    layout = Layout(model.name, replicas)
    speed = {node.name: node.gflops for node in nodes}
    chains = _deal_into_chains(nodes, budgets, replicas)
    for number, chain in enumerate(chains, start=1):
        try:
            layout.spans.extend(_plan_chain(model, chain, budgets))
        except PlanError as exc:
            where = f"replica {number} of {replicas} ({', '.join(n.name for n in chain)}): " if replicas > 1 else ""
            advice = "add a node, free memory or lower --replicas" if replicas > 1 else "add a node or free memory"
            raise PlanError(f"{where}{exc}; {advice} (each node keeps {reserve_fraction:.0%} of its free memory "
                            f"for caches)") from None
    layout.expected_ms = {s.node: expected_ms(model, s, speed[s.node]) for s in layout.spans}
    return layout


def plan_private_layout(model: ModelShape, nodes: list[NodeCapacity], private_layers: int, replicas: int = 1,
                        reserve_fraction: float = DEFAULT_RESERVE_FRACTION) -> Layout:
    """A private-mode layout: the client holds the embeddings, layers [0, K) and the head, so the nodes
    split layers [K, n) alone, no span with embeddings or head (the last returns hidden states)."""
    if not 1 <= private_layers < model.num_layers:
        raise PlanError(f"--private-layers must be between 1 and {model.num_layers - 1} for {model.name}")
    rest = replace(model, layer_bytes=model.layer_bytes[private_layers:], embed_bytes=0, head_bytes=0, tied=False)
    planned = plan_layout(rest, nodes, replicas, reserve_fraction)
    layout = Layout(model.name, replicas, private_layers=private_layers)
    for s in planned.spans:
        start, end = s.start + private_layers, s.end + private_layers
        layout.spans.append(replace(s, start=start, end=end, embed=False, head=False,
                                    bytes=sum(model.layer_bytes[start:end])))
    speed = {node.name: node.gflops for node in nodes}
    layout.expected_ms = {s.node: expected_ms(model, s, speed[s.node]) for s in layout.spans}
    return layout


def usable_budgets(nodes: list[NodeCapacity], reserve_fraction: float) -> dict[str, int]:
    """Bytes of weights each node may hold: its free memory less the reserve."""
    return {node.name: int(node.free_memory_bytes * (1 - reserve_fraction)) for node in nodes}


def check_request(model: ModelShape, nodes: list[NodeCapacity], replicas: int, reserve_fraction: float) -> None:
    """Refuse requests no layout could meet (bad numbers, too few nodes), naming what is wrong."""
    if model.num_layers < 1:
        raise PlanError(f"{model.name} has no layers")
    if not 0 <= reserve_fraction < 1:
        raise PlanError(f"the memory reserve must be a fraction in [0, 1), got {reserve_fraction}")
    if replicas < 1:
        raise PlanError("--replicas must be at least 1")
    if not nodes:
        raise PlanError("no nodes to plan over: start some ('dllmctl cluster up') or register them")
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        raise PlanError(f"node names must be unique; {sorted({n for n in names if names.count(n) > 1})} repeat")
    for node in nodes:
        if not (math.isfinite(node.gflops) and node.gflops >= 0) or node.free_memory_bytes < 0:
            raise PlanError(f"node {node.name} reports {node.free_memory_bytes} bytes free and {node.gflops} "
                            f"GFLOP/s; both must be non-negative numbers")
    if replicas > len(nodes):
        raise PlanError(f"{replicas} replicas need at least {replicas} nodes (each layer on distinct nodes); "
                        f"{len(nodes)} given: add nodes or lower --replicas")


def _deal_into_chains(nodes: list[NodeCapacity], budgets: dict[str, int], replicas: int) -> list[list[NodeCapacity]]:
    """R groups of about equal memory: biggest node first, each to the group with the least so far."""
    chains: list[list[NodeCapacity]] = [[] for _ in range(replicas)]
    totals = [0] * replicas
    for node in sorted(nodes, key=lambda n: (-budgets[n.name], -n.gflops, n.name)):
        target = min(range(replicas), key=lambda r: (totals[r], len(chains[r]), r))
        chains[target].append(node)
        totals[target] += budgets[node.name]
    order = {node.name: i for i, node in enumerate(nodes)}
    return [sorted(chain, key=lambda n: order[n.name]) for chain in chains]


def _plan_chain(model: ModelShape, nodes: list[NodeCapacity], budgets: dict[str, int]) -> list[Span]:
    """One chain over ``nodes`` covering every layer once."""
    n = model.num_layers
    members = list(nodes)
    while True:
        arranged = _arrange(model, members, budgets)
        caps = [capacity(model, budgets[node.name], len(arranged) == 1,
                          "first" if i == 0 else "last" if i == len(arranged) - 1 else "middle")
                for i, node in enumerate(arranged)]
        if sum(caps) < n:
            raise PlanError(_shortfall(model, arranged, budgets, covered=sum(caps)))
        preload = [0.0] * len(arranged)
        floor = [0] * len(arranged)
        if len(arranged) > 1:  # the last node also runs the head: fewer layers, so it is not the bottleneck
            preload[-1], floor[-1] = head_layer_equivalents(model), 1
        counts = _water_fill(n, [node.gflops for node in arranged], caps, preload, floor)
        if counts[0] and counts[-1]:
            break
        # An end node's share rounded to nothing, so someone else holds the embeddings or the head:
        # drop the nodes without layers and size the new ends again.
        holding = {node.name for node, count in zip(arranged, counts) if count}
        members = [node for node in members if node.name in holding]
    spans, start = [], 0
    for node, count in zip(arranged, counts):
        if count:
            spans.append(Span(node.name, start, start + count, start == 0, start + count == n,
                              span_bytes(model, start, start + count)))
            start += count
    for span in spans:  # capacities are conservative, so this holds by construction
        assert span.bytes <= budgets[span.node], (span, budgets[span.node])
    return spans


def expected_ms(model: ModelShape, span: Span, gflops: float, share: float = 1.0) -> float:
    """Modelled decode compute of ``span`` per token on a node of ``gflops``: 2 FLOPs per weight (fp32
    weights of 4 bytes), layers at their measured cost per byte against the head's (``share``: the part
    of each layer a tensor-parallel member computes)."""
    layer_bytes = sum(model.layer_bytes[span.start:span.end]) * LAYER_TIME_PER_BYTE_VS_HEAD
    head = (model.embed_bytes if model.tied else model.head_bytes) if span.head else 0
    return decode_ms((layer_bytes + head) * share, gflops)


def decode_ms(weight_bytes: float, gflops: float) -> float:
    """Milliseconds to decode one token through ``weight_bytes`` of fp32 weights (two FLOPs per
    weight) at ``gflops``."""
    return 2 * (weight_bytes / 4) / (gflops * 1e9) * 1000 if gflops > 0 else float("inf")


def _arrange(model: ModelShape, members: list[NodeCapacity], budgets: dict[str, int]) -> list[NodeCapacity]:
    """The chain order: the caller's, except that the first node must hold the embeddings and the last
    the head, so the earliest node able to do each is moved there."""
    if len(members) == 1:
        return members
    starters = [m for m in members if capacity(model, budgets[m.name], False, "first") > 0]
    if not starters:
        need = span_bytes(model, 0, 1) if model.num_layers > 1 else span_bytes(model, 0, model.num_layers)
        biggest = max(budgets[m.name] for m in members)
        raise PlanError(f"the embeddings and layer 0 of {model.name} need {_size(need)}, more than any node "
                        f"offers (the largest has {_size(biggest)} usable)")
    first = starters[0]
    finishers = [m for m in members if m is not first and capacity(model, budgets[m.name], False, "last") > 0]
    if not finishers:
        if capacity(model, budgets[first.name], True, "first"):
            return [first]  # nobody else can take the head, but the first node can hold everything
        n = model.num_layers
        raise PlanError(f"the final norm and head of {model.name} with layer {n - 1} need "
                        f"{_size(span_bytes(model, n - 1, n))}, more than any node besides {first.name} offers")
    last = finishers[-1]
    return [first, *(m for m in members if m is not first and m is not last), last]


def capacity(model: ModelShape, budget: int, alone: bool, position: str) -> int:
    """How many layers a node can hold at ``position`` in the chain (first, middle or last).

    A lone node must hold everything or nothing. The first node's layers are counted from the front,
    the last's from the back; a middle node's as if each weighed as much as the heaviest layer, because
    its exact layers are not known yet.
    """
    n = model.num_layers
    if alone:
        return n if span_bytes(model, 0, n) <= budget else 0
    if position == "first":
        room = budget - model.embed_bytes
        return bisect_right(list(accumulate(model.layer_bytes)), room) if room >= 0 else 0
    if position == "last":
        room = budget - model.head_bytes - (model.embed_bytes if model.tied else 0)
        return bisect_right(list(accumulate(reversed(model.layer_bytes))), room) if room >= 0 else 0
    heaviest = max(model.layer_bytes)
    return n if heaviest == 0 else min(n, budget // heaviest)


# A decoder layer takes longer per weight byte than the head's one big matmul: it runs norms, rotary,
# attention and a dozen small kernels besides. Measured on SmolLM2-135M over 5 local nodes (fp32, one
# thread each): 1.28 ms per 14.2 MB layer, 7.3 ms for the 113 MB head - 1.4x the time per byte.
LAYER_TIME_PER_BYTE_VS_HEAD = 1.4


def head_layer_equivalents(model: ModelShape) -> float:
    """The head's decode time in decoder layers (~5.7 for SmolLM2): decode reads every weight once per
    token, the head's matrix being the embeddings' when they are tied. A last stage given an equal
    share of the layers took twice as long as the others."""
    mean_layer = sum(model.layer_bytes) / max(model.num_layers, 1)
    head = model.embed_bytes if model.tied else model.head_bytes
    return head / (mean_layer * LAYER_TIME_PER_BYTE_VS_HEAD) if mean_layer > 0 else 0.0


def _water_fill(total: int, weights: list[float], caps: list[int], preload: list[float] | None = None,
                floor: list[int] | None = None) -> list[int]:
    """Integers summing to ``total``, proportional to ``weights`` where ``caps`` allow (sum(caps) >= total).

    Shares are ``clamp(level * weight - preload, floor, cap)`` for the one ``level`` that makes them sum
    to ``total`` (``preload``: work a node has besides its layers, in layers), then rounded by largest
    remainder (ties to the earlier node). A node measured at zero GFLOP/s is given layers only when
    the others cannot hold them.
    """
    top = max(weights)
    weights = [max(w, top * 1e-9) if top > 0 else 1.0 for w in weights]
    preload = preload or [0.0] * len(weights)
    floor = [min(f, c) for f, c in zip(floor or [0] * len(weights), caps)]

    def shares_at(level: float) -> list[float]:
        return [min(float(c), max(float(f), level * w - p)) for w, p, f, c in zip(weights, preload, floor, caps)]

    low, high = 0.0, (total + sum(preload)) / min(weights) + 1.0
    for _ in range(200):  # bisection on the level: the shares grow with it
        mid = (low + high) / 2
        low, high = (mid, high) if sum(shares_at(mid)) < total else (low, mid)
    shares = shares_at(high)
    counts = [min(caps[i], int(shares[i] + 1e-9)) for i in range(len(shares))]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    while sum(counts) < total:  # one pass suffices but for float rounding; sum(caps) >= total ends it
        for i in by_remainder:
            if sum(counts) < total and counts[i] < caps[i]:
                counts[i] += 1
    for i in reversed(by_remainder):  # float rounding may overshoot by a layer: take it back
        if sum(counts) > total and counts[i] > floor[i]:
            counts[i] -= 1
    return counts


def _shortfall(model: ModelShape, nodes: list[NodeCapacity], budgets: dict[str, int], covered: int) -> str:
    n = model.num_layers
    missing = sum(model.layer_bytes[covered:])
    which = f"layers {covered}-{n - 1}" if covered < n - 1 else f"layer {covered}"
    return (f"{which} of {model.name} ({_size(missing)}) do not fit: {', '.join(node.name for node in nodes)} "
            f"can hold {covered} of its {n} layers ({_size(sum(budgets[node.name] for node in nodes))} usable, "
            f"{_size(span_bytes(model, 0, n))} of weights in all)")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
