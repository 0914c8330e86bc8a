"""Which chain of stages a session runs through.

Every live node reports the spans it serves with its load (open sessions, queued steps) and the
measured compute time of one decode pass. A route is the cheapest chain of spans that meet end
to start and cover every layer, where a stage costs its network latency plus its expected compute
time scaled by the load already on it: sessions spread over replicas, and a fast idle node wins
over a slow busy one. Pure functions, no I/O: ``choose_route`` is tested as a table; the live
spans it chooses from come from :mod:`dllmctl.inference.stages`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from dllmctl.cluster.registry import NodeEntry
from dllmctl.placement.layout import Span
from dllmctl.placement.planner import decode_ms

HOP_MS = 1.0  # fixed cost of one more stage (a message, a wake-up): fewer hops win a tie
UNMEASURED_MS_PER_LAYER = 2.0  # a span not run yet, its size unknown: per layer at REFERENCE_GFLOPS
REFERENCE_GFLOPS = 15.0  # a decode rate (placement.capacity.decode_gflops): a 2-core desktop's, ~30 GB/s


class RouteError(RuntimeError):
    """No chain of live, unbanned nodes covers the model's layers."""


@dataclass(frozen=True)
class Stage:
    """A live span as routing weighs it: where it is (the node's entry), what it holds, how loaded it is."""

    node: NodeEntry
    span: Span
    latency_ms: float = 0.0
    step_ms: float = 0.0  # measured compute of one decode pass (0: not measured yet)
    sessions: int = 0  # sessions open on this span now
    queued: int = 0  # steps waiting at this node
    gflops: float = 0.0  # its decode rate (placement.capacity.decode_gflops)

    @property
    def expected_step_ms(self) -> float:
        if self.step_ms > 0:
            return self.step_ms
        if self.gflops > 0 and self.span.bytes > 0:  # not run yet: two FLOPs per fp32 weight at the decode rate
            return decode_ms(self.span.bytes, self.gflops)
        speed = self.gflops / REFERENCE_GFLOPS if self.gflops > 0 else 1.0
        return UNMEASURED_MS_PER_LAYER * max(self.span.layers, 1) / speed


def stage_cost(stage: Stage, extra_sessions: int = 0) -> float:
    """Expected milliseconds one token spends at this stage: the hop, and a share of a pass that
    grows with the sessions already there (batching makes it sub-linear; linear is the safe guess)."""
    load = stage.sessions + stage.queued + extra_sessions
    return HOP_MS + stage.latency_ms + stage.expected_step_ms * (1 + load)


def fits(stage: Stage, parallelism: str, num_layers: int) -> bool:
    """Whether a stage can be part of a route of this parallelism: whole spans for ``pipeline`` and
    ``model``, one tensor-parallel group holding every layer for ``tensor``, and for ``hybrid`` a chain
    of groups (or whole spans) of which none holds every layer."""
    grouped = stage.span.tensor_slice is not None
    whole_model = stage.span.start == 0 and stage.span.end == num_layers
    if parallelism == "tensor":
        return grouped and whole_model
    if parallelism == "hybrid":
        return not whole_model
    return not grouped


def choose_route(candidates: list[Stage], num_layers: int, model: str, banned: Collection[str] = (),
                 assigned: Mapping[str, int] | None = None, parallelism: str = "pipeline",
                 first_layer: int = 0) -> list[Stage]:
    """The cheapest chain covering layers [0, num_layers) that fits ``parallelism``. ``banned`` node
    names are skipped; ``assigned`` counts sessions this client has just placed on each node (not yet in
    the nodes' reports), so consecutive sessions spread over replicas. Ties go to node names, for
    determinism. ``first_layer`` K > 0: a private route, over layers [K, num_layers) and through spans
    without embeddings or head (the client runs those itself)."""
    assigned = assigned or {}
    private = first_layer > 0
    usable = [c for c in candidates if c.node.name not in banned and c.span.end > c.span.start
              and fits(c, parallelism, num_layers) and (
                  (c.span.start >= first_layer and not c.span.embed and not c.span.head) if private else
                  (c.span.start > 0 or c.span.embed) and (c.span.end < num_layers or c.span.head))]
    starting: dict[int, list[Stage]] = {}
    for stage in usable:  # by first layer, once: a swarm's thousand spans are not scanned per layer
        starting.setdefault(stage.span.start, []).append(stage)
    best: dict[int, tuple[float, list[str], list[Stage]]] = {first_layer: (0.0, [], [])}
    for position in range(first_layer, num_layers):  # spans only move forward, so positions in order suffice
        if position not in best:
            continue
        cost, names, route = best[position]
        for stage in starting.get(position, ()):
            option = (cost + stage_cost(stage, assigned.get(stage.node.name, 0)), names + [stage.node.name],
                      route + [stage])
            current = best.get(stage.span.end)
            if current is None or option[:2] < current[:2]:
                best[stage.span.end] = option
    if num_layers not in best:
        raise RouteError(_uncovered(usable, best, num_layers, model, banned, parallelism, private))
    route = best[num_layers][2]
    if parallelism == "hybrid" and not any(stage.span.tensor_slice for stage in route):
        raise RouteError(f"no live hybrid layout of {model} (a chain of tensor-parallel groups); "
                         f"{DEPLOY_HINT['hybrid'].format(model=model)}")
    return route


DEPLOY_HINT = {
    "pipeline": "deploy it ('dllmctl deploy {model}')",
    "model": "deploy it ('dllmctl deploy {model}')",
    "tensor": "deploy a tensor-parallel group ('dllmctl deploy {model} --parallelism tensor --tp N')",
    "hybrid": "deploy one ('dllmctl deploy {model} --parallelism hybrid --tp N')",
}


def _uncovered(usable: list[Stage], reached: Mapping[int, object], num_layers: int, model: str,
               banned: Collection[str], parallelism: str, private: bool = False) -> str:
    gap_start = max(reached)
    later = [c.span.start for c in usable if c.span.start > gap_start]
    gap_end = min(later) - 1 if later else num_layers - 1
    layers = f"layer {gap_start}" if gap_end == gap_start else f"layers {gap_start}-{gap_end}"
    why = f" (banned after failures: {', '.join(sorted(banned))})" if banned else ""
    kind = {"tensor": " tensor-parallel", "hybrid": " hybrid"}.get(parallelism, "") + (" private" if private else "")
    hint = (f"deploy it with 'dllmctl deploy {model} --private' (the same --private-layers)" if private
            else DEPLOY_HINT.get(parallelism, DEPLOY_HINT['pipeline']).format(model=model))
    return f"no live{kind} replica serves {layers} of {model}{why}; {hint} or bring its nodes back"


def route_counts(routes: list[list[Stage]]) -> Counter:
    """Sessions per node over a set of routes (what ``assigned`` expects)."""
    return Counter(stage.node.name for route in routes for stage in route)
