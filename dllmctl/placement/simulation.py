"""A swarm in simulation: many heterogeneous nodes, a model planned over them, nodes joining and leaving.

Pure and seeded (``random.Random``; no daemons, no clock but the timings it reports): the same
:class:`SwarmSpec` and seed give the same nodes, events and layouts. What it measures, per change:

* **fraction of the bound**: the layout's routed throughput
  (:func:`~dllmctl.placement.throughput.layout_throughput`) over
  :func:`~dllmctl.placement.throughput.throughput_bound` of the nodes present, which no layout can
  beat (every node's GFLOP/s at once, memory and whole layers ignored);
* **moves against the fewest**: the layers nodes had to load, against
  :func:`~dllmctl.placement.churn.fewest_moves`, a lower bound on the layers any layout keeping 90 %
  of the bound must load: a serving node's layers when it leaves, none for a join while the layout
  holds 90 %, else as many as idle nodes must start serving. (Dropping a broken chain moves
  nothing, so where that alone would hold 90 % the strict bound is 0: both are reported.)

Nodes are drawn from ranges of home and lab machines: memory log-uniform in 5-128 GiB (more small
machines than big ones), throughput log-normal around 150 GFLOP/s (sigma 1: a fifth of the median to
five times it for most, a Raspberry Pi to a GPU at the ends), optionally correlated with memory, and a
region each (round trips 5-40 ms within a region, 40-250 ms between) for the chains' hop latency.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from dllmctl.placement.churn import TARGET_FRACTION, fewest_moves, rebalance_swarm
from dllmctl.placement.layout import Layout, ModelShape, NodeCapacity, PlanError, Span
from dllmctl.placement.planner import expected_ms, plan_layout
from dllmctl.placement.swarm import plan_swarm
from dllmctl.placement.throughput import layout_throughput, throughput_bound

GIB = 2**30

# Llama-3-70B's shape in bf16: 80 layers of 0.856 B parameters, 128256 x 8192 embeddings and an untied head.
LLAMA_70B = ModelShape.uniform("llama-70b-shaped", 80, 2 * 855_638_016, 2 * 1_050_673_152, 2 * 1_050_673_152)



@dataclass(frozen=True)
class SwarmSpec:
    """How nodes are drawn."""

    nodes: int = 1000
    seed: int = 0
    memory_gib: tuple[float, float] = (5.0, 128.0)
    median_gflops: float = 150.0
    sigma: float = 1.0  # of log(GFLOP/s)
    correlation: float = 0.0  # between log(memory) and log(GFLOP/s)
    regions: int = 6
    join_fraction: float = 0.5  # of churn events


@dataclass(frozen=True)
class SimNode:
    capacity: NodeCapacity
    region: int
    access_ms: float  # its last mile, counted on every round trip it takes part in


@dataclass
class Change:
    """One event and what the rebalance made of it."""

    kind: str  # "join" or "leave"
    node: str
    held_layers: int  # layers the node held when it left (0 for a join or an idle node)
    moved_layers: int
    fewest_layers: int  # the lower bound the moves are held to (see the module docstring)
    fewest_layers_strict: int  # 0 also where dropping the broken chain would keep the fraction
    fraction: float  # of the bound, after the change
    chains: int
    how: str  # the kind of layout the rebalance kept (dllmctl.placement.churn)
    seconds: float

    @property
    def moves_ok(self) -> bool:
        return self.moved_layers <= 2 * self.fewest_layers


@dataclass
class Report:
    spec: SwarmSpec
    model: str
    min_replicas: int
    chains: int
    plan_seconds: float
    fraction: float
    baseline_fraction: float  # plan_layout with exactly min_replicas chains, the planner before this one
    hop_latency_ms: dict = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)

    def to_json(self) -> dict:
        leaves = [c for c in self.changes if c.kind == "leave" and c.held_layers]
        worst = max((c.moved_layers / c.fewest_layers for c in self.changes if c.fewest_layers), default=0.0)
        fractions = [self.fraction] + [c.fraction for c in self.changes]
        return {
            "spec": asdict(self.spec), "model": self.model, "min_replicas": self.min_replicas,
            "initial": {"chains": self.chains, "fraction_of_bound": round(self.fraction, 4),
                        "plan_seconds": round(self.plan_seconds, 3),
                        "baseline_plan_layout_fraction": round(self.baseline_fraction, 4),
                        "hop_latency_ms": self.hop_latency_ms},
            "churn": {
                "events": len(self.changes), "joins": sum(c.kind == "join" for c in self.changes),
                "leaves": sum(c.kind == "leave" for c in self.changes), "serving_leaves": len(leaves),
                "min_fraction_of_bound": round(min(fractions), 4),
                "final_fraction_of_bound": round(fractions[-1], 4),
                "moved_layers": sum(c.moved_layers for c in self.changes),
                "fewest_layers": sum(c.fewest_layers for c in self.changes),
                "worst_moves_over_fewest": round(worst, 3),
                "changes_over_twice_fewest": sum(not c.moves_ok for c in self.changes),
                "joins_that_moved": sum(c.kind == "join" and c.moved_layers > 0 for c in self.changes),
                "max_rebalance_seconds": round(max((c.seconds for c in self.changes), default=0.0), 3),
                "serving_leaves_by_how": dict(sorted(Counter(c.how for c in leaves).items())),
            },
            "target_fraction": TARGET_FRACTION,
            "meets_target": min(fractions) >= TARGET_FRACTION and all(c.moves_ok for c in self.changes),
            "changes": [asdict(c) for c in self.changes],
        }


def draw_node(rng: random.Random, spec: SwarmSpec, name: str) -> SimNode:
    lo, hi = (math.log(g) for g in spec.memory_gib)
    u = rng.random()
    memory = int(math.exp(lo + u * (hi - lo)) * GIB)
    z_memory = statistics.NormalDist().inv_cdf(min(max(u, 1e-9), 1 - 1e-9))
    rho = spec.correlation
    z = rho * z_memory + math.sqrt(1 - rho * rho) * rng.gauss(0.0, 1.0)
    gflops = spec.median_gflops * math.exp(spec.sigma * z)
    return SimNode(NodeCapacity(name, memory, gflops), rng.randrange(spec.regions), rng.uniform(1.0, 15.0))


def draw_swarm(spec: SwarmSpec) -> list[SimNode]:
    rng = random.Random(spec.seed)
    return [draw_node(rng, spec, f"n{i:04d}") for i in range(spec.nodes)]


def round_trip_ms(a: SimNode, b: SimNode) -> float:
    """A deterministic round trip between two drawn nodes: their last miles plus the path between
    their regions (5-40 ms within one, 40-250 ms between two)."""
    pair = random.Random(hash((min(a.region, b.region), max(a.region, b.region))) & 0xFFFFFFFF)
    core = pair.uniform(5.0, 40.0) if a.region == b.region else pair.uniform(40.0, 250.0)
    return a.access_ms + b.access_ms + core


def hop_latency(layout: Layout, nodes: dict[str, SimNode], model: ModelShape) -> dict:
    """Per-token time of one session through each chain, compute plus half a round trip per hop."""
    starts: dict[int, list[Span]] = {}
    for span in layout.spans:
        starts.setdefault(span.start, []).append(span)
    totals = []
    for first in starts.get(0, []):
        span, ms = first, 0.0
        while True:
            ms += expected_ms(model, span, nodes[span.node].capacity.gflops)
            if span.end == model.num_layers:
                break
            nxt = min(starts.get(span.end, []), key=lambda s: round_trip_ms(nodes[span.node], nodes[s.node]),
                      default=None)
            if nxt is None:
                break
            ms += round_trip_ms(nodes[span.node], nodes[nxt.node]) / 2
            span = nxt
        totals.append(ms)
    if not totals:
        return {}
    totals.sort()
    return {"median": round(statistics.median(totals), 1), "max": round(totals[-1], 1)}


def simulate(spec: SwarmSpec, churn: int, min_replicas: int = 1, model: ModelShape = LLAMA_70B,
             progress: Callable[[str, int, int], None] = lambda stage, done, total: None) -> Report:
    """Plan ``model`` over the drawn swarm, then apply ``churn`` joins and leaves one at a time
    (``progress(stage, done, total)`` after the plan and after each change)."""
    rng = random.Random(spec.seed + 1)
    present = {node.capacity.name: node for node in draw_swarm(spec)}
    capacities = [node.capacity for node in present.values()]
    started = time.perf_counter()
    layout = plan_swarm(model, capacities, min_replicas)
    plan_seconds = time.perf_counter() - started
    speeds = {c.name: c.gflops for c in capacities}
    bound = throughput_bound(model, capacities)
    fraction = layout_throughput(model, layout.spans, speeds) / bound
    try:
        baseline = plan_layout(model, capacities, min_replicas)
        baseline_fraction = layout_throughput(model, baseline.spans, speeds) / bound
    except PlanError:
        baseline_fraction = 0.0
    report = Report(spec, model.name, min_replicas, layout.replicas, plan_seconds, fraction, baseline_fraction,
                    hop_latency(layout, present, model))
    progress("plan", 1, 1)
    spans = layout.spans
    joined = 0
    for event in range(churn):
        if rng.random() < spec.join_fraction or len(present) <= min_replicas + 1:
            name = f"j{joined:04d}"
            joined += 1
            present[name] = draw_node(rng, spec, name)
            kind, held = "join", 0
        else:
            name = rng.choice(sorted(present))
            del present[name]
            kind = "leave"
            held = sum(s.layers for s in spans if s.node == name)
        capacities = [node.capacity for node in present.values()]
        speeds = {c.name: c.gflops for c in capacities}
        bound = throughput_bound(model, capacities)
        started = time.perf_counter()
        result = rebalance_swarm(model, capacities, spans, min_replicas)
        seconds = time.perf_counter() - started
        fraction = layout_throughput(model, result.layout.spans, speeds) / bound
        fewest = fewest_moves(model, capacities, spans)
        kept = [s for s in spans if s.node in present]  # nothing moved: the broken chain just stops serving
        strict = 0 if layout_throughput(model, kept, speeds) >= TARGET_FRACTION * bound else fewest
        report.changes.append(Change(kind, name, held, result.moved_layers, fewest, strict, round(fraction, 4),
                                     result.layout.replicas, result.how, round(seconds, 3)))
        spans = result.layout.spans
        progress("churn", event + 1, churn)
    return report
